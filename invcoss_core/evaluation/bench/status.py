"""Where a benchmark run stands: its status record, the work accounting behind the time-left estimate."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from invcoss_core.common.events import EventSink, ProgressEvent

RESULTS_FILE = "results.json"


class BenchError(RuntimeError):
    """The benchmark cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class BenchStatus:
    """Where the benchmark stands: the running method/seed/stage/phase and the estimated time left."""

    method: str
    seed: int  # 0-based
    seeds: int
    stage: int  # 1-based; 0 while computing baselines
    stages: int
    modality: str
    phase: str  # "baselines", "train", "replay", "inversion", "gate", "eval"
    done: float  # work units done (training-step equivalents)
    total: float
    elapsed: float
    seconds_left: float | None  # None until something was measured
    step: int = 0  # progress within the phase
    steps: int = 0


StatusSink = Callable[[BenchStatus], None]


def ignore_status(_status: BenchStatus) -> None:
    """A StatusSink that drops everything."""


# Relative cost of one optimiser step or evaluation, in plain-training-step units (measured on CPU).
COST_REPLAY_STEP = 1.6
COST_JOINT_STEP = 2.0
COST_EVAL_PER_MODALITY = 60.0
COST_INVERSION_STEP = 1.5


@dataclass
class Tracker:
    total: float
    sink: StatusSink
    started: float = field(default_factory=time.perf_counter)
    done: float = 0.0
    job_units: float = 0.0
    job_fraction: float = 0.0
    where: dict[str, Any] = field(default_factory=dict)

    def begin(self, units: float, **where: Any) -> None:
        self.job_units = units
        self.job_fraction = 0.0
        self.where = where
        self.emit(0, 0)

    def progress(self, fraction: float, step: int, steps: int, phase: str | None = None) -> None:
        self.job_fraction = min(1.0, max(self.job_fraction, fraction))
        if phase is not None:
            self.where["phase"] = phase
        self.emit(step, steps)

    def end(self) -> None:
        self.done += self.job_units
        self.job_units = self.job_fraction = 0.0

    def skip(self, units: float) -> None:
        """Work found on disk: it no longer counts towards the remaining time."""
        self.total = max(0.0, self.total - units)

    def emit(self, step: int, steps: int) -> None:
        done = self.done + self.job_units * self.job_fraction
        elapsed = time.perf_counter() - self.started
        left = elapsed * (self.total - done) / done if done > 0 and elapsed > 5 else None
        w = self.where
        self.sink(
            BenchStatus(
                method=w.get("method", ""),
                seed=w.get("seed", 0),
                seeds=w.get("seeds", 1),
                stage=w.get("stage", 0),
                stages=w.get("stages", 0),
                modality=w.get("modality", ""),
                phase=w.get("phase", ""),
                done=done,
                total=self.total,
                elapsed=elapsed,
                seconds_left=left,
                step=step,
                steps=steps,
            )
        )

    def events(self, forward: EventSink) -> EventSink:
        """A ProgressEvent sink that advances the current job (training steps or inversion steps)."""

        def sink(event: ProgressEvent) -> None:
            forward(event)
            if event.total <= 0:
                return
            fraction = event.step / event.total
            if event.phase == "train":
                self.progress(
                    0.8 * fraction if self.where.get("inversion") else fraction, event.step, event.total, "train"
                )
            elif event.phase == "inversion":
                self.progress(0.8 + 0.2 * fraction, event.step, event.total, "inversion")
            else:
                self.progress(self.job_fraction, event.step, event.total, event.phase)

        return sink
