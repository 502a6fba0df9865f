"""Where a GPU stage's step time goes: the stage loop at several batch sizes, losses read every step or in windows.

At the `small` input sizes (16³ volumes in 4³ patches: 16 tokens, 4 of them seen by the encoder) the `base` model
(ViT-B) does little arithmetic per image, so a step's time is the host queueing kernels. Two levers, measured side
by side in one process on the same model and data:
- reading the losses back (NaN check, progress) every step — the host waits for the queue to drain — or every 25
  steps (`default_check_every` on an accelerator);
- the batch size: more images per queued kernel.

    python benchmarks/bench_gpu_step.py --batch-sizes 64,256,512 --steps 100

Prints ms per step and images/s of each setting and their ratio to the first. Every measurement runs `train_stage`
itself (AdamW, clipping, bf16 autocast on CUDA; statistics from the first batch only), timed between two of its
loss read-backs. A first version timed whole short calls (12 steps, the difference of two call lengths); on the H100
(2026-11-27) that gave contradictory figures (batch 256 faster per step than 64), so it measured set-up noise:
docs/results/gpu-h100-short/step_bench.json keeps them, not as a result.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from invcoss_core.common.events import ProgressEvent
from invcoss_core.config import StageConfig, build_config
from invcoss_core.data import TensorImages
from invcoss_core.replay import NoReplay
from invcoss_core.training.stage import default_check_every, seeded_model, train_stage


def stage_config(profile: str, geometry: str, batch: int) -> StageConfig:
    """`profile`'s model and training settings at `geometry`'s input sizes, one epoch of plain MAE steps."""
    data = build_config(profile).model_dump()
    if geometry != profile:
        data["model"]["modalities"] = build_config(geometry).model.model_dump()["modalities"]
    # One epoch whose first batch feeds the statistics, as in a stage's last epoch; the other steps are plain.
    data["train"].update({"batch_size": batch, "epochs": 1, "num_workers": 0, "stats_batches": 1})
    return StageConfig.model_validate(data)


def time_stage(cfg: StageConfig, steps: int, device: torch.device, check_every: int) -> float:
    """Seconds per step of `train_stage` between its read-backs at step `check_every` (or 25) and at its last step.

    Timing between two read-backs of the same loop (each waits for the queued work) leaves out the set-up, the
    first steps and the statistics batch; `steps` must exceed the first read-back by a few windows.
    """
    spec = cfg.model.spec("ct")
    batch = cfg.train.batch_size
    data = TensorImages(torch.rand(batch * steps, spec.in_channels, *spec.img_size))
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps_per_epoch": steps})})
    student = seeded_model(cfg, "step-bench").to(device)
    reads: list[tuple[int, float]] = []

    def on_event(event: ProgressEvent) -> None:
        if "loss" in event.metrics:  # one per read-back
            reads.append((event.step, time.perf_counter()))

    train_stage(
        config=cfg,
        modality="ct",
        train_data=data,
        student=student,
        teacher=None,
        replay=NoReplay(),
        device=device,
        checkpoint_dir=None,
        fingerprint="step-bench",
        stage_index=1,
        events=on_event,
        check_every=check_every,
    )
    first = next(r for r in reads if r[0] >= max(check_every, 25))
    last = reads[-1]
    if last[0] <= first[0]:
        raise SystemExit(f"--steps {steps} leaves no timed window after step {first[0]}: raise it")
    return (last[1] - first[1]) / (last[0] - first[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="base", choices=["tiny", "small", "base"], help="model and training")
    parser.add_argument("--geometry", default="small", choices=["tiny", "small", "base"], help="input sizes")
    parser.add_argument("--batch-sizes", default="64,256,512")
    parser.add_argument("--steps", type=int, default=100, help="steps per setting; timed from step 25 on")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--windowed", type=int, default=0, help="the windowed read interval (0: the device's default)")
    parser.add_argument("--json", default="", help="also write the rows to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    windowed = args.windowed or default_check_every(device)
    rows: list[dict[str, Any]] = []
    time_stage(stage_config(args.profile, args.geometry, 8), 30, device, 1)  # first-call costs (kernels, allocator)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        cfg = stage_config(args.profile, args.geometry, batch)
        for every in sorted({1, windowed}):
            s = time_stage(cfg, args.steps, device, every)
            rows.append({"batch": batch, "check_every": every, "ms_per_step": 1e3 * s, "images_per_s": batch / s})
    base = rows[0]["images_per_s"]
    print(f"{args.profile} model, {args.geometry} inputs, {device} ({args.steps} steps each, timed from step 25)")
    print(f"{'batch':>6} {'read every':>10} {'ms/step':>9} {'images/s':>9} {'vs first':>9}")
    for r in rows:
        r["ratio"] = r["images_per_s"] / base
        print(
            f"{r['batch']:>6} {r['check_every']:>10} {r['ms_per_step']:>9.1f} {r['images_per_s']:>9.0f} "
            f"{r['ratio']:>8.2f}x"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": str(device), "profile": args.profile, "geometry": args.geometry, "rows": rows}, fh)


if __name__ == "__main__":
    main()
