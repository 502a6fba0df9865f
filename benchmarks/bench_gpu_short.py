"""A short `base`-profile comparison for a GPU lent for minutes: the bench with budgets that fit a time limit.

`invcoss bench --profile base` is sized for a GPU held for hours (20000/15000/15000 steps, 3 seeds, every method).
This runs the same bench code — same data loading, training, replay, inversion, probes and report — with the
`base` model (ViT-B, 96³ volumes, 224² pathology) and budgets given on the command line, one seed, the methods in
the order given, and writes results.json / report.md like `invcoss bench`. Each finished run is kept in --out, so
a run stopped early still reports the methods it finished (`--report-only`); `--deadline` starts no method that
would not finish in time.

    python benchmarks/bench_gpu_short.py --data DIR --out DIR --stage-steps 3000,1000,2000 --methods finetune,invcoss

On a machine lent through the device tool (no network, no project dependencies but torch and numpy),
`benchmarks/gpu/pack.sh` packs the rest with the sample data and `benchmarks/gpu/run.sh` runs this there.

What it changes from `base`, besides the steps and the learning rate: by default the input sizes are `small`'s
(16³ volumes in 4³ patches, 32² pathology in 4² patches) with `small`'s data and probe settings. At `base`'s 96³
the sample data's MRI probe tasks cannot be cut (a 2.4 mm MNI brain, 23-slice MR series: no 96³ patch of
`mri_tissue` or `mri_tumour` lies on the test side of its region split), so the bench leaves them out and says so.
The decoder probe is off (as in `small`, where it could not tell a trained encoder from a random one). `--smoke`
shrinks batches and inversion to check the shapes end to end in a few minutes.

Measured on an H100 (2026-11-27): at batch 64 (`--stage-steps 3000,1000,2000 --lr 3e-4`) the ViT-B trained 822 CT
images/s (78 ms a step), too slow for a comparison in a 10-minute slot; at `--batch-size 512 --replay-batch-size 256`
6073 images/s (84 ms a step): the step's time is the host's, not the arithmetic. With `--stage-steps 700,300,500
--epochs-per-stage 2 --lr 5e-4` `invcoss` took 293.5 s and `finetune` (after the shared stage) 112.8 s, evaluation
included (docs/results/gpu-h100-short/).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from invcoss_core.config import build_config
from invcoss_core.evaluation.bench import run_bench
from invcoss_core.evaluation.data import load_bench_data
from invcoss_core.evaluation.recon import ReconSettings
from invcoss_core.evaluation.settings import BenchSettings, bench_settings


def short_settings(args: argparse.Namespace) -> BenchSettings:
    """The `base` bench settings with this run's budgets (and, with --geometry small, the small input sizes)."""
    steps = tuple(int(s) for s in args.stage_steps.split(","))
    stage_config: dict[str, Any] = {
        "data": {"samples_per_volume": args.samples_per_volume, "max_samples": args.max_samples or None},
        "train": {"num_workers": args.workers, "lr": args.lr},
    }
    if args.batch_size:
        stage_config["train"]["batch_size"] = args.batch_size
    if args.replay_batch_size:
        stage_config["train"]["replay_batch_size"] = args.replay_batch_size
    if args.geometry == "small":
        modalities = build_config("small").model.model_dump()["modalities"]
        stage_config["model"] = {"modalities": modalities}
    inversion: dict[str, Any] = {}
    if args.inversion_iterations:
        inversion["iterations"] = args.inversion_iterations
    if args.smoke:
        stage_config["train"].update({"batch_size": 4, "replay_batch_size": 2, "num_workers": 0})
        inversion.update({"batch_size": 2, "iterations": 2, "iterations_per_batch": 1, "num_images": 4})
    if inversion:
        stage_config["inversion"] = inversion
    evaluation = bench_settings(args.geometry)  # the small geometry takes small's probe settings, base base's
    probes = evaluation.probes.model_copy(update={"max_samples": args.probe_samples or evaluation.probes.max_samples})
    return bench_settings(
        "base",
        stage_steps=steps,
        epochs_per_stage=args.epochs_per_stage,
        joint_steps=args.joint_steps or sum(steps),
        seeds=1,
        ablation_seeds=1,
        stage_config=stage_config,
        probes=probes,
        recon=ReconSettings(max_test=args.recon_test, decoder_steps=0),
    )


def _cost_factor(method: str) -> float:
    """A method's time per step relative to plain fine-tuning, roughly: a replay step also runs the replay batch
    (distilling: through the frozen teacher too), and inversion comes on top. Measured on the H100 (2026-11-27, batch
    512 + 256 replay): `invcoss` took 293.5 s for 700 + 300 + 500 steps with evaluation, `finetune` 112.8 s for the
    300 + 500 after the shared stage, about 0.20 and 0.14 s a step; 2.0 keeps the estimate on the safe side."""
    return 1.0 if method in ("finetune", "ewc") else 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="sample-data folder (invcoss samples fetch)")
    parser.add_argument("--out", type=Path, required=True, help="bench output folder")
    parser.add_argument("--methods", default="finetune,invcoss", help="comma-separated, run in this order")
    parser.add_argument("--stage-steps", default="3000,1000,2000", help="steps of the CT, MRI and pathology stages")
    parser.add_argument("--epochs-per-stage", type=int, default=3)
    parser.add_argument("--joint-steps", type=int, default=0, help="joint's steps (0: the stages' sum)")
    parser.add_argument(
        "--geometry",
        choices=("small", "base"),
        default="small",
        help="input sizes: small (16³ volumes, 32² pathology, as `small`; default) or base (96³, 224²: the sample "
        "data's probe tasks cannot be cut at 96³)",
    )
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (base preset: 1.5e-4)")
    parser.add_argument("--batch-size", type=int, default=0, help="real images per step (0: the base preset's 64)")
    parser.add_argument("--replay-batch-size", type=int, default=0, help="replay images per step (0: preset's 32)")
    parser.add_argument("--samples-per-volume", type=int, default=2048)
    parser.add_argument("--max-samples", type=int, default=0, help="SSL samples per modality and split (0: all)")
    parser.add_argument("--probe-samples", type=int, default=0, help="probe samples per task (0: the profile's)")
    parser.add_argument("--recon-test", type=int, default=1024, help="held-out images in the reconstruction loss")
    parser.add_argument("--inversion-iterations", type=int, default=0, help="first-batch steps (0: the profile's)")
    parser.add_argument("--workers", type=int, default=0, help="data-loader workers")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="tiny batches and inversion: a CPU check of shapes")
    parser.add_argument(
        "--deadline",
        type=float,
        default=0.0,
        help="seconds: start no further method whose estimated time (from the first method's seconds per step) "
        "would end past it; 0: no limit",
    )
    parser.add_argument("--report-only", action="store_true", help="train nothing; report the finished runs")
    args = parser.parse_args()

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    settings = short_settings(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    t0 = time.perf_counter()
    data = load_bench_data(
        args.data,
        settings.first_stage_config(0),
        settings.order,
        settings.data_seed,
        settings.probe_tasks,
        settings.probe_max_per_class,
    )
    load_s = time.perf_counter() - t0
    print(f"data loaded in {load_s:.1f} s on {device}", flush=True)
    timings: dict[str, float] = {"load_seconds": round(load_s, 1)}
    per_step: float | None = None  # seconds per step of a plain (no-replay) method, from the first method run
    later_steps = sum(settings.stage_steps[1:])  # what a method that reuses the shared first stage still trains
    for method in [] if args.report_only else methods:
        if per_step is not None and args.deadline:
            estimate = 1.3 * per_step * later_steps * _cost_factor(method)
            if time.perf_counter() - t0 + estimate > args.deadline:
                print(f"skipping {method}: about {estimate:.0f} s would pass the {args.deadline:.0f} s deadline")
                continue
        t = time.perf_counter()
        run_bench(settings=settings, methods=[method], data=data, out_dir=args.out, device=device, figures=False)
        timings[method] = round(time.perf_counter() - t, 1)
        if per_step is None:
            per_step = timings[method] / sum(settings.stage_steps) / _cost_factor(method)
        print(f"{method} finished in {timings[method]:.1f} s", flush=True)
    results = run_bench(
        settings=settings, methods=methods, data=data, out_dir=args.out, device=device, report_only=True
    )
    summary = {
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "settings": json.loads(settings.model_dump_json()),
        "timings": timings,
    }
    (args.out / "gpu_short.json").write_text(json.dumps(summary, indent=2))
    for name, m in results["methods"].items():
        print(name, {k: m.get(k) for k in ("avg_prev", "bwt", "recon_prev", "seconds", "inversion_seconds")})


if __name__ == "__main__":
    main()
