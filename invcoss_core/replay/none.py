"""`none`: sequential fine-tuning, the lower bound — no replay at all."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.utils.data import Dataset

from invcoss_core.replay.base import ReplayContext, ReplayOutcome, ReplayStrategy


class NoReplay(ReplayStrategy):
    """Trains on the current modality only and hands on the weights alone."""

    name = "none"

    def end_stage(
        self, ctx: ReplayContext, real_data: Dataset[torch.Tensor], stats: Mapping[str, torch.Tensor]
    ) -> ReplayOutcome:
        return ReplayOutcome()
