"""Progress events: the one channel through which long work reports progress (CLI bars, site metrics)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Phase = Literal["train", "stats", "replay", "inversion", "gate", "eval"]


@dataclass(frozen=True)
class ProgressEvent:
    """One step of long-running work.

    phase: what is running; step/total: progress within the phase; epoch: the training epoch (1-based) or None;
    metrics: numbers such as loss, lr and images per second (never patient data).
    """

    phase: Phase
    modality: str
    step: int
    total: int
    epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


EventSink = Callable[[ProgressEvent], None]


def discard(_event: ProgressEvent) -> None:
    """An EventSink that ignores every event."""
