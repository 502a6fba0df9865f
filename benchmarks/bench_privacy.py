"""The privacy audit across methods: both membership AUCs, TPR at 1 % FPR, the synthetic pool's exposure, and the
audit's time as a share of the stage's, for finetune, invcoss and pixel_inversion, plus a memorising control.

Each method runs the same stages (default CT then MRI) on the real sample data with the same seed; each stage is
audited exactly as a site does it (`run_stage(audit=...)`). Non-members are the stage's audit subjects
(`privacy.audit_fraction`); where the site's training split has too few subjects for that (the sample CT has two
subjects, one of which is the validation subject), the bench uses the validation split's subjects instead — also
never trained on — and says so per stage (`non_members`). The memorising control trains the last modality on 3
samples for `--memorise-steps` steps and is audited the same way.

    python benchmarks/bench_privacy.py --profile small --steps 300 --out docs/results/privacy/privacy.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from invcoss_core.artifact import Artifact
from invcoss_core.config import StageConfig, build_config, deep_merge
from invcoss_core.data import TensorImages, default_samples_dir, load_site_dataset
from invcoss_core.privacy import AuditInputs, AuditSplit, split_for_audit
from invcoss_core.training import run_stage

METHODS = {"finetune": "none", "invcoss": "inversion", "pixel_inversion": "pixel_inversion"}


def stage_data(config: StageConfig, modality: str) -> tuple[TensorImages, AuditInputs, str]:
    """Training samples and audit inputs of one stage, with the non-members' origin."""
    spec = config.model.spec(modality)
    dataset = load_site_dataset(default_samples_dir(), modality, spec, config.data, "train", config.seed)
    train, audit = split_for_audit(dataset, config.privacy.audit_fraction, config.seed)
    if audit.split.measured:
        return train, audit, "audit subjects (privacy.audit_fraction of the training split)"
    val = load_site_dataset(default_samples_dir(), modality, spec, config.data, "val", config.seed)
    split = AuditSplit(
        train_index=audit.split.train_index,
        audit_index=audit.split.audit_index,
        train_subjects=len(set(dataset.subjects)),
        audit_subjects=len(set(val.subjects)),
        fraction=0.0,
        measured=True,
    )
    return train, AuditInputs(non_members=val.tensors(), split=split), "validation subjects (bench fallback)"


def row(result: Any, origin: str, members: int) -> dict[str, Any]:
    """The figures of one audited stage."""
    privacy = result.artifact.manifest.privacy
    stage_seconds = result.train_seconds + result.replay_seconds
    out: dict[str, Any] = {
        "members_available": members,
        "non_members": origin,
        "train_seconds": round(result.train_seconds, 1),
        "replay_seconds": round(result.replay_seconds, 1),
        "audit_seconds": privacy.seconds,
        "audit_fraction_of_stage_time": round(privacy.seconds / (stage_seconds + privacy.seconds), 4),
        "privacy": privacy.model_dump(mode="json"),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="small")
    parser.add_argument("--modalities", default="ct,mri")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=None, help="steps per stage (None: the profile's full stage)")
    parser.add_argument("--inversion-iterations", type=int, default=None, help="shorten the inversion (first batch)")
    parser.add_argument("--memorise-steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    overrides: dict[str, Any] = {"seed": args.seed}
    if args.steps is not None:
        overrides["train"] = {"epochs": 1, "steps_per_epoch": args.steps}
    if args.inversion_iterations is not None:
        overrides["inversion"] = {
            "iterations": args.inversion_iterations,
            "iterations_per_batch": max(1, args.inversion_iterations // 10),
        }
    modalities = args.modalities.split(",")
    results: dict[str, Any] = {"settings": {**vars(args), "out": str(args.out)}, "methods": {}}
    for method in args.methods.split(","):
        config = build_config(args.profile, deep_merge(overrides, {"replay": {"strategy": METHODS[method]}}))
        incoming: Artifact | None = None
        rows = {}
        for modality in modalities:
            train, audit, origin = stage_data(config, modality)
            started = time.perf_counter()
            result = run_stage(
                config=config, modality=modality, train_data=train, incoming=incoming, run_id=method, audit=audit
            )
            rows[modality] = {
                **row(result, origin, len(train)),
                "wall_seconds": round(time.perf_counter() - started, 1),
            }
            print(method, modality, json.dumps(rows[modality]["privacy"]["calibrated_loss"]), flush=True)
            incoming = result.artifact
        results["methods"][method] = rows
    memorise = build_config(
        args.profile,
        deep_merge(overrides, {"train": {"epochs": 1, "steps_per_epoch": args.memorise_steps}}),
    )
    modality = modalities[-1]
    train, audit, origin = stage_data(memorise, modality)
    result = run_stage(
        config=memorise,
        modality=modality,
        train_data=TensorImages(train.tensors()[:3]),
        run_id="memorise",
        audit=audit,
    )
    results["memorising_control"] = {modality: row(result, origin, 3)}
    print("memorise", json.dumps(results["memorising_control"][modality]["privacy"]["calibrated_loss"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
