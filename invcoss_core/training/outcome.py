"""What a stage returns and how it fails: results, the FedAvg round window, the stage's errors (no training code).

Kept apart from `stage.py` so that the data-parallel plumbing (`distributed.py`), which `stage.py` uses, can name
them without importing the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from invcoss_core.artifact import Artifact
from invcoss_core.privacy.report import DPSummary

__all__ = ["NonFiniteLossError", "RoundWindow", "StageError", "StageResult", "TrainOutcome"]


class StageError(RuntimeError):
    """A stage cannot start or cannot go on; the message says what to change."""


class NonFiniteLossError(StageError):
    """The loss became NaN or inf; training stops instead of handing on a broken model."""


@dataclass(frozen=True)
class StageResult:
    """What one finished stage produced."""

    files: dict[str, bytes]  # the hand-off artifact, file name -> bytes
    artifact: Artifact
    out_dir: Path | None
    epoch_losses: list[float]  # mean MAE loss on the current modality per epoch
    replay_losses: list[float]  # mean distillation loss per epoch (empty without replay)
    train_seconds: float
    replay_seconds: float  # inversion / k-means / Fisher after training
    images_per_second: float  # real images per second of training
    resumed_from_epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    previews: dict[str, bytes] = field(default_factory=dict)  # modality -> PNG of this stage's synthetic images


@dataclass(frozen=True)
class RoundWindow:
    """The part of a stage's schedule one FedAvg round trains: epochs [first, stop), from given optimizer state."""

    first: int
    stop: int
    optimizer_state: dict[str, Any] | None = None  # the site's state after its previous round; None: fresh


@dataclass(frozen=True)
class TrainOutcome:
    """What `train_stage` returns."""

    stats: dict[str, torch.Tensor]  # recorded feature statistics (empty for a round window)
    history: dict[str, list[float]]  # "loss" and "replay": per-epoch means
    resumed_from_epoch: int
    seconds: float
    seen: int  # real images trained on
    optimizer_state: dict[str, Any]
    dp: DPSummary | None = None  # the DP-SGD guarantee of the whole stage's schedule (None: trained without DP)
