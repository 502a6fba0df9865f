"""Test helpers shared across the suite: structured images, tiny configs and a Flower task identity."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from invcoss_core.config import StageConfig, build_config


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


@contextmanager
def task_identity() -> Iterator[None]:
    """Flower builds Messages only inside a task; give unit tests the identity an app process would have."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 2, 3
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
