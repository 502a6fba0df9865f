"""Per-seed stage records to the results dictionary: matrices, means and spreads over seeds, costs."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from invcoss_core.evaluation.bench.forgetting import forgetting_check
from invcoss_core.evaluation.bench.store import StageRecord
from invcoss_core.evaluation.data import BenchData
from invcoss_core.evaluation.evaluate import StageEval
from invcoss_core.evaluation.metrics import (
    avg_prev,
    backward_transfer,
    elementwise_mean_sd,
    mean_sd,
    recon_increase,
    task_backward_transfer,
)
from invcoss_core.evaluation.settings import METHODS, BenchSettings

PRIMARY_PROBE = "linear"  # `acc` in results.json; kNN is reported beside it as `acc_knn`


def _matrix(
    records: Sequence[StageRecord], rows: int, columns: Sequence[str], pick: Callable[[StageEval, str], float | None]
) -> np.ndarray:
    out = np.full((rows, len(columns)), math.nan)
    for s, record in enumerate(records):
        for j, name in enumerate(columns):
            value = pick(record.eval, name)
            if value is not None:
                out[s, j] = value
    return out


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def _ms(values: Sequence[float]) -> tuple[float, float]:
    stat = mean_sd(values)
    return stat.mean, stat.sd


def replay_bytes_real(data: BenchData, settings: BenchSettings, fraction: float = 0.05) -> int:
    """Bytes a real replay buffer of `fraction` of every stage's training set would hold (float16, as stored)."""
    total = 0
    for modality in settings.order:
        images = data.modalities[modality].train
        count = max(1, round(fraction * images.shape[0]))
        total += count * math.prod(images.shape[1:]) * 2
    return total


def _relative(path: str, root: Path | None) -> str:
    """`path` relative to the output folder when it lies inside it (results stay valid when the folder moves)."""
    if root is None or not Path(path).is_absolute():
        return path
    try:
        return str(Path(path).relative_to(Path(root).absolute()))
    except ValueError:
        return path


def aggregate(
    settings: BenchSettings,
    data: BenchData,
    records: Mapping[str, Sequence[Sequence[StageRecord]]],
    baselines: Mapping[str, Any],
    root: Path | None = None,
    seed_ids: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Turn per-seed stage records into the results dictionary (means ± sd over seeds).

    Layout: {"tasks", "task_modality", "task_stage", "modalities", "methods": {name: {"acc" (stage × task,
    linear probe), "acc_sd", "acc_knn", "acc_knn_sd", "recon" (stage × modality, own-stage decoder), "recon_sd",
    "recon_refit", "recon_refit_sd" (decoder probe; null when disabled), "avg_prev", "avg_prev_sd", "avg_prev_knn",
    "avg_prev_knn_sd", "avg_final", "bwt", "bwt_sd", "bwt_knn", "bwt_knn_sd", "recon_prev", "recon_prev_sd",
    "recon_increase", "recon_increase_sd", "handoff_bytes", "replay_bytes_real", "seconds", "seconds_sd",
    "inversion_seconds", "replay_seconds", "task_bwt", "task_bwt_sd", "task_bwt_knn", "task_bwt_knn_sd",
    "task_bwt_losses", "task_bwt_knn_losses" (per earlier task: mean, sd, seeds that lose; sequential methods
    only), "final_model" (relative to `root`), "seeds", "seed_ids" (the seed of each `per_seed` entry;
    `seed_ids[name]`, else 0, 1, ...), "stages", "per_seed"}}, "baselines", "forgetting", "compute_seconds"}.
    Joint has one row; its BWT is null.
    """
    order = settings.order
    tasks = [t.name for t in data.tasks]
    task_stage = [order.index(t.modality) for t in data.tasks]
    num_stages = len(order)
    real_bytes = replay_bytes_real(data, settings)
    methods: dict[str, Any] = {}
    for name, runs in records.items():
        if not runs:
            continue
        spec = METHODS[name]
        rows = num_stages if spec.sequential else 1
        lin = [_matrix(r, rows, tasks, lambda e, t: e.probes.get(t, {}).get("linear")) for r in runs]
        knn = [_matrix(r, rows, tasks, lambda e, t: e.probes.get(t, {}).get("knn")) for r in runs]
        rec = [_matrix(r, rows, list(order), lambda e, m: e.recon.get(m)) for r in runs]
        ref = [_matrix(r, rows, list(order), lambda e, m: e.recon_refit.get(m)) for r in runs]
        entry: dict[str, Any] = {
            "description": spec.description,
            "seeds": len(runs),
            "seed_ids": list(seed_ids[name]) if seed_ids and name in seed_ids else list(range(len(runs))),
            "stages": list(order) if spec.sequential else ["joint"],
        }
        for key, mats in (("acc", lin), ("acc_knn", knn), ("recon", rec), ("recon_refit", ref)):
            mean, sd = elementwise_mean_sd(mats)
            entry[key], entry[f"{key}_sd"] = mean, sd
        earlier = [m for m in range(num_stages - 1)]
        per_seed: dict[str, list[float]] = {
            "avg_prev": [avg_prev(m[-1], task_stage, num_stages) for m in lin],
            "avg_prev_knn": [avg_prev(m[-1], task_stage, num_stages) for m in knn],
            "avg_final": [float(np.nanmean(m[-1])) for m in lin],
            "recon_prev": [_nanmean(r[-1, earlier]) for r in rec],
            "recon_refit_prev": [_nanmean(r[-1, earlier]) for r in ref],
            "seconds": [sum(s.train_seconds + s.replay_seconds for s in r) for r in runs],
            "replay_seconds": [sum(s.replay_seconds for s in r) for r in runs],
        }
        if spec.sequential:
            per_seed["bwt"] = [backward_transfer(m, task_stage) for m in lin]
            per_seed["bwt_knn"] = [backward_transfer(m, task_stage) for m in knn]
            earlier_tasks = [j for j in range(len(tasks)) if task_stage[j] < num_stages - 1]
            for key, mats in (("task_bwt", lin), ("task_bwt_knn", knn)):
                per_task = [task_backward_transfer(m, task_stage) for m in mats]
                stats = {tasks[j]: _ms([row[j] for row in per_task]) for j in earlier_tasks}
                entry[key] = {t: mean for t, (mean, _sd) in stats.items()}
                entry[f"{key}_sd"] = {t: sd for t, (_mean, sd) in stats.items()}
                # How many seeds lose on each task: a consistency the mean ± sd does not show.
                entry[f"{key}_losses"] = {tasks[j]: sum(1 for row in per_task if row[j] < 0) for j in earlier_tasks}
            increases = [recon_increase(r, list(range(num_stages))) for r in rec]
            entry["recon_increase"] = {order[m]: _ms([inc[m] for inc in increases])[0] for m in earlier}
            entry["recon_increase_sd"] = {order[m]: _ms([inc[m] for inc in increases])[1] for m in earlier}
        else:
            per_seed["bwt"] = per_seed["bwt_knn"] = [math.nan for _ in runs]
            entry["recon_increase"] = entry["recon_increase_sd"] = {order[m]: None for m in earlier}
        for key, values in per_seed.items():
            entry[key], entry[f"{key}_sd"] = _ms(values)
        entry["per_seed"] = per_seed
        entry["handoff_bytes"] = max(s.handoff_bytes for s in runs[0])
        entry["replay_bytes_real"] = real_bytes
        entry["inversion_seconds"] = entry["replay_seconds"] if spec.uses_inversion else 0.0
        entry["final_model"] = _relative(runs[0][-1].artifact, root)
        entry["stage_metrics"] = [s.metrics for s in runs[0]]
        methods[name] = entry
    randoms = baselines.get("random_encoder", [])
    base = {
        "raw_pixels": {
            "acc": [baselines["raw_pixels"][t]["linear"] for t in tasks],
            "acc_knn": [baselines["raw_pixels"][t]["knn"] for t in tasks],
        },
        "random_encoder": {
            "seeds": len(randoms),
            "acc": [_ms([r["probes"][t]["linear"] for r in randoms])[0] for t in tasks],
            "acc_sd": [_ms([r["probes"][t]["linear"] for r in randoms])[1] for t in tasks],
            "acc_knn": [_ms([r["probes"][t]["knn"] for r in randoms])[0] for t in tasks],
            "recon": [_ms([r["recon"][m] for r in randoms if "recon" in r])[0] for m in order],
            "recon_refit": [_ms([r["recon_refit"][m] for r in randoms if "recon_refit" in r])[0] for m in order],
        },
    }
    return {
        "profile": settings.profile,
        "compute_seconds": compute_seconds(records),
        "modalities": list(order),
        "tasks": tasks,
        "task_modality": [t.modality for t in data.tasks],
        "task_stage": task_stage,
        "task_pseudo": [t.pseudo for t in data.tasks],
        "task_split": [t.split_note for t in data.tasks],
        "task_test_size": [int((~t.train_mask).sum()) for t in data.tasks],
        "task_folds": [min(settings.probes.folds, t.num_folds) for t in data.tasks],
        "primary_probe": PRIMARY_PROBE,
        "methods": methods,
        "baselines": base,
        "forgetting": forgetting_check(methods.get("finetune"), order, tasks, task_stage),
        "data": {
            "source": data.source,
            "notes": data.notes,
            "train_samples": {m: int(d.train.shape[0]) for m, d in data.modalities.items()},
            "val_samples": {m: int(d.val.shape[0]) for m, d in data.modalities.items()},
        },
        "settings": settings.model_dump(mode="json"),
    }


def compute_seconds(records: Mapping[str, Sequence[Sequence[StageRecord]]]) -> float:
    """Training + replay production + evaluation seconds of everything in `records`.

    The shared first stage of a seed (trained and evaluated once, reused by every sequential method) counts once.
    """
    total = 0.0
    shared: set[int] = set()
    for name, runs in records.items():
        for seed, run in enumerate(runs):
            for index, stage in enumerate(run):
                if METHODS[name].sequential and index == 0:
                    total += stage.replay_seconds
                    if seed not in shared:
                        shared.add(seed)
                        total += stage.train_seconds + stage.eval.seconds
                    continue
                total += stage.train_seconds + stage.replay_seconds + stage.eval.seconds
    return total
