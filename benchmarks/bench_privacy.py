"""The privacy audit across methods and the DP-SGD trade-off, side by side in one run (issue 29, points 6 and 7).

Part 1, the audit of every hand-off: `finetune`, `invcoss` and `pixel_inversion` run the `small` benchmark's
stages (default CT then MRI, the benchmark's settings via `bench_settings`) on the real sample data with one seed,
and every stage is attacked exactly as a site does it (`run_stage(audit=...)`): the uncalibrated and the calibrated
loss attack (AUC, TPR at 1 % FPR), the synthetic pool's exposure, and the audit's time as a share of the stage's.
The first stage is trained once and each method's end-of-stage products are added to it (`finish_stage`, as the
benchmark does: nothing is replayed in a first stage, so the weights are the same); its audit is run on each
method's hand-off. Non-members are the stage's audit subjects (`privacy.audit_fraction`); where the training
split has too few subjects (the sample CT has two, one of them the validation subject) the validation subjects
are used instead — also never trained on — and each row says which (`non_members`).

Part 2, the memorising control: the last modality's first 3 training samples, `--memorise-steps` steps from a
random model, audited the same way (the audit must catch it: calibrated AUC ≥ 0.9).

Part 3, DP-SGD: the `invcoss` second stage again at each `--dp-noise` level (privacy.dp_noise_multiplier), from
the same first stage: calibrated AUC, ε at δ, and what it costs — the held-out reconstruction loss of the earlier
and the own modality and the probes' balanced accuracy, evaluated as the benchmark does, beside the non-DP stage.

    python benchmarks/bench_privacy.py --profile small --stage-steps 1500,1000 --dp-noise 0.5,1.0,2.0 \
        --out docs/results/privacy/audit.json
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from invcoss_core.artifact import Artifact, read_artifact_dir
from invcoss_core.config import StageConfig, deep_merge
from invcoss_core.data import TensorImages, default_samples_dir, load_site_dataset
from invcoss_core.evaluation.bench.stages import finish_stage
from invcoss_core.evaluation.data import BenchData, load_bench_data
from invcoss_core.evaluation.evaluate import evaluate_model
from invcoss_core.evaluation.recon import decoder_state
from invcoss_core.evaluation.settings import METHODS as BENCH_METHODS
from invcoss_core.evaluation.settings import BenchSettings, bench_settings
from invcoss_core.privacy import AuditInputs, AuditSplit, PrivacyReport, audit_handoff, split_for_audit
from invcoss_core.replay import replay_class
from invcoss_core.training import StageResult, load_student, run_stage

METHODS = ("finetune", "invcoss", "pixel_inversion")


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


def figures(privacy: PrivacyReport | None, origin: str, members: int, stage_seconds: float) -> dict[str, Any]:
    """One audited hand-off's row: the attacks, the decision and the audit's share of the stage's time."""
    assert privacy is not None and privacy.calibrated_loss is not None and privacy.model_loss is not None
    pool = privacy.synthetic_pool
    return {
        "members_available": members,
        "non_members": origin,
        "calibrated_auc": privacy.calibrated_loss.auc,
        "calibrated_tpr_1pct_fpr": privacy.calibrated_loss.tpr_at_1pct_fpr,
        "loss_auc": privacy.model_loss.auc,
        "loss_tpr_1pct_fpr": privacy.model_loss.tpr_at_1pct_fpr,
        "attacked": [privacy.calibrated_loss.members, privacy.calibrated_loss.non_members],
        "pool_auc_pixel": pool.pixel.auc if pool else None,
        "pool_auc_feature": pool.feature.auc if pool else None,
        "dcr_ratio_pixel": pool.dcr_ratio_pixel if pool else None,
        "dcr_ratio_feature": pool.dcr_ratio_feature if pool else None,
        "pool": pool.pool if pool else 0,
        "decision": privacy.decision,
        "dp": privacy.dp.model_dump(mode="json") if privacy.dp else None,
        "stage_seconds": round(stage_seconds, 1),
        "audit_seconds": privacy.seconds,
        "audit_share_of_stage": round(privacy.seconds / (stage_seconds + privacy.seconds), 4),
    }


def evaluated(
    model_of: Artifact, anchors: dict[str, dict[str, torch.Tensor]], data: BenchData, s: BenchSettings
) -> dict[str, Any]:
    """Held-out reconstruction per seen modality and the probes, as the benchmark measures them."""
    model = load_student(model_of)
    result = evaluate_model(model, data, list(anchors), anchors, s.probes, s.recon)
    return {"recon": result.recon, "probes": result.probes}


def later_stage(
    config: StageConfig, modality: str, incoming: Artifact, data: tuple[TensorImages, AuditInputs, str], run_id: str
) -> tuple[StageResult, float]:
    train, audit, _ = data
    started = time.perf_counter()
    result = run_stage(
        config=config, modality=modality, train_data=train, incoming=incoming, run_id=run_id, audit=audit
    )
    assert result is not None
    return result, time.perf_counter() - started


def memorising_control(
    args: argparse.Namespace,
    settings: BenchSettings,
    modality: str,
    data: tuple[TensorImages, AuditInputs, str],
    results: dict[str, Any],
) -> None:
    """A stage trained far too long on 3 samples from a random model, audited like every other (must be caught)."""
    memorise = deep_merge(
        settings.first_stage_config(args.seed).model_dump(mode="json"),
        {"train": {"epochs": 1, "steps_per_epoch": args.memorise_steps}},
    )
    config = StageConfig.model_validate(memorise)
    three = TensorImages(data[0].tensors()[:3])
    started = time.perf_counter()
    result = run_stage(config=config, modality=modality, train_data=three, run_id="memorise", audit=data[1])
    assert result is not None
    privacy = result.artifact.manifest.privacy
    seconds = time.perf_counter() - started - (privacy.seconds if privacy else 0)
    results["memorising_control"] = {modality: figures(privacy, data[2], 3, seconds)}
    print("memorise", modality, json.dumps(results["memorising_control"][modality]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="small")
    parser.add_argument("--modalities", default="ct,mri", help="the stages (two: an earlier and a later modality)")
    parser.add_argument("--stage-steps", default=None, help="steps per stage, e.g. 1500,1000 (default: the bench's)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--memorise-steps", type=int, default=1000)
    parser.add_argument("--dp-noise", default="0.5,1.0,2.0", help="DP-SGD noise multipliers ('' skips part 3)")
    parser.add_argument(
        "--first-stage",
        type=Path,
        default=None,
        help="an invcoss first-stage artifact of an earlier run of this bench (same settings): part 3 starts from it",
    )
    parser.add_argument(
        "--dp-inversion-images",
        type=int,
        default=None,
        help="part 3: synthetic images inverted after each DP stage (default: the profile's); the DP guarantee and the "
        "loss attacks concern the weights, which the inversion after training does not change",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    order = tuple(args.modalities.split(","))
    full = bench_settings(args.profile)
    steps = tuple(int(s) for s in args.stage_steps.split(",")) if args.stage_steps else full.stage_steps[: len(order)]
    settings = bench_settings(args.profile, order=order, stage_steps=steps)
    seed, first_modality, modality = args.seed, order[0], order[1]
    data = load_bench_data(
        default_samples_dir(),
        settings.first_stage_config(seed),
        order,
        settings.data_seed,
        tasks=settings.probe_tasks,
        max_per_class=settings.probe_max_per_class,
    )
    arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results: dict[str, Any] = {"settings": {**arguments, "stage_steps": steps}}

    data2 = stage_data(settings.config_for("finetune", seed, 1), modality)
    first: dict[str, Artifact] = {}
    if args.first_stage is not None:
        first["invcoss"] = read_artifact_dir(args.first_stage)
    if args.methods:
        part_one(args, settings, data, data2, first, results)

    # Part 2: the memorising control (--memorise-steps 0 skips it).
    if args.memorise_steps > 0:
        memorising_control(args, settings, modality, data2, results)

    # Part 3: DP-SGD at the second stage of invcoss (the non-DP row is part 1's).
    dp_rows: dict[str, Any] = {}
    if args.dp_noise and "invcoss" in first:
        for sigma in (float(s) for s in args.dp_noise.split(",")):
            changes: dict[str, Any] = {"privacy": {"dp_noise_multiplier": sigma}}
            if args.dp_inversion_images is not None:
                changes["inversion"] = {"num_images": args.dp_inversion_images}
            config = settings.config_for("invcoss", seed, 1)
            config = StageConfig.model_validate(deep_merge(config.model_dump(mode="json"), changes))
            result, seconds = later_stage(config, modality, first["invcoss"], data2, f"dp-{sigma}")
            privacy = result.artifact.manifest.privacy
            row = figures(privacy, data2[2], len(data2[0]), seconds - (privacy.seconds if privacy else 0))
            anchors = {
                first_modality: decoder_state(first["invcoss"].weights),
                modality: decoder_state(result.artifact.weights),
            }
            row["after"] = evaluated(result.artifact, anchors, data, settings)
            row["final_loss"] = result.metrics["final_loss"]
            row["train_seconds"] = round(result.train_seconds, 1)
            dp_rows[str(sigma)] = row
            print("dp", sigma, json.dumps(row), flush=True)
    results["dp"] = dp_rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("wrote", args.out)


def part_one(
    args: argparse.Namespace,
    settings: BenchSettings,
    data: BenchData,
    data2: tuple[TensorImages, AuditInputs, str],
    first: dict[str, Artifact],
    results: dict[str, Any],
) -> None:
    """The shared first stage, each method's hand-off of it, then each method's second stage, all audited."""
    seed, (first_modality, modality) = args.seed, settings.order[:2]
    work = Path(tempfile.mkdtemp(prefix="bench-privacy-"))
    config1 = settings.first_stage_config(seed)
    data1 = stage_data(config1, first_modality)
    started = time.perf_counter()
    shared = run_stage(config=config1, modality=first_modality, train_data=data1[0], run_id="shared", audit=data1[1])
    assert shared is not None
    shared_seconds = time.perf_counter() - started - (shared.artifact.manifest.privacy.seconds or 0.0)  # type: ignore[union-attr]
    rows: dict[str, Any] = {}
    for method in args.methods.split(","):
        config = settings.config_for(method, seed, 0)
        if method == "finetune":
            first[method], privacy, end_seconds = shared.artifact, shared.artifact.manifest.privacy, 0.0
        else:
            first[method], end_seconds = finish_stage(
                shared.artifact,
                replay_class(BENCH_METHODS[method].replay)(),
                config,
                first_modality,
                data1[0].tensors(),
                work / method / "stage1",
                f"privacy-{method}",
                torch.device("cpu"),
            )
            privacy = audit_handoff(
                config=config,
                modality=first_modality,
                student=load_student(first[method]),
                incoming_model=None,
                members=data1[0],
                inputs=data1[1],
                pool=first[method].synthetic.get(first_modality),
            )
        rows[method] = {first_modality: figures(privacy, data1[2], len(data1[0]), shared_seconds + end_seconds)}
        print(method, first_modality, json.dumps(rows[method][first_modality]), flush=True)
        result, seconds = later_stage(settings.config_for(method, seed, 1), modality, first[method], data2, method)
        privacy2 = result.artifact.manifest.privacy
        rows[method][modality] = figures(
            privacy2, data2[2], len(data2[0]), seconds - (privacy2.seconds if privacy2 else 0)
        )
        anchors = {
            first_modality: decoder_state(first[method].weights),
            modality: decoder_state(result.artifact.weights),
        }
        rows[method][modality]["after"] = evaluated(result.artifact, anchors, data, settings)
        print(method, modality, json.dumps(rows[method][modality]), flush=True)
    results["methods"] = rows


if __name__ == "__main__":
    main()
