"""`inversion` (InvCoSS) and `pixel_inversion` replay: synthesise this stage's modality, gate it, hand it on.

During a stage both replay the synthetic pools of earlier modalities (the `PoolReplay` path: mixup + feature
distillation). After the stage they invert the trained model against the recorded statistics, pass the images
through the privacy gate against the site's real training set, and hand on all earlier pools plus this one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch.utils.data import Dataset

from invcoss_core.common.events import ProgressEvent
from invcoss_core.inversion.gate import apply_gate
from invcoss_core.inversion.preview import preview_png
from invcoss_core.inversion.synthesize import Method, Synthesizer, images_needed, mean_pairwise_cosine
from invcoss_core.replay.base import PoolReplay, ReplayContext, ReplayOutcome
from invcoss_core.seeding import derive_seed

logger = logging.getLogger(__name__)

__all__ = ["InversionReplay", "PixelInversionReplay"]


class InversionReplay(PoolReplay):
    """InvCoSS: replay synthetic pools; after the stage, invert the model with an InvUNet and gate the images."""

    name = "inversion"
    method: ClassVar[Method] = "generator"

    def end_stage(
        self, ctx: ReplayContext, real_data: Dataset[torch.Tensor], stats: Mapping[str, torch.Tensor]
    ) -> ReplayOutcome:
        """Synthesise, gate and accumulate this stage's pool.

        Args:
            ctx: the stage's context; `ctx.student` is the trained model (frozen while it is inverted).
            real_data: this stage's real training samples — used only by the privacy gate, never handed on.
            stats: the feature statistics recorded for `ctx.modality`.
        Returns:
            ReplayOutcome with every earlier pool plus this stage's gated images (float16), the gate summary,
            inversion metrics and a PNG preview of this stage's images.
        Raises:
            KeyError: when `stats` has no entries for the modality. InversionError: on a non-finite loss.
        """
        start = time.perf_counter()
        cfg = ctx.config
        num_images = images_needed(cfg.inversion, len(real_data))  # type: ignore[arg-type]
        stage_index = 1 if ctx.incoming is None else ctx.incoming.manifest.stage_index + 1
        generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "inversion", stage_index, ctx.modality))
        synthesizer = Synthesizer(
            ctx.student,
            ctx.modality,
            stats,
            cfg.inversion,
            method=self.method,
            generator=generator,
            device=ctx.device,
            events=ctx.events,
        )
        result = synthesizer.run(num_images)
        inversion_seconds = time.perf_counter() - start

        def regenerate(count: int) -> tuple[torch.Tensor, torch.Tensor]:
            again = synthesizer.run(count)
            return again.images, again.features

        gate_start = time.perf_counter()
        outcome = apply_gate(
            result.images,
            result.features,
            real_data,
            ctx.student,
            ctx.modality,
            cfg.gate,
            regenerate=regenerate,
            device=ctx.device,
        )
        gate_seconds = time.perf_counter() - gate_start
        summary = outcome.summary
        ctx.events(
            ProgressEvent(
                "gate",
                ctx.modality,
                summary.checked,
                summary.checked,
                None,
                {"blocked": float(summary.blocked), "dropped": float(summary.dropped)},
            )
        )
        kept = outcome.images.shape[0]
        if kept == 0:
            logger.warning(
                "privacy gate dropped every synthetic %s image; nothing of this stage is replayed", ctx.modality
            )
        pools = self.accumulate(self.incoming_pools(ctx.incoming), ctx.modality, outcome.images)
        metrics = {
            "inversion_images": float(kept),
            "inversion_seconds": inversion_seconds,
            "inversion_images_per_second": result.images_per_second,
            "inversion_steps": float(result.steps),
            "gate_seconds": gate_seconds,
            **{f"inversion_final_{name}": value for name, value in result.final.items()},
        }
        if kept:
            metrics["gate_nearest_pixel_mean"] = float(outcome.pixel.mean())
            metrics["gate_nearest_feature_mean"] = float(outcome.feature.mean())
        if kept >= 2:
            metrics["inversion_feature_pairwise_cosine"] = mean_pairwise_cosine(outcome.features)
        previews = {ctx.modality: preview_png(outcome.images, title=f"{ctx.modality} ({self.name})")} if kept else {}
        return ReplayOutcome(
            synthetic=pools,
            gate=summary,
            seconds=time.perf_counter() - start,
            metrics=metrics,
            previews=previews,
        )


class PixelInversionReplay(InversionReplay):
    """The "w/o generator" ablation: the same losses and gate, optimising pixels directly."""

    name = "pixel_inversion"
    method: ClassVar[Method] = "pixels"
