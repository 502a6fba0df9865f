"""Test helpers shared across the suite: in-memory image datasets and tiny configs."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from invcoss_core.config import StageConfig, build_config


class TensorImages(Dataset[torch.Tensor]):
    """A dataset over a stacked (N, C, *spatial) tensor."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]

    def tensors(self) -> torch.Tensor:
        return self.images


def structured_images(n: int, shape: tuple[int, ...], seed: int, kind: str = "blobs") -> torch.Tensor:
    """Smooth, learnable images in [0, 1]: sums of random Gaussian bumps (kind=blobs) or stripes."""
    g = torch.Generator().manual_seed(seed)
    c, *spatial = shape
    axes = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in spatial], indexing="ij")
    out = torch.zeros(n, c, *spatial)
    for i in range(n):
        for _ in range(3):
            centre = torch.rand(len(spatial), generator=g) * 2 - 1
            width = 0.2 + 0.4 * torch.rand(1, generator=g)
            if kind == "blobs":
                d2 = sum((a - m) ** 2 for a, m in zip(axes, centre))
                out[i] += torch.exp(-d2 / (2 * width**2))
            else:
                freq = 2 + 4 * torch.rand(1, generator=g)
                out[i] += 0.5 + 0.5 * torch.sin(freq * 3.14 * (axes[0] * centre[0] + axes[-1] * centre[-1]))
    out = out / out.amax(dim=tuple(range(1, out.dim())), keepdim=True).clamp_min(1e-6)
    return out.clamp(0, 1)


def make_config(**sections: Any) -> StageConfig:
    """tiny profile with section overrides, e.g. make_config(replay={"strategy": "ewc"})."""
    return build_config("tiny", sections)
