"""Disguised copies: real images altered to slip past a plain similarity check, and the search that still finds them.

`DISGUISES` are the alterations the gate must see through (flip, shift of a few pixels, intensity scale and
offset, added noise, crop-and-resize); `copy_similarity` scores each candidate image by its best normalised
cross-correlation (NCC) with any real sample over the inverse transforms: every flip of one spatial axis (and of
both, in 2D), shifts up to `max_shift` pixels per axis, and zooms that undo a crop of `scales` of the side.
NCC is invariant to intensity scale and offset by construction.

Cost *(ours)*: a coarse pass at half resolution (flips, shifts, the middle zoom) scores every real sample and
keeps each candidate's `candidates_per_image` best; only those are searched at full resolution with every view.
NCC is computed by convolution with box-filtered window norms (no window is materialised); memory is bounded by
the real chunk size and a batch of 64 candidates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

__all__ = ["DISGUISES", "copy_similarity", "disguise"]

Disguise = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return x.flip(-1)


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Shift by 2 pixels along every spatial axis (random signs), edges filled with the image's minimum."""
    out = x
    for axis in range(2, x.ndim):
        step = 2 if int(torch.randint(2, (1,), generator=g)) else -2
        out = out.roll(step, dims=axis)
        edge = [slice(None)] * x.ndim
        edge[axis] = slice(0, step) if step > 0 else slice(step, None)
        out[tuple(edge)] = x.amin()
    return out


def _intensity(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return (0.7 * x + 0.15).clamp(0, 1)


def _noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Gaussian noise of a quarter of the image's own standard deviation (SNR 4), clamped to [0, 1]."""
    sd = float(x.float().std()) * 0.25
    return (x + sd * torch.randn(x.shape, generator=g)).clamp(0, 1)


def _crop_resize(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random crop of 75-90 % of each side (one fraction for all axes), resized back to the full size."""
    size = x.shape[2:]
    fraction = 0.75 + 0.15 * float(torch.rand(1, generator=g))
    side = [max(2, round(fraction * s)) for s in size]
    start = [int(torch.randint(s - c + 1, (1,), generator=g)) for s, c in zip(size, side)]
    crop = x[(slice(None), slice(None), *(slice(a, a + c) for a, c in zip(start, side)))]
    mode = "bilinear" if len(size) == 2 else "trilinear"
    return F.interpolate(crop.float(), size=tuple(size), mode=mode, align_corners=False).clamp(0, 1)


DISGUISES: dict[str, Disguise] = {
    "flip": _flip,
    "shift": _shift,
    "intensity": _intensity,
    "noise": _noise,
    "crop_resize": _crop_resize,
}


def disguise(images: torch.Tensor, name: str, generator: torch.Generator) -> torch.Tensor:
    """Apply the named disguise to a batch (N, C, *S) in [0, 1]; returns float32 (N, C, *S).

    Raises:
        ValueError: for an unknown name.
    """
    if name not in DISGUISES:
        raise ValueError(f"unknown disguise {name!r}; choose one of {', '.join(DISGUISES)}")
    return torch.cat([DISGUISES[name](img[None].float().clone(), generator) for img in images])


def _standardise_rows(rows: torch.Tensor) -> torch.Tensor:
    rows = rows - rows.mean(dim=-1, keepdim=True)
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def _flip_sets(spatial: int) -> list[tuple[int, ...]]:
    axes = [2 + a for a in range(spatial)]
    flips: list[tuple[int, ...]] = [(), *((a,) for a in axes)]
    if spatial == 2:
        flips.append(tuple(axes))
    return flips


def _templates(x: torch.Tensor, scales: Sequence[float], margin: int) -> dict[tuple[int, ...], torch.Tensor]:
    """Inverse-transformed, margin-trimmed views of (N, C, *S), each standardised to zero mean and unit norm.

    Returns:
        {window size t: (N, V, C, *t)}: V views (flips) per zoom that produced a window of that size.
    """
    size = x.shape[2:]
    mode = "bilinear" if len(size) == 2 else "trilinear"
    out: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for scale in (1.0, *scales):
        zoomed = (
            x
            if scale == 1.0
            else F.interpolate(
                x, size=tuple(max(2 * margin + 2, round(scale * s)) for s in size), mode=mode, align_corners=False
            )
        )
        trimmed = zoomed[(slice(None), slice(None), *(slice(margin, z - margin) for z in zoomed.shape[2:]))]
        for flip in _flip_sets(len(size)):
            out.setdefault(tuple(trimmed.shape[2:]), []).append(trimmed.flip(flip) if flip else trimmed)
    result = {}
    for window, views in out.items():
        stacked = torch.stack(views, dim=1)  # (N, V, C, *t)
        flat = _standardise_rows(stacked.reshape(*stacked.shape[:2], -1))
        result[window] = flat.reshape(stacked.shape)
    return result


def _best(templates: dict[tuple[int, ...], torch.Tensor], real: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """(N, M): the best NCC of each candidate's views with any window of each real sample.

    NCC by convolution: the views are zero-mean and unit-norm, so their dot product with a window equals the dot
    product with the centred window; dividing by the window's centred norm (from box sums of x and x²) gives the
    correlation, without materialising the windows.
    """
    conv = F.conv2d if real.ndim == 4 else F.conv3d
    pool = F.avg_pool2d if real.ndim == 4 else F.avg_pool3d
    n = next(iter(templates.values())).shape[0]
    best = torch.full((n, real.shape[0]), -1.0, device=real.device)
    for window, views in templates.items():
        count = real.shape[1] * math.prod(window)
        s1 = pool(real, window, stride=1).sum(dim=1) * math.prod(window)  # (M, *L) sums over channels too
        s2 = pool(real * real, window, stride=1).sum(dim=1) * math.prod(window)
        norm = (s2 - s1 * s1 / count).clamp_min(0).sqrt().flatten(1)  # (M, L)
        valid = norm > 1e-6  # a constant window has no correlation (0), like the gate's pixel measure
        for start in range(0, n, batch):
            part = views[start : start + batch]  # (b, V, C, *t)
            b, v = part.shape[:2]
            dots = conv(real, part.reshape(b * v, *part.shape[2:])).flatten(2)  # (M, b·V, L)
            ncc = torch.where(valid[:, None], dots / norm.clamp_min(1e-6)[:, None], torch.zeros_like(dots))
            score = ncc.reshape(real.shape[0], b, v * ncc.shape[-1]).amax(dim=2).T  # (b, M)
            best[start : start + b] = torch.maximum(best[start : start + b], score)
    return best


def _half(x: torch.Tensor) -> torch.Tensor:
    pool = F.avg_pool2d if x.ndim == 4 else F.avg_pool3d
    return pool(x, 2) if min(x.shape[2:]) >= 8 else x


@torch.no_grad()
def copy_similarity(
    candidates: torch.Tensor,
    real_chunks: Callable[[], Iterator[torch.Tensor]],
    real_at: Callable[[torch.Tensor], torch.Tensor],
    *,
    max_shift: int = 2,
    scales: Sequence[float] = (0.75, 0.8125, 0.875),
    candidates_per_image: int = 8,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best NCC of each candidate with any real sample under flips, shifts and crop-zooms (see the module doc).

    Args:
        candidates: (N, C, *S) images that would leave the site.
        real_chunks: yields the real samples in order, (chunk, C, *S) at a time.
        real_at: (K,) indices → (K, C, *S) real samples (for the full-resolution pass).
        max_shift: the largest shift per axis undone, in pixels (halved in the coarse pass).
        scales: crop sides (fraction of the image) whose zoom is undone.
        candidates_per_image: real samples per candidate searched at full resolution.
    Returns:
        (N,) best NCC in [-1, 1] and (N,) the index of the real sample that gave it (float32 / long, CPU).
    """
    x = candidates.to(device, torch.float32)
    # The coarse pass only ranks: the middle zoom stands in for all of them (a third of the views' cost).
    middle = [sorted(scales)[len(scales) // 2]] if scales else []
    coarse = _templates(_half(x), middle, max(1, max_shift // 2))
    top_val: torch.Tensor | None = None
    top_idx: torch.Tensor | None = None
    offset = 0
    for chunk in real_chunks():
        chunk = chunk.to(device, torch.float32)
        scores = _best(coarse, _half(chunk))  # (N, chunk)
        idx = torch.arange(offset, offset + chunk.shape[0], device=device).expand_as(scores)
        offset += chunk.shape[0]
        vals = scores if top_val is None else torch.cat([top_val, scores], dim=1)
        ids = idx if top_idx is None else torch.cat([top_idx, idx], dim=1)
        k = min(candidates_per_image, vals.shape[1])
        top_val, where = vals.topk(k, dim=1)
        top_idx = ids.gather(1, where)
    if top_idx is None:
        raise ValueError("the copy search needs real samples; the real set is empty")
    best = torch.empty(x.shape[0])
    best_idx = torch.empty(x.shape[0], dtype=torch.long)
    for i in range(x.shape[0]):
        fine = _templates(x[i : i + 1], scales, max_shift)
        real = real_at(top_idx[i].cpu()).to(device, torch.float32)
        score = _best(fine, real)[0]
        j = int(score.argmax())
        best[i], best_idx[i] = float(score[j]), int(top_idx[i, j])
    return best, best_idx
