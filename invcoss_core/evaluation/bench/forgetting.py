"""The benchmark's precondition: is forgetting visible for sequential fine-tuning beyond the seed noise?"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from invcoss_core.evaluation.metrics import sign_test_p


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _finite_max(values: Sequence[float]) -> float:
    """The largest finite value, NaN when there is none (one seed: the spread is unknown)."""
    finite = [float(v) for v in values if math.isfinite(float(v))]
    return max(finite) if finite else math.nan


def _beyond_twice(change: float, spread: float) -> bool:
    """A positive change larger than twice a known (finite) seed spread."""
    return bool(change > 0 and math.isfinite(spread) and change > 2 * spread)


def forgetting_check(
    finetune: Mapping[str, Any] | None, order: Sequence[str], tasks: Sequence[str], task_stage: Sequence[int]
) -> dict[str, Any]:
    """Is forgetting visible for sequential fine-tuning? The benchmark's precondition.

    For each earlier modality m: the rise of its held-out reconstruction loss from its own stage to the end must
    exceed twice the seed spread, spread = the largest sample sd over seeds among the own-stage value, the final
    value and the per-seed rise. For the probes, the mean accuracy drop over the earlier tasks (-BWT) must exceed
    twice the sd of BWT over seeds. With a single seed the spread is unknown and `visible` is null.
    """
    if finetune is None:
        return {"visible": None, "reason": "finetune was not run"}
    per_seed = finetune["per_seed"]
    seeds = int(finetune["seeds"])
    rec, rec_sd = np.asarray(finetune["recon"], dtype=float), np.asarray(finetune["recon_sd"], dtype=float)
    last = len(order) - 1
    modalities: dict[str, Any] = {}
    for m in range(last):
        rise = float(finetune["recon_increase"][order[m]])
        spread = _finite_max([rec_sd[m, m], rec_sd[last, m], _num(finetune["recon_increase_sd"][order[m]])])
        modalities[order[m]] = {
            "own_stage": float(rec[m, m]),
            "final": float(rec[last, m]),
            "rise": rise,
            "spread": spread,
            "visible": _beyond_twice(rise, spread),
        }
    drop = -_num(finetune["bwt"])
    drop_spread = _finite_max([_num(finetune["bwt_sd"])])
    probe_visible = _beyond_twice(drop, drop_spread)
    # The kNN probe, reported beside the primary (linear) probe; the verdict stays on the primary probe.
    knn_drop = -_num(finetune.get("bwt_knn"))
    knn_spread = _finite_max([_num(finetune.get("bwt_knn_sd"))])
    recon_visible = all(v["visible"] for v in modalities.values())
    # Per earlier task (reported, not part of the verdict): where the probes' forgetting is beyond the seed noise.
    per_task: dict[str, Any] = {}
    for probe, key in (("linear", "task_bwt"), ("knn", "task_bwt_knn")):
        for task, bwt in (finetune.get(key) or {}).items():
            task_drop, task_spread = -_num(bwt), _finite_max([_num(finetune[f"{key}_sd"][task])])
            found: dict[str, Any] = {
                "drop": task_drop,
                "spread": task_spread,
                "visible": _beyond_twice(task_drop, task_spread),
            }
            losses = (finetune.get(f"{key}_losses") or {}).get(task)
            if losses is not None and seeds > 0:
                found.update(losses=int(losses), of=seeds, sign_p=sign_test_p(int(losses), seeds))
            per_task.setdefault(task, {})[probe] = found
    return {
        "tasks": per_task,
        "seeds": seeds,
        "recon": modalities,
        "probe_drop": drop,
        "probe_drop_spread": drop_spread,
        "probe_visible": probe_visible,
        "knn_probe_drop": knn_drop,
        "knn_probe_drop_spread": knn_spread,
        "knn_probe_visible": _beyond_twice(knn_drop, knn_spread),
        "recon_visible": recon_visible,
        "visible": (recon_visible and probe_visible) if seeds > 1 else None,
        "bwt_per_seed": per_seed.get("bwt"),
    }
