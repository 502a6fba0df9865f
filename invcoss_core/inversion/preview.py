"""A PNG contact sheet of synthetic images (3D volumes show their middle slice), for eyes, not for training."""

from __future__ import annotations

import io
import math

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["preview_png"]


def preview_png(images: torch.Tensor, max_images: int = 32, columns: int = 8, title: str | None = None) -> bytes:
    """Render up to `max_images` images as one PNG grid.

    Args:
        images: (N, C, H, W) or (N, C, D, H, W) values in [0, 1]; C = 1 is drawn grey, C = 3 as RGB, other
            channel counts show their first channel. 3D images show the middle slice along D.
        max_images: the first images shown; columns: grid width.
        title: optional figure title.
    Returns:
        PNG file bytes (matplotlib's Agg canvas; no display and no global pyplot state).
    Raises:
        ValueError: for another rank or an empty batch.
    """
    if images.dim() not in (4, 5) or images.shape[0] == 0:
        raise ValueError(f"preview_png needs (N, C, H, W) or (N, C, D, H, W) with N > 0; got {tuple(images.shape)}")
    shown = images[:max_images].detach().float().cpu().clamp(0, 1)
    if shown.dim() == 5:
        shown = shown[:, :, shown.shape[2] // 2]
    n = shown.shape[0]
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(1.2 * cols, 1.2 * rows + (0.4 if title else 0.0)), dpi=100)
    FigureCanvasAgg(fig)
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_axis_off()
        if i >= n:
            continue
        image = shown[i]
        if image.shape[0] == 3:
            ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
        else:
            ax.imshow(image[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9 if title else 0.99, wspace=0.05, hspace=0.05)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
