"""`joint`: the static reference — one stage that trains on every modality at once (bench only).

It rides on the one stage loop: the stage's own modality is the current data, and this strategy feeds real
training batches of the other modalities with the MAE objective (`ReplayBatch(objective="mae")`), cycling
modalities step by step. Real images never leave anything here: it exists for the local benchmark.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.utils.data import Dataset

from invcoss_core.replay.base import ReplayBatch, ReplayContext, ReplayError, ReplayOutcome, ReplayStrategy


class JointReplay(ReplayStrategy):
    """Feeds real batches of the other modalities with the masked-reconstruction loss (joint training)."""

    name = "joint"
    ships_real_data = True

    def __init__(self, data: Mapping[str, torch.Tensor], batch_size: int | None = None) -> None:
        """Args:
        data: modality -> (N, C, *img_size) real training images of the modalities other than the stage's.
        batch_size: images per replay batch; None uses the stage's `train.batch_size` (equal weight per batch).
        """
        super().__init__()
        if not data:
            raise ReplayError("joint training needs the training images of at least one other modality")
        self.data = {m: x for m, x in data.items() if x.shape[0] > 0}
        self.batch_size = batch_size

    def begin_stage(self, ctx: ReplayContext) -> None:
        super().begin_stage(ctx)
        if ctx.modality in self.data:
            raise ReplayError(f"joint replay got images of the stage's own modality {ctx.modality!r}")
        for modality, images in self.data.items():
            spec = ctx.config.model.spec(modality)
            if tuple(images.shape[1:]) != spec.input_shape:
                raise ReplayError(
                    f"joint data of {modality} has shape {tuple(images.shape)}; expected (N, {spec.input_shape})"
                )

    def sample_batch(self, step: int, generator: torch.Generator) -> ReplayBatch | None:
        if self.ctx is None:
            return None
        names = sorted(self.data)
        modality = names[step % len(names)]
        pool = self.data[modality]
        size = min(self.batch_size or self.ctx.config.train.batch_size, pool.shape[0])
        idx = torch.randperm(pool.shape[0], generator=generator)[:size]
        return ReplayBatch(modality=modality, images=pool[idx].to(self.ctx.device), objective="mae")

    def end_stage(
        self, ctx: ReplayContext, real_data: Dataset[torch.Tensor], stats: Mapping[str, torch.Tensor]
    ) -> ReplayOutcome:
        return ReplayOutcome()
