"""Feature statistics: per-channel mean and variance of each encoder block's input tokens, per modality.

The ViT has LayerNorm only, so there are no BatchNorm running statistics to invert against; these recorded
aggregates play that role for the inversion's L_norm. They are aggregates over many tokens, never images.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from invcoss_core.models import MultiModalMAE


@contextmanager
def capture_block_inputs(model: MultiModalMAE) -> Iterator[list[torch.Tensor]]:
    """Collect each encoder block's input patch tokens during the forward passes run inside the context.

    Yields:
        a list that fills with one (B, L_visible, D) tensor per block and forward pass (CLS excluded), in block
        order; tensors keep their autograd graph, so the inversion can differentiate through them.
    """
    captured: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured.append(args[0][:, 1:])

    handles = [block.register_forward_pre_hook(hook) for block in model.encoder.blocks]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def stat_key(modality: str, block: int, which: str) -> str:
    """Key of one statistic in stats.safetensors, e.g. `ct.block0.mean`."""
    return f"{modality}.block{block}.{which}"


class FeatureStatsRecorder:
    """Accumulates exact per-channel mean / variance (float64 sums) of block inputs for one modality."""

    def __init__(self, model: MultiModalMAE, modality: str) -> None:
        model.spec(modality)
        self.model = model
        self.modality = modality
        depth = len(model.encoder.blocks)
        width = model.cfg.hidden_size
        self._sum = torch.zeros(depth, width, dtype=torch.float64)
        self._sumsq = torch.zeros(depth, width, dtype=torch.float64)
        self._count = 0

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record the block inputs of the forward passes run inside the context (one pass at a time)."""
        with capture_block_inputs(self.model) as captured:
            yield
            if captured:
                self._add(captured)

    def _add(self, captured: list[torch.Tensor]) -> None:
        depth = self._sum.shape[0]
        if len(captured) % depth:
            raise RuntimeError(f"captured {len(captured)} block inputs for a {depth}-block encoder")
        if self._sum.device != captured[0].device:  # sum where the tokens are: no per-step copy off a GPU
            self._sum, self._sumsq = self._sum.to(captured[0].device), self._sumsq.to(captured[0].device)
        for i, tokens in enumerate(captured):
            flat = tokens.detach().reshape(-1, tokens.shape[-1]).to(torch.float64)
            self._sum[i % depth] += flat.sum(0)
            self._sumsq[i % depth] += flat.pow(2).sum(0)
            if i % depth == 0:
                self._count += flat.shape[0]

    @property
    def count(self) -> int:
        """Tokens recorded per block."""
        return self._count

    def result(self) -> dict[str, torch.Tensor]:
        """The statistics as float32 tensors keyed by `stat_key`, plus `<modality>.tokens` (count).

        Raises:
            RuntimeError: when nothing was recorded.
        """
        if self._count == 0:
            raise RuntimeError(f"no feature statistics were recorded for {self.modality}")
        mean = self._sum.cpu() / self._count
        var = (self._sumsq.cpu() / self._count - mean.pow(2)).clamp_min(0.0)
        out: dict[str, torch.Tensor] = {f"{self.modality}.tokens": torch.tensor([float(self._count)])}
        for block in range(mean.shape[0]):
            out[stat_key(self.modality, block, "mean")] = mean[block].float()
            out[stat_key(self.modality, block, "var")] = var[block].float()
        return out


def modality_stats(stats: Mapping[str, torch.Tensor], modality: str, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked recorded statistics of one modality.

    Returns:
        mean (depth, D) and var (depth, D).
    Raises:
        KeyError: when the artifact holds no statistics for `modality`.
    """
    try:
        means = torch.stack([stats[stat_key(modality, b, "mean")] for b in range(depth)])
        variances = torch.stack([stats[stat_key(modality, b, "var")] for b in range(depth)])
    except KeyError:
        raise KeyError(f"no recorded feature statistics for modality {modality!r}") from None
    return means, variances


def merge_stats(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Carry earlier modalities' statistics forward; a modality recorded again replaces its old entries."""
    fresh = {key.split(".", 1)[0] for key in new}
    merged = {k: v for k, v in old.items() if k.split(".", 1)[0] not in fresh}
    merged.update(new)
    return merged
