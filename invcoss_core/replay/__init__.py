"""Replay strategies behind one interface; `build_replay` picks one by its configured name."""

from __future__ import annotations

from invcoss_core.config import StageConfig
from invcoss_core.replay.base import (
    PoolReplay,
    ReplayBatch,
    ReplayContext,
    ReplayError,
    ReplayOutcome,
    ReplayStrategy,
)
from invcoss_core.replay.ewc import EWCReplay
from invcoss_core.replay.inversion import InversionReplay, PixelInversionReplay
from invcoss_core.replay.none import NoReplay
from invcoss_core.replay.real_buffer import RealBufferReplay


def replay_class(name: str) -> type[ReplayStrategy]:
    """The strategy class registered under `name`.

    Raises:
        ReplayError: for an unknown name.
    """
    classes: dict[str, type[ReplayStrategy]] = {
        NoReplay.name: NoReplay,
        RealBufferReplay.name: RealBufferReplay,
        EWCReplay.name: EWCReplay,
        InversionReplay.name: InversionReplay,
        PixelInversionReplay.name: PixelInversionReplay,
    }
    if name not in classes:
        raise ReplayError(
            f"unknown replay strategy {name!r}; choose none, real_buffer, ewc, inversion, pixel_inversion"
        )
    return classes[name]


def build_replay(config: StageConfig) -> ReplayStrategy:
    """A fresh strategy object for one stage, as configured in `config.replay.strategy`."""
    return replay_class(config.replay.strategy)()


__all__ = [
    "EWCReplay",
    "InversionReplay",
    "NoReplay",
    "PixelInversionReplay",
    "PoolReplay",
    "RealBufferReplay",
    "ReplayBatch",
    "ReplayContext",
    "ReplayError",
    "ReplayOutcome",
    "ReplayStrategy",
    "build_replay",
    "replay_class",
]
