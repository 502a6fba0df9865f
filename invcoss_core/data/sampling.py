"""Cutting model inputs out of prepared images, and deterministic subject- or region-level splits.

Crops live in a box of allowed coordinates (``Bounds``: one [lo, hi) range per spatial axis); a region-level
split gives the training and validation parts of one image disjoint boxes, so their crops never share a voxel.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from invcoss_core.data.preprocess import Kind, foreground_threshold

Bounds = list[tuple[int, int]]

FOREGROUND_PROBABILITY = 0.9  # share of 3-D crops centred on a foreground voxel
TISSUE_FRACTION = 0.5  # pathology patches need at least this share of tissue pixels
XRAY_CROP_FRACTION = (0.25, 1.0)  # side of a random X-ray crop as a share of the image's short side


def stable_seed(*parts: object) -> list[int]:
    """A numpy seed sequence from a seed and names (crc32), stable across processes and platforms."""
    return [zlib.crc32(str(p).encode("utf-8")) for p in parts]


def full_bounds(shape: Sequence[int]) -> Bounds:
    """Bounds covering the whole image."""
    return [(0, int(s)) for s in shape]


def fit_size(image: np.ndarray, size: Sequence[int], fill: float) -> np.ndarray:
    """Pad a (C, *spatial) image, centred, so that every spatial axis is at least `size`."""
    pads = []
    for have, need in zip(image.shape[1:], size):
        extra = max(0, int(need) - int(have))
        pads.append((extra // 2, extra - extra // 2))
    if not any(a or b for a, b in pads):
        return image
    return np.pad(image, [(0, 0), *pads], mode="constant", constant_values=fill)


def crop(image: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """The (C, *size) block of a (C, *spatial) image starting at `start`."""
    index = (slice(None), *(slice(int(s), int(s) + int(n)) for s, n in zip(start, size)))
    return np.ascontiguousarray(image[index])


def _clamp_bounds(bounds: Bounds, size: Sequence[int]) -> Bounds:
    """Widen any range shorter than the crop so that at least one crop fits (ranges must lie in the image)."""
    out: Bounds = []
    for (lo, hi), n in zip(bounds, size):
        if hi - lo < n:
            lo = max(0, hi - int(n))
            hi = lo + int(n)
        out.append((lo, hi))
    return out


def random_starts(
    shape: Sequence[int],
    size: Sequence[int],
    n: int,
    rng: np.random.Generator,
    bounds: Bounds | None = None,
    foreground: np.ndarray | None = None,
    foreground_probability: float = FOREGROUND_PROBABILITY,
) -> np.ndarray:
    """Start corners of `n` random crops inside `bounds`, centred on foreground voxels with the given probability.

    Args:
        shape: spatial shape of the image.
        size: crop size per axis (the image is at least this large).
        n: number of crops.
        rng: the random generator (owned by the caller).
        bounds: allowed coordinate ranges; defaults to the whole image.
        foreground: optional boolean mask of `shape`; crops prefer to be centred on it.
        foreground_probability: share of crops centred on a foreground voxel when there is one.

    Returns:
        (n, len(shape)) int64 start corners.
    """
    bounds = _clamp_bounds(bounds or full_bounds(shape), size)
    lows = np.array([lo for lo, _ in bounds])
    highs = np.array([hi - int(s) for (_, hi), s in zip(bounds, size)])  # last valid start, inclusive
    half = np.array([int(s) // 2 for s in size])
    starts = lows + np.floor(rng.random((n, len(shape))) * (highs - lows + 1)).astype(np.int64)
    if foreground is not None and n > 0:
        region = foreground[tuple(slice(lo, hi) for lo, hi in bounds)]
        points = np.flatnonzero(region)
        if points.size:
            use = rng.random(n) < foreground_probability
            picks = rng.choice(points, size=int(use.sum()), replace=True)
            centres = np.stack(np.unravel_index(picks, region.shape), axis=1) + lows
            starts[use] = np.clip(centres - half, lows, highs)
    return starts


def grid_starts(shape: Sequence[int], size: Sequence[int], bounds: Bounds | None = None) -> np.ndarray:
    """Start corners of the non-overlapping grid of crops inside `bounds`, (m, len(shape)) int64."""
    bounds = _clamp_bounds(bounds or full_bounds(shape), size)
    axes = [np.arange(lo, hi - int(s) + 1, int(s)) for (lo, hi), s in zip(bounds, size)]
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1).astype(np.int64)


def tissue_mask(rgb: np.ndarray, channel_axis: int = -1) -> np.ndarray:
    """Per pixel of an RGB image in [0, 1]: stained tissue, not white glass or black fill.

    Tissue has a mean below 0.85 and a channel spread above 0.04 (used for patches and whole-slide regions alike).
    """
    mean = rgb.mean(axis=channel_axis)
    spread = rgb.max(axis=channel_axis) - rgb.min(axis=channel_axis)
    return (mean < 0.85) & (spread > 0.04)


def tissue_fraction(patch: np.ndarray) -> float:
    """Share of pixels of an RGB (3, H, W) patch in [0, 1] that are stained tissue, not white glass."""
    return float(np.mean(tissue_mask(patch, channel_axis=0)))


def resized_crop(image: np.ndarray, start: Sequence[int], side: int, size: Sequence[int]) -> np.ndarray:
    """Square (C, side, side) crop of a 2-D (C, H, W) image, area-resized to (C, *size)."""
    block = crop(image, start, (side, side))
    if tuple(block.shape[1:]) == tuple(size):
        return block
    t = torch.from_numpy(block)[None]
    mode = "area" if side >= max(size) else "bilinear"
    if mode == "area":
        out = F.interpolate(t, size=tuple(size), mode="area")
    else:
        out = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)
    return out[0].numpy().clip(0.0, 1.0)


def sample_patches(
    image: np.ndarray,
    kind: Kind,
    size: Sequence[int],
    n: int,
    rng: np.random.Generator,
    bounds: Bounds | None = None,
) -> np.ndarray:
    """Cut `n` model inputs from one prepared image (already padded to at least `size`).

    3-D volumes: random sub-volumes, 90 % centred on foreground. Pathology: tissue cells of the non-overlapping
    grid in random order, topped up with random crops. X-ray: random square crops of 25–100 % of the short side,
    resized to `size`.

    Args:
        image: (C, *spatial) float32 in [0, 1].
        kind: the modality kind.
        size: the model's img_size.
        n: number of inputs to cut.
        rng: the random generator.
        bounds: allowed coordinate ranges (a region-level split); defaults to the whole image.

    Returns:
        (n, C, *size) float32.
    """
    shape = image.shape[1:]
    bounds = _clamp_bounds(bounds or full_bounds(shape), size)
    if len(shape) == 3:
        foreground = image[0] > foreground_threshold(kind)
        starts = random_starts(shape, size, n, rng, bounds, foreground)
        return np.stack([crop(image, s, size) for s in starts])
    if kind == "pathology":
        cells = grid_starts(shape, size, bounds)
        order = rng.permutation(len(cells))
        chosen: list[np.ndarray] = []
        for index in order:
            patch = crop(image, cells[index], size)
            if tissue_fraction(patch) >= TISSUE_FRACTION:
                chosen.append(patch)
                if len(chosen) == n:
                    break
        if len(chosen) < n:
            extra = random_starts(shape, size, n - len(chosen), rng, bounds)
            chosen.extend(crop(image, s, size) for s in extra)
        return np.stack(chosen)
    return np.stack([_random_resized(image, size, rng, bounds) for _ in range(n)])


def _random_resized(image: np.ndarray, size: Sequence[int], rng: np.random.Generator, bounds: Bounds) -> np.ndarray:
    extent = min(hi - lo for lo, hi in bounds)
    low, high = XRAY_CROP_FRACTION
    side = max(min(size), round(extent * (low + (high - low) * rng.random())))
    side = min(side, extent)
    start = [lo + int(rng.integers(0, hi - lo - side + 1)) for lo, hi in bounds]
    return resized_crop(image, start, side, size)


def centre_input(image: np.ndarray, kind: Kind, size: Sequence[int]) -> np.ndarray:
    """The one model input that stands for a whole image (used by ``invcoss embed``).

    3-D: the sub-volume centred on the foreground's centre of mass. Pathology: the centre crop at working scale.
    X-ray: the centred square of the short side, resized (the largest crop seen in training).

    Returns:
        (C, *size) float32.
    """
    shape = image.shape[1:]
    if len(shape) == 3:
        foreground = image[0] > foreground_threshold(kind)
        if foreground.any():
            centre = np.array([float(np.mean(ix)) for ix in np.nonzero(foreground)])
        else:
            centre = np.array(shape, dtype=float) / 2
        start = np.clip(np.round(centre).astype(int) - np.array(size) // 2, 0, np.array(shape) - np.array(size))
        return crop(image, start, size)
    if kind == "pathology":
        start = [(s - n) // 2 for s, n in zip(shape, size)]
        return crop(image, start, size)
    side = min(shape)
    start = [(s - side) // 2 for s in shape]
    return resized_crop(image, start, side, size)


@dataclass(frozen=True)
class SplitPlan:
    """Which part of a folder a split reads: some subjects, or one region of every image."""

    mode: str  # "subject", "region" or "all"
    subjects: frozenset[str]  # subjects whose images are read
    note: str


def split_subjects(subjects: Sequence[str], val_fraction: float, seed: int) -> frozenset[str]:
    """The validation subjects: a seeded shuffle of the sorted names, max(1, round(n · fraction)) of them.

    Requires at least 2 subjects and 0 < val_fraction < 1; at least one subject always stays for training.
    """
    names = sorted(set(subjects))
    count = min(len(names) - 1, max(1, round(len(names) * val_fraction)))
    order = np.random.default_rng(stable_seed(seed, "val-subjects")).permutation(len(names))
    return frozenset(names[i] for i in order[:count])


def plan_split(subjects: Sequence[str], split: str, val_fraction: float, seed: int) -> SplitPlan:
    """Decide how `split` ("train", "val", "all") is drawn from a folder with these subjects.

    Two or more subjects: subject-level (a subject is on one side only). One subject: region-level (each image's
    longest axis is cut at 1 - val_fraction; crops stay on their side of the cut).

    Raises:
        ValueError: for an unknown split, or "val" with val_fraction 0.
    """
    names = frozenset(subjects)
    if split == "all":
        return SplitPlan("all", names, "all subjects, whole images")
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}; use 'train', 'val' or 'all'")
    if val_fraction <= 0:
        if split == "val":
            raise ValueError("data.val_fraction is 0, so there is no validation split; set it above 0")
        return SplitPlan("all", names, "val_fraction is 0: training uses all subjects")
    if len(names) == 1:
        return SplitPlan(
            "region",
            names,
            f"only one subject: split by region (last {val_fraction:.0%} of each image's longest axis is validation)",
        )
    val = split_subjects(sorted(names), val_fraction, seed)
    chosen = val if split == "val" else names - val
    return SplitPlan("subject", frozenset(chosen), f"subject-level split: {len(val)} of {len(names)} subjects held out")


def region_bounds(shape: Sequence[int], size: Sequence[int], val_fraction: float, part: str) -> Bounds:
    """Bounds of the training ("train") or validation ("val") region of one image for a region-level split.

    The longest axis is cut at round(L · (1 - val_fraction)); when a side is shorter than one crop it is widened
    (then the two sides can share voxels, which the caller reports).
    """
    bounds = full_bounds(shape)
    axis = int(np.argmax(shape))
    length = int(shape[axis])
    cut = min(length - 1, max(1, round(length * (1.0 - val_fraction))))
    bounds[axis] = (0, cut) if part == "train" else (cut, length)
    return bounds


def region_overlaps(shape: Sequence[int], size: Sequence[int], val_fraction: float) -> bool:
    """True when a region-level split of this image cannot keep training and validation crops apart."""
    axis = int(np.argmax(shape))
    length = int(shape[axis])
    cut = min(length - 1, max(1, round(length * (1.0 - val_fraction))))
    return cut < size[axis] or length - cut < size[axis]


def cap_indices(n: int, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a seeded subset of at most `cap` of `n` items (all when cap is None or large)."""
    if cap is None or n <= cap:
        return np.arange(n)
    return np.sort(rng.choice(n, size=cap, replace=False))


def voxels(size: Sequence[int]) -> int:
    """Number of pixels/voxels of one input."""
    return math.prod(int(s) for s in size)
