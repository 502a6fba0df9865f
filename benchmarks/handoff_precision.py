"""Half-precision hand-off weights: bytes saved and the reconstruction loss after the next stage.

    python benchmarks/handoff_precision.py [--profile small] [--epochs 4] [--out bench-out/handoff-precision]

Stage 1 trains CT (with inversion replay) once and hands off in float32. The same artifact is re-encoded with its
weights in float16 and in bfloat16 (`encode_artifact(weights_dtype=...)`, everything else identical), and stage 2
trains MRI from each, with the same seed. Reported per dtype: the weights file's bytes, the largest relative
round-trip error of a weight tensor, and after stage 2 the held-out masked-reconstruction loss on MRI (the
model's own decoder) and on CT (the stage-2 encoder with stage 1's float32 CT decoder: `own_decoder_loss`), with
masks fixed per modality. `--epochs`, the inversion budget and the pool size are smaller than the profile's, for
time (recorded in the output as `short_run`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from invcoss_core.artifact import WEIGHTS, decode_artifact, encode_artifact
from invcoss_core.config import build_config
from invcoss_core.data import fetch_samples, load_site_dataset
from invcoss_core.evaluation.recon import ReconSettings, decoder_state, own_decoder_loss
from invcoss_core.training import run_stage
from invcoss_core.training.stage import load_student

DTYPES = ("float32", "float16", "bfloat16")


def _held_out(samples: Path, modality: str, config: Any) -> torch.Tensor:
    data = load_site_dataset(samples / modality, modality, config.model.spec(modality), config.data, split="val")
    return data.tensors()


def main() -> None:
    """Run stage 1 once, stage 2 per hand-off dtype, print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="small")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per stage (the small profile has 20)")
    parser.add_argument("--inversion-iterations", type=int, default=120, help="the small profile has 600 (+60)")
    parser.add_argument("--images", type=int, default=64, help="synthetic images per stage (default: 5 %% of data)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/handoff-precision"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    overrides = {
        "replay": {"strategy": "inversion"},
        "train": {"epochs": args.epochs},
        "inversion": {
            "num_images": args.images,
            "iterations": args.inversion_iterations,
            "iterations_per_batch": max(1, args.inversion_iterations // 10),
        },
    }
    config = build_config(args.profile, overrides)
    samples = fetch_samples(progress=False)
    ct = load_site_dataset(samples / "ct", "ct", config.model.spec("ct"), config.data, split="train")
    mri = load_site_dataset(samples / "mri", "mri", config.model.spec("mri"), config.data, split="train")
    tests = {m: _held_out(samples, m, config) for m in ("ct", "mri")}
    started = time.perf_counter()
    first = run_stage(config=config, modality="ct", train_data=ct, run_id="precision", site="A")
    assert first is not None
    stage1 = first.artifact
    settings = ReconSettings()
    rows = []
    for dtype in DTYPES:
        m = stage1.manifest
        files = encode_artifact(
            run_id=m.run_id,
            stage_index=m.stage_index,
            site=m.site,
            modalities=m.modalities,
            profile=m.profile,
            replay=m.replay,
            parent_sha256=m.parent_sha256,
            architecture=m.architecture,
            weights=stage1.weights,
            stats=stage1.stats,
            synthetic=stage1.synthetic,
            extras=stage1.extras,
            privacy_gate=m.privacy_gate,
            metrics=m.metrics,
            weights_dtype=dtype,  # type: ignore[arg-type]
        )
        incoming = decode_artifact(files)
        errors = [
            float((incoming.weights[k].float() - v).abs().max() / v.abs().max().clamp_min(1e-12))
            for k, v in stage1.weights.items()
            if v.is_floating_point()
        ]
        torch.manual_seed(0)
        second = run_stage(
            config=config, modality="mri", train_data=mri, incoming=incoming, run_id="precision", site="B"
        )
        assert second is not None
        model = load_student(second.artifact)
        rows.append(
            {
                "weights_dtype": dtype,
                "weights_bytes": len(files[WEIGHTS]),
                "artifact_bytes": sum(len(b) for b in files.values()),
                "max_relative_roundtrip_error": max(errors),
                "stage2_final_train_loss": second.epoch_losses[-1],
                "recon_mri_after_stage2": own_decoder_loss(
                    model, decoder_state(second.artifact.weights), tests["mri"], "mri", settings
                ).loss,
                "recon_ct_after_stage2": own_decoder_loss(
                    model, decoder_state(stage1.weights), tests["ct"], "ct", settings
                ).loss,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "profile": args.profile,
        "short_run": {
            "epochs": args.epochs,
            "inversion_iterations": args.inversion_iterations,
            "synthetic_images": args.images,
        },
        "seconds": time.perf_counter() - started,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
