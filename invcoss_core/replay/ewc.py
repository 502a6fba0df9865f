"""`ewc`: data-free elastic weight consolidation (online: Fisher diagonals summed over stages)."""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from torch.utils.data import DataLoader, Dataset

from invcoss_core.models import MultiModalMAE
from invcoss_core.replay.base import ReplayContext, ReplayOutcome, ReplayStrategy

EWC = "ewc"


def _encoder_params(model: MultiModalMAE) -> dict[str, torch.nn.Parameter]:
    return {f"encoder.{n}": p for n, p in model.encoder.named_parameters()}


class EWCReplay(ReplayStrategy):
    """Penalises moving encoder weights that mattered (diagonal Fisher of the MAE loss) for earlier stages."""

    name = "ewc"

    def __init__(self) -> None:
        super().__init__()
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def begin_stage(self, ctx: ReplayContext) -> None:
        super().begin_stage(ctx)
        if ctx.incoming is None:
            return
        fisher = ctx.incoming.extras.get(EWC, {})
        self.fisher = {k: v.to(ctx.device) for k, v in fisher.items()}
        self.anchor = {k: ctx.incoming.weights[k].to(ctx.device) for k in self.fisher if k in ctx.incoming.weights}

    def penalty(self, model: MultiModalMAE) -> torch.Tensor | None:
        if not self.fisher or self.ctx is None:
            return None
        params = _encoder_params(model)
        total = torch.zeros((), device=self.ctx.device)
        for name, fisher in self.fisher.items():
            total = total + (fisher * (params[name] - self.anchor[name]).pow(2)).sum()
        return 0.5 * self.ctx.config.replay.ewc_lambda * total

    def end_stage(
        self, ctx: ReplayContext, real_data: Dataset[torch.Tensor], stats: Mapping[str, torch.Tensor]
    ) -> ReplayOutcome:
        start = time.perf_counter()
        model = ctx.student
        model.train()
        params = _encoder_params(model)
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        generator = torch.Generator().manual_seed(ctx.config.seed + 7919)
        loader = DataLoader(real_data, batch_size=ctx.config.train.batch_size, shuffle=True, generator=generator)
        batches = 0
        for batch in loader:
            if batches >= ctx.config.replay.ewc_batches:
                break
            model.zero_grad(set_to_none=True)
            x = batch.to(ctx.device)
            noise = model.masking_noise(x.shape[0], ctx.modality, generator, ctx.device)
            model(x, ctx.modality, noise=noise).loss.backward()
            for name, p in params.items():
                if p.grad is not None:
                    fisher[name] += p.grad.detach().pow(2)
            batches += 1
        model.zero_grad(set_to_none=True)
        merged = {n: (f / max(1, batches)).cpu() for n, f in fisher.items()}
        for name, old in self.fisher.items():
            merged[name] = merged.get(name, torch.zeros_like(old.cpu())) + old.cpu()
        return ReplayOutcome(
            extras={EWC: merged}, seconds=time.perf_counter() - start, metrics={"fisher_batches": float(batches)}
        )
