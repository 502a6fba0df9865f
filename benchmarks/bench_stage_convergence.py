"""Does a longer first stage add probe margin over a random encoder? One stage's probes and loss, epoch by epoch.

Issue 6 names "converged earlier stages" as a way to strengthen the benchmark; this measures whether a stage is
converged and what training it longer adds: it trains the bench's first stage (same data, seed and settings as
`invcoss bench`; --steps and --epochs as given, by default the `small` profile's first stage) and after every epoch
probes the encoder on that modality's tasks and measures its held-out reconstruction loss, next to the random
encoder and raw pixels of the same probe sets. Intermediate epochs are points on one cosine schedule (their learning
rate has not decayed), so the last row is the trained model and the earlier rows show how the margin grows.

    python benchmarks/bench_stage_convergence.py --data DIR --steps 6000 --epochs 6 --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from invcoss_core.common.events import ProgressEvent
from invcoss_core.data import TensorImages
from invcoss_core.evaluation.data import load_bench_data
from invcoss_core.evaluation.evaluate import probe_model, probe_pixels
from invcoss_core.evaluation.recon import decoder_state, own_decoder_loss
from invcoss_core.evaluation.settings import bench_settings
from invcoss_core.models import MultiModalMAE, build_model
from invcoss_core.replay import replay_class
from invcoss_core.training import run_stage
from invcoss_core.training.checkpoint import load_checkpoint
from invcoss_core.training.stage import seeded_model, stage_fingerprint


def _row(label: str, probes: dict[str, dict[str, float]], recon: float | None, **extra: Any) -> dict[str, Any]:
    return {"label": label, "probes": probes, "recon": recon, **extra}


def _print_row(row: dict[str, Any], tasks: list[str], random: dict[str, dict[str, float]] | None) -> None:
    cells = []
    for task in tasks:
        s = row["probes"][task]
        if random is None:
            cells.append(f"{100 * s['linear']:5.1f} / {100 * s['knn']:5.1f}")
        else:
            r = random[task]
            cells.append(f"{100 * (s['linear'] - r['linear']):+5.1f} / {100 * (s['knn'] - r['knn']):+5.1f}")
    recon = "" if row["recon"] is None else f"{row['recon']:.4f}"
    print(f"| {row['label']} | {recon} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="sample-data folder (invcoss samples fetch)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the stage and convergence.json")
    parser.add_argument("--profile", default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=6000, help="optimiser steps of the stage")
    parser.add_argument("--epochs", type=int, default=6, help="probes run after each of this many epochs")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = bench_settings(args.profile)
    settings = bench_settings(
        args.profile, stage_steps=(args.steps, *base.stage_steps[1:]), epochs_per_stage=args.epochs
    )
    modality = settings.order[0]
    config = settings.first_stage_config(args.seed)
    data = load_bench_data(args.data, config, (modality,), settings.data_seed, None, settings.probe_max_per_class)
    tasks = [t.name for t in data.tasks]
    val = data.modalities[modality].val
    args.out.mkdir(parents=True, exist_ok=True)

    def recon_of(model: MultiModalMAE) -> float:
        return own_decoder_loss(model, decoder_state(model.state_dict()), val, modality, settings.recon).loss

    random_model = seeded_model(config, 1).eval()  # the bench's random-encoder baseline of this seed
    random = probe_model(random_model, data.tasks, settings.probes)
    rows = [
        _row("raw pixels", probe_pixels(data.tasks, settings.probes), None),
        _row("random encoder", random, recon_of(random_model)),
    ]
    print(f"{modality} stage, seed {args.seed}: {args.steps} steps in {args.epochs} epochs; tasks {tasks}")
    print("| model | held-out recon | " + " | ".join(f"{t} linear / kNN" for t in tasks) + " |")
    print("|---|---|" + "---|" * len(tasks))
    for row in rows:
        _print_row(row, tasks, None)
    print("points above the random encoder:")
    work = args.out / "stage.work"
    run_id = f"convergence-seed{args.seed}"
    train_data = TensorImages(data.modalities[modality].train)
    fingerprint = stage_fingerprint(config, modality, None, run_id, len(train_data))
    started = time.perf_counter()
    steps_per_epoch = args.steps // args.epochs

    def on_event(event: ProgressEvent) -> None:
        if "epoch_loss" not in event.metrics:
            return
        checkpoint = load_checkpoint(work / "checkpoint", fingerprint)  # just written at the epoch's end
        assert checkpoint is not None, "run_stage writes an epoch's checkpoint before it reports the epoch"
        model = build_model(config.model)
        model.load_state_dict(checkpoint.model)
        model.eval()
        row = _row(
            f"epoch {event.epoch} ({event.epoch * steps_per_epoch} steps)",
            probe_model(model, data.tasks, settings.probes),
            recon_of(model),
            train_loss=event.metrics["epoch_loss"],
            minutes=(time.perf_counter() - started) / 60,
        )
        rows.append(row)
        _print_row(row, tasks, random)
        (args.out / "convergence.json").write_text(json.dumps({"tasks": tasks, "rows": rows}, indent=1))

    run_stage(
        config=config,
        modality=modality,
        train_data=train_data,
        run_id=run_id,
        site=modality,
        out_dir=args.out / "stage",
        work_dir=work,
        events=on_event,
        replay=replay_class("none")(),
    )


if __name__ == "__main__":
    main()
