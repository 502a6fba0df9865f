"""Feature statistics: per-channel mean and variance of each encoder block's input tokens, per modality.

The ViT has LayerNorm only, so there are no BatchNorm running statistics to invert against; these recorded
aggregates play that role for the inversion's L_norm. They are aggregates over many tokens, never images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

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

    def sufficient(self) -> SufficientStats:
        """What was recorded as exact sums (float64): poolable across sites."""
        return SufficientStats(self.modality, self._count, self._sum.cpu().clone(), self._sumsq.cpu().clone())

    def result(self) -> dict[str, torch.Tensor]:
        """The statistics as float32 tensors keyed by `stat_key`, plus `<modality>.tokens` (count).

        Raises:
            RuntimeError: when nothing was recorded.
        """
        return self.sufficient().to_stats()


@dataclass(frozen=True)
class SufficientStats:
    """Token count and per-channel sums of one modality's block inputs: sites' values add up exactly.

    sum / sumsq: (depth, D) float64. Pooling several sites' values and then taking mean and variance gives the
    statistics of the union of their images (up to float rounding), without any site revealing a token.
    """

    modality: str
    count: int
    sum: torch.Tensor
    sumsq: torch.Tensor

    def __add__(self, other: SufficientStats) -> SufficientStats:
        if other.modality != self.modality or other.sum.shape != self.sum.shape:
            raise ValueError(
                f"cannot pool statistics of {other.modality} {tuple(other.sum.shape)} with "
                f"{self.modality} {tuple(self.sum.shape)}"
            )
        return SufficientStats(self.modality, self.count + other.count, self.sum + other.sum, self.sumsq + other.sumsq)

    def to_stats(self) -> dict[str, torch.Tensor]:
        """Mean and variance per block as float32 tensors keyed by `stat_key`, plus `<modality>.tokens`.

        Raises:
            RuntimeError: when the count is 0.
        """
        if self.count <= 0:
            raise RuntimeError(f"no feature statistics were recorded for {self.modality}")
        mean = self.sum / self.count
        var = (self.sumsq / self.count - mean.pow(2)).clamp_min(0.0)
        out: dict[str, torch.Tensor] = {f"{self.modality}.tokens": torch.tensor([float(self.count)])}
        for block in range(mean.shape[0]):
            out[stat_key(self.modality, block, "mean")] = mean[block].float()
            out[stat_key(self.modality, block, "var")] = var[block].float()
        return out

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The wire form (safetensors): `<modality>.count` (1,), `.sum` and `.sumsq` (depth, D) float64."""
        return {
            f"{self.modality}.count": torch.tensor([self.count], dtype=torch.int64),
            f"{self.modality}.sum": self.sum.to(torch.float64),
            f"{self.modality}.sumsq": self.sumsq.to(torch.float64),
        }

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], modality: str, depth: int, width: int
    ) -> SufficientStats:
        """Parse the wire form, checking names, shapes and values.

        Raises:
            ValueError: for missing keys, wrong shapes, a negative count or non-finite sums.
        """
        expected = {f"{modality}.count", f"{modality}.sum", f"{modality}.sumsq"}
        if set(tensors) != expected:
            raise ValueError(f"sufficient statistics must hold exactly {sorted(expected)}, got {sorted(tensors)}")
        count = tensors[f"{modality}.count"]
        total, sumsq = tensors[f"{modality}.sum"].to(torch.float64), tensors[f"{modality}.sumsq"].to(torch.float64)
        if count.numel() != 1 or int(count.item()) < 0:
            raise ValueError("the token count must be one non-negative integer")
        if total.shape != (depth, width) or sumsq.shape != (depth, width):
            raise ValueError(f"sums must have shape ({depth}, {width}), got {tuple(total.shape)}")
        if not bool(torch.isfinite(total).all() and torch.isfinite(sumsq).all()):
            raise ValueError("sufficient statistics hold NaN or inf")
        return cls(modality, int(count.item()), total, sumsq)


def content_keyed_noise(x: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(B, L) masking noise drawn from a seed that is a hash of each sample's own bytes.

    A sample then gets the same mask whatever batch, order or site it is seen in, so statistics recorded under
    masking add up exactly across sites (`record_sufficient_stats`).
    """
    rows = []
    for sample in x.detach().to("cpu", torch.float32).contiguous():
        digest = hashlib.sha256(sample.numpy().tobytes()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") & ((1 << 63) - 1))
        rows.append(torch.rand(num_patches, generator=generator))
    return torch.stack(rows).to(x.device)


@torch.no_grad()
def record_sufficient_stats(
    model: MultiModalMAE,
    data: Dataset[torch.Tensor],
    modality: str,
    device: torch.device | str,
    batch_size: int = 64,
) -> SufficientStats:
    """Feed `data` once through the masked encoder (content-keyed masks) and return the exact token sums.

    Args:
        data: (C, *img_size) samples of `modality`; they are read, never kept or returned.
    Returns:
        SufficientStats of the block inputs (what a consortium site sends instead of its images).
    """
    device = torch.device(device)
    recorder = FeatureStatsRecorder(model, modality)
    model.eval()
    length = model.spec(modality).num_patches
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False):
        x = batch.to(device)
        with recorder.recording():
            model.forward_encoder(x, modality, noise=content_keyed_noise(x, length))
    return recorder.sufficient()


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
