"""Continual-learning measures on accuracy and reconstruction matrices: pure functions, no model, no I/O.

Conventions (0-based stage indices):
- ``acc[s][j]``: probe accuracy of task j measured after stage s. Shape (S, J). NaN marks a cell not measured.
- ``task_stage[j]``: the stage whose modality task j belongs to (the stage that first trains on it).
- ``recon[s][m]``: held-out masked-reconstruction loss of modality m after stage s (lower is better); NaN for a
  modality not seen yet.
- ``modality_stage[m]``: the stage that trains modality m.
The last stage is S - 1; "earlier" tasks or modalities are those whose stage is < S - 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Matrix = Sequence[Sequence[float]] | np.ndarray


class MetricError(ValueError):
    """A matrix and its stage assignment do not fit together."""


def _as_matrix(values: Matrix, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0:
        raise MetricError(f"{name} must be a non-empty 2-D matrix (stages × columns); got shape {array.shape}")
    return array


def _check_stages(stages: Sequence[int], columns: int, num_stages: int, name: str) -> np.ndarray:
    owner = np.asarray(stages, dtype=np.int64)
    if owner.shape != (columns,):
        raise MetricError(f"{name} needs one stage per column ({columns}); got {len(stages)}")
    if columns and (owner.min() < 0 or owner.max() >= num_stages):
        raise MetricError(f"{name} holds stages outside 0..{num_stages - 1}: {list(stages)}")
    return owner


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def average_accuracy(acc: Matrix, task_stage: Sequence[int], stage: int = -1) -> float:
    """Mean accuracy after `stage` over the tasks whose modality has been trained by then.

    A_s = mean_{j : task_stage[j] <= s} acc[s][j]   (Lopez-Paz & Ranzato 2017 use s = S - 1).

    Args:
        acc: (S, J) accuracy matrix.
        task_stage: (J,) owning stage of each task.
        stage: which row; negative values count from the end.
    Returns:
        the mean, or NaN when no task has been seen.
    """
    a = _as_matrix(acc, "acc")
    s = stage % a.shape[0]
    owner = _check_stages(task_stage, a.shape[1], a.shape[0], "task_stage")
    return _nanmean(a[s, owner <= s])


def avg_prev(final_acc: Sequence[float], task_stage: Sequence[int], num_stages: int) -> float:
    """Mean final accuracy over the tasks of the earlier modalities (all but the last stage's).

    avg_prev = mean_{j : task_stage[j] < S - 1} final_acc[j]. It takes the final row only, so a single-stage
    reference (joint training) is scored on the same tasks as the sequential methods.

    Args:
        final_acc: (J,) accuracies after the last stage.
        task_stage: (J,) owning stage of each task in the sequential plan.
        num_stages: S, the number of stages of the sequential plan.
    Returns:
        the mean, or NaN when no task belongs to an earlier stage.
    """
    row = np.asarray(final_acc, dtype=np.float64)
    if row.ndim != 1:
        raise MetricError(f"final_acc must be one row; got shape {row.shape}")
    owner = _check_stages(task_stage, row.shape[0], num_stages, "task_stage")
    return _nanmean(row[owner < num_stages - 1])


def backward_transfer(acc: Matrix, task_stage: Sequence[int]) -> float:
    """Backward transfer (Lopez-Paz & Ranzato 2017): how training later stages changed earlier tasks.

    BWT = mean_{j : t_j < S - 1} (acc[S - 1][j] - acc[t_j][j]), t_j = task_stage[j].
    Negative values are forgetting; positive values mean later stages helped.

    Args:
        acc: (S, J) accuracy matrix.
        task_stage: (J,) owning stage of each task.
    Returns:
        BWT, or NaN for a single stage or when no task is earlier than the last stage.
    """
    return _nanmean(np.array(task_backward_transfer(acc, task_stage), dtype=float))


def task_backward_transfer(acc: Matrix, task_stage: Sequence[int]) -> list[float]:
    """Per-task backward transfer: acc[S - 1][j] - acc[t_j][j] for tasks with t_j < S - 1; NaN for the others.

    Returns:
        (J,) values; negative is forgetting. Their mean over the earlier tasks is :func:`backward_transfer`.
    """
    a = _as_matrix(acc, "acc")
    owner = _check_stages(task_stage, a.shape[1], a.shape[0], "task_stage")
    last = a.shape[0] - 1
    return [float(a[last, j] - a[owner[j], j]) if owner[j] < last else math.nan for j in range(a.shape[1])]


def forgetting(acc: Matrix, task_stage: Sequence[int]) -> list[float]:
    """Per-task forgetting (Chaudhry et al. 2018): best earlier accuracy minus the final one.

    f_j = max_{t_j <= s < S - 1} acc[s][j] - acc[S - 1][j] for tasks with t_j < S - 1; NaN for the others.

    Returns:
        (J,) values; positive is forgetting.
    """
    a = _as_matrix(acc, "acc")
    owner = _check_stages(task_stage, a.shape[1], a.shape[0], "task_stage")
    last = a.shape[0] - 1
    out: list[float] = []
    for j in range(a.shape[1]):
        if owner[j] >= last:
            out.append(math.nan)
            continue
        out.append(float(np.nanmax(a[owner[j] : last, j]) - a[last, j]))
    return out


def recon_increase(recon: Matrix, modality_stage: Sequence[int]) -> list[float]:
    """Rise of each earlier modality's held-out reconstruction loss from its own stage to the end.

    r_m = recon[S - 1][m] - recon[t_m][m] for modalities with t_m < S - 1; NaN for the last one.
    Positive values are forgetting (the loss got worse).

    Returns:
        (M,) values.
    """
    r = _as_matrix(recon, "recon")
    owner = _check_stages(modality_stage, r.shape[1], r.shape[0], "modality_stage")
    last = r.shape[0] - 1
    return [float(r[last, m] - r[owner[m], m]) if owner[m] < last else math.nan for m in range(r.shape[1])]


@dataclass(frozen=True)
class MeanSd:
    """Mean and sample standard deviation (ddof = 1; NaN for a single value: no spread is known) over seeds."""

    mean: float
    sd: float
    n: int


def mean_sd(values: Sequence[float]) -> MeanSd:
    """Mean ± sample standard deviation of finite `values` (NaN when none is finite)."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return MeanSd(math.nan, math.nan, 0)
    sd = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
    return MeanSd(float(finite.mean()), sd, int(finite.size))


def elementwise_mean_sd(matrices: Sequence[Matrix]) -> tuple[np.ndarray, np.ndarray]:
    """Cell-wise mean and sample sd over same-shaped matrices (one per seed); NaN cells stay NaN.

    Returns:
        mean (S, J) and sd (S, J); sd is NaN where fewer than two seeds have a finite value.
    """
    if not matrices:
        raise MetricError("no matrices to average")
    stack = np.stack([_as_matrix(m, "matrix") for m in matrices])
    mean = np.full(stack.shape[1:], math.nan)
    sd = np.full(stack.shape[1:], math.nan)
    for idx in np.ndindex(*stack.shape[1:]):
        cell = mean_sd(list(stack[(slice(None), *idx)]))
        mean[idx], sd[idx] = cell.mean, cell.sd
    return mean, sd


# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (standard table values); beyond 30 the
# value for 30 is used, slightly wider than the true one (1.96 in the limit). Kept instead of scipy.stats.t.ppf:
# a lookup, hundreds of times faster, and the report's intervals are defined by this table
# (benchmarks/bench_library_numerics.py).
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t975(df: int) -> float:
    """Two-sided 95 % Student-t quantile for `df` ≥ 1 degrees of freedom (table; 2.042 beyond 30)."""
    if df < 1:
        raise MetricError(f"t quantile needs at least 1 degree of freedom, got {df}")
    return _T975[min(df, len(_T975)) - 1]


@dataclass(frozen=True)
class PairedDifference:
    """Mean ± sample sd over the seeds both methods ran of (a − b), its standard error and 95 % t-interval."""

    mean: float
    sd: float
    se: float  # sd / sqrt(n); NaN with fewer than two common seeds
    n: int

    @property
    def ci95(self) -> tuple[float, float]:
        """95 % confidence interval of the mean difference (Student t, n − 1 df); NaNs below two seeds."""
        if self.n < 2 or not math.isfinite(self.se):
            return (math.nan, math.nan)
        half = t975(self.n - 1) * self.se
        return (self.mean - half, self.mean + half)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> PairedDifference:
    """Per-seed differences a[seed] − b[seed] over the seeds both hold a finite value for.

    Methods that share a seed share its first stage and data order, so the paired difference removes the part of
    the seed-to-seed spread the two have in common: the same mean difference, usually a much smaller sd.

    Args:
        a, b: seed id → value (e.g. avg_prev per seed).
    """
    common = sorted(k for k in a if k in b)
    diffs = [a[k] - b[k] for k in common if math.isfinite(a[k]) and math.isfinite(b[k])]
    ms = mean_sd(diffs)
    se = ms.sd / math.sqrt(ms.n) if ms.n > 1 else math.nan
    return PairedDifference(ms.mean, ms.sd, se, ms.n)


def sign_test_p(losses: int, n: int) -> float:
    """One-sided sign test: the chance that at least `losses` of `n` seeds lose if losing and not losing were
    equally likely (no forgetting). All 5 of 5 seeds losing gives 1/32 ≈ 0.031; 3 of 3 only 1/8. The exact sum,
    kept instead of scipy.stats.binom.sf: the same values, far faster (benchmarks/bench_library_numerics.py).

    Raises:
        MetricError: unless 0 <= losses <= n and n >= 1.
    """
    if n < 1 or not 0 <= losses <= n:
        raise MetricError(f"sign test needs 0 <= losses <= n and n >= 1, got {losses} of {n}")
    return sum(math.comb(n, i) for i in range(losses, n + 1)) / 2**n
