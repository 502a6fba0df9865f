"""The benchmark's plan: which (method, seed) jobs run, in which order, and how they are split into shards."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from invcoss_core.evaluation.bench.status import BenchError
from invcoss_core.evaluation.settings import METHODS


class Job(NamedTuple):
    """One method and seed to run; jobs sort core methods seed by seed first, then the ablations."""

    ablation: bool
    seed: int  # 0-based
    position: int  # the method's place in the requested order
    method: str


def plan_jobs(methods: Sequence[str], seeds: Mapping[str, int], shard: tuple[int, int] = (0, 1)) -> list[Job]:
    """The jobs of one run (or of one shard of it), in the order they run.

    Core methods go seed by seed first and the ablations last, so an interrupted run still holds whole
    comparisons. Shard i of n takes the core seeds with seed % n == i and every n-th ablation job.

    Args:
        methods: names from `METHODS`, in the requested order.
        seeds: method -> number of seeds to run.
        shard: (i, n): the i-th of n disjoint parts of the plan.
    Returns:
        the jobs of the shard, in run order.
    Raises:
        BenchError: for a shard that does not exist.
    """
    jobs = sorted(Job(METHODS[m].ablation, seed, methods.index(m), m) for m in methods for seed in range(seeds[m]))
    index, parts = shard
    if not 0 <= index < parts:
        raise BenchError(f"shard {index}/{parts} does not exist; use i/n with 0 <= i < n")
    ablations = [job for job in jobs if job.ablation]
    return [
        job
        for job in jobs
        if (ablations.index(job) if job.ablation else job.seed) % parts == index  # ablations one by one, core by seed
    ]
