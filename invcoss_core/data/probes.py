"""Labelled probe tasks for the frozen-encoder evaluation, cut from the sample data at the model's input size.

``DEST/labels/tasks.json`` (written by ``invcoss samples fetch``) lists, per task, the images and their label
sources; patches are cut here, after the same preprocessing as training (so one label set serves every profile).

Tasks (real labels unless ``pseudo``):
- ``mri_tissue``: tissue class of the patch-centre voxel from the MNI152 2009a probability maps: grey matter,
  white matter, or CSF/background (1 - GM - WM), where the winning probability is ≥ 0.6; centres inside the head.
- ``ct_tumour`` / ``mri_tumour``: patch centred in the pyradiomics tumour mask vs a patch of foreground without
  any tumour voxel.
- ``ct_hu_tissue``: Hounsfield class of the centre voxel: air/lung ≤ -600, fat -150…-50, soft tissue 0…100,
  bone ≥ 300 (values in between are not used); at least 10 % of the patch is body (> -500 HU). Physics, not an
  annotator, but real images.
- ``pathology_stain`` (pseudo): H&E vs IHC, the stain of the slide a tissue patch comes from.
- ``pathology_hematoxylin`` (pseudo): haematoxylin optical density of an H&E tissue patch (Ruifrok-Johnston colour
  deconvolution) below / above the median of all such patches.

Splits keep a subject on one side (30 % of subjects for testing, seeded, chosen so every class is on both sides).
When no such subject split exists (one subject, or a class from one subject only), the split is by region: the
first 70 % of each image's longest axis is for training, the rest for testing, and patches that straddle the cut
are dropped. ``ProbeSet.split_note`` says which.

Besides that primary split, ``ProbeSet.folds`` holds cross-validation folds over the same samples (the primary
split first): with a subject split, every other choice of test subjects that keeps every class on both sides
(leave-one-subject-out for two to four subjects); with a region split, the mirrored cut (the first 30 % tests).
With two subjects and one held-out subject per fold, one fold alone measures the shift between two patients as
much as the encoder; the mean over folds tests every subject once.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from invcoss_core.config import ModalitySpec
from invcoss_core.data.discovery import ImageSource, discover_images, source_for_file
from invcoss_core.data.errors import ImageReadError, ProbeTaskTooSmallError, SiteDataError
from invcoss_core.data.preprocess import foreground_threshold, pad_value, prepare_image, resample
from invcoss_core.data.readers import read_image
from invcoss_core.data.sampling import (
    TISSUE_FRACTION,
    crop,
    fit_size,
    grid_starts,
    stable_seed,
    tissue_fraction,
    voxels,
)

logger = logging.getLogger(__name__)

TASKS_FILE = Path("labels") / "tasks.json"
TEST_FRACTION = 0.3  # share of subjects (or of each image's longest axis) used for testing
MAX_FOLDS = 5  # cross-validation folds kept per task (the primary split included)
TISSUE_CONFIDENCE = 0.6
HU_CLASSES: tuple[tuple[str, float, float], ...] = (
    ("air_lung", -math.inf, -600.0),
    ("fat", -150.0, -50.0),
    ("soft_tissue", 0.0, 100.0),
    ("bone", 300.0, math.inf),
)
BODY_HU = -500.0
MIN_BODY_FRACTION = 0.1
PROBE_MEMORY_BUDGET = 256 << 20  # bytes of patches one task may hold; sets the default per-class cap
MAX_PER_CLASS = 200

TASK_DEFINITIONS: dict[str, dict[str, Any]] = {
    "mri_tissue": {
        "modality": "mri",
        "kind": "tissue_maps",
        "classes": ["csf_background", "grey_matter", "white_matter"],
        "pseudo": False,
        "description": "tissue class of the patch centre from the MNI152 2009a GM/WM maps",
    },
    "mri_tumour": {
        "modality": "mri",
        "kind": "mask",
        "classes": ["normal", "tumour"],
        "pseudo": False,
        "description": "patch centred in the pyradiomics tumour mask vs tumour-free foreground patch",
    },
    "ct_tumour": {
        "modality": "ct",
        "kind": "mask",
        "classes": ["normal", "tumour"],
        "pseudo": False,
        "description": "patch centred in the pyradiomics lung tumour mask vs tumour-free body patch",
    },
    "ct_hu_tissue": {
        "modality": "ct",
        "kind": "hu_tissue",
        "classes": [c for c, _, _ in HU_CLASSES],
        "pseudo": False,
        "description": "Hounsfield class of the centre voxel (air/lung, fat, soft tissue, bone)",
    },
    "pathology_stain": {
        "modality": "pathology",
        "kind": "image_label",
        "classes": ["he", "ihc"],
        "pseudo": True,
        "description": "stain of the source slide (H&E vs IHC): a pseudo-label, not a diagnosis",
    },
    "pathology_hematoxylin": {
        "modality": "pathology",
        "kind": "hematoxylin_density",
        "classes": ["low", "high"],
        "pseudo": True,
        "description": "haematoxylin density of an H&E patch below/above the median (colour deconvolution)",
    },
}

# Ruifrok & Johnston H&E-DAB stain vectors (as scikit-image's rgb2hed).
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


@dataclass(frozen=True)
class ProbeTaskInfo:
    """A probe task as listed in ``labels/tasks.json``."""

    name: str
    modality: str
    classes: list[str]
    pseudo: bool
    description: str
    n_images: int


@dataclass(frozen=True)
class ProbeSet:
    """Labelled model inputs of one probe task with a train/test split."""

    task: str
    x: torch.Tensor  # (N, C, *img_size) float32 in [0, 1]
    y: torch.Tensor  # (N,) int64 class indices into `classes`
    subjects: list[str]  # subject of each sample
    classes: list[str]
    modality: str
    pseudo: bool  # True: labels are pseudo-labels (say so in reports)
    train_mask: torch.Tensor  # (N,) bool; test = ~train_mask (the primary split: folds[0])
    split_note: str  # "subject-level ..." or "region-level ..." and why
    folds: torch.Tensor | None = None  # (K, N) int8 per fold: 1 train, 0 test, -1 unused; row 0 = train_mask

    @property
    def num_folds(self) -> int:
        """Cross-validation folds available (1 when only the primary split exists)."""
        return 1 if self.folds is None else int(self.folds.shape[0])


@dataclass
class _Samples:
    patches: list[np.ndarray] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)
    # For a region-level split: crop start and image length along the image's longest axis.
    axis_start: list[int] = field(default_factory=list)
    axis_length: list[int] = field(default_factory=list)
    crop_length: list[int] = field(default_factory=list)

    def add(
        self,
        patch: np.ndarray,
        label: int,
        subject: str,
        start: np.ndarray,
        shape: tuple[int, ...],
        size: tuple[int, ...],
    ) -> None:
        axis = int(np.argmax(shape))
        self.patches.append(patch)
        self.labels.append(label)
        self.subjects.append(subject)
        self.axis_start.append(int(start[axis]))
        self.axis_length.append(int(shape[axis]))
        self.crop_length.append(int(size[axis]))


def _read_tasks(root: Path) -> dict[str, Any]:
    path = Path(root) / TASKS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SiteDataError(f"no probe tasks in {root}: {TASKS_FILE} is missing; run `invcoss samples fetch`") from None
    except (OSError, ValueError) as err:
        raise SiteDataError(f"cannot read {path}: {err}") from None
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, dict):
        raise SiteDataError(f"{path} has no 'tasks' table")
    required = {"modality": str, "kind": str, "classes": list, "pseudo": bool, "items": list}
    for name, entry in tasks.items():
        fields = entry if isinstance(entry, dict) else {}
        bad = [key for key, kind in required.items() if not isinstance(fields.get(key), kind)]
        if bad:
            raise SiteDataError(
                f"{path}: task {name!r} lacks valid {bad}; rebuild it with `invcoss samples fetch --force`"
            )
    return tasks


def list_probe_tasks(root: Path) -> list[ProbeTaskInfo]:
    """The probe tasks available under a sample-data folder.

    Args:
        root: the folder written by ``invcoss samples fetch`` (holds ``labels/tasks.json``).

    Returns:
        One ProbeTaskInfo per task, sorted by name.

    Raises:
        SiteDataError: when the task file is missing or malformed.
    """
    infos = []
    for name, entry in sorted(_read_tasks(root).items()):
        infos.append(
            ProbeTaskInfo(
                name,
                str(entry["modality"]),
                list(entry["classes"]),
                bool(entry["pseudo"]),
                str(entry.get("description", "")),
                len(entry.get("items", [])),
            )
        )
    return infos


def default_max_per_class(spec: ModalitySpec, n_classes: int) -> int:
    """Per-class cap so that a task's patches stay within PROBE_MEMORY_BUDGET (at most MAX_PER_CLASS)."""
    per_sample = 4 * spec.in_channels * voxels(spec.img_size)
    return int(max(16, min(MAX_PER_CLASS, PROBE_MEMORY_BUDGET // (per_sample * max(1, n_classes)))))


def load_probe_task(
    root: Path, task: str, spec: ModalitySpec, seed: int = 0, max_per_class: int | None = None
) -> ProbeSet:
    """Cut the labelled patches of one probe task at the model's input size, with a subject-level split.

    Args:
        root: the sample-data folder (holds ``labels/tasks.json`` and the images it names).
        task: task name (see ``list_probe_tasks``).
        spec: the model's input specification for the task's modality.
        seed: sets which patches are drawn and which subjects are held out.
        max_per_class: cap on samples per class; default from a 256 MiB budget, at most 200.

    Returns:
        A ProbeSet (x, y, subjects, classes, modality, pseudo, train_mask, split_note).

    Raises:
        SiteDataError: for an unknown task, a missing or unreadable image or label, or a task with no samples.
    """
    root = Path(root)
    tasks = _read_tasks(root)
    if task not in tasks:
        raise SiteDataError(f"unknown probe task {task!r}; {root} has {sorted(tasks)}")
    entry = tasks[task]
    modality, kind, classes = str(entry["modality"]), str(entry["kind"]), list(entry["classes"])
    cap = max_per_class or default_max_per_class(spec, len(classes))
    items = list(entry.get("items", []))
    if not items:
        raise SiteDataError(f"probe task {task!r} lists no images")
    per_item = math.ceil(2 * cap / len(items))
    samples = _Samples()
    for index, item in enumerate(items):
        rng = np.random.default_rng(stable_seed(seed, task, index))
        _sample_item(root, item, kind, modality, spec, classes, per_item, rng, samples)
    if kind == "hematoxylin_density":
        _label_by_median(samples)
    keep = _cap_classes(samples.labels, len(classes), cap, np.random.default_rng(stable_seed(seed, task, "cap")))
    if not keep.size:
        raise ProbeTaskTooSmallError(f"probe task {task!r}: no labelled patch could be cut at size {spec.img_size}")
    all_flags, note = _split(samples, keep, len(classes), seed, task)
    flags = all_flags[0]
    final = keep[~np.isnan(flags[keep])]
    sides = {"train": int(np.sum(flags[final] == 1.0)), "test": int(np.sum(flags[final] == 0.0))}
    empty = [side for side, count in sides.items() if count == 0]
    if empty:
        raise ProbeTaskTooSmallError(
            f"probe task {task!r}: no patch of size {spec.img_size} lies on the {' or '.join(empty)} side of its "
            f"split ({note}; {len(keep)} patches cut): its images are too small for this input size. Use a "
            "profile with smaller inputs, or leave the task out of the probes"
        )
    x = torch.from_numpy(np.stack([samples.patches[i] for i in final]).astype(np.float32))
    y = torch.tensor([samples.labels[i] for i in final], dtype=torch.int64)
    subjects = [samples.subjects[i] for i in final]
    mask = torch.from_numpy(flags[final] == 1.0)
    folds = torch.from_numpy(np.nan_to_num(np.stack([f[final] for f in all_flags]), nan=-1.0).astype(np.int8))
    logger.info("probe %s: %d samples (%d train), %s", task, len(y), int(mask.sum()), note)
    return ProbeSet(task, x, y, subjects, classes, modality, bool(entry["pseudo"]), mask, note, folds)


def _source(root: Path, rel: str, spatial_dims: int) -> ImageSource:
    path = root / rel
    if path.is_dir():
        found = discover_images(path, group_dicom_series=spatial_dims == 3).sources
        if len(found) != 1:
            raise SiteDataError(f"{rel}: expected one image (DICOM series), found {len(found)}")
        return found[0]
    try:
        return source_for_file(path)
    except ImageReadError as err:
        raise SiteDataError(f"{rel}: {err.reason} (run `invcoss samples fetch --force`?)") from None


def _read_map(root: Path, rel: str, shape: tuple[int, ...], out_shape: tuple[int, ...]) -> np.ndarray:
    """A label or probability map on the image's working grid (float32, linear interpolation)."""
    try:
        raw = read_image((root / rel,), _source(root, rel, 3).source_format)
    except ImageReadError as err:
        raise SiteDataError(f"label map {rel}: {err.reason}") from None
    if raw.spatial_shape != shape:
        raise SiteDataError(f"label map {rel} has shape {raw.spatial_shape}, its image {shape}")
    return resample(raw.array[None], out_shape)[0]


def _sample_item(
    root: Path,
    item: dict[str, Any],
    kind: str,
    modality: str,
    spec: ModalitySpec,
    classes: list[str],
    per_item: int,
    rng: np.random.Generator,
    samples: _Samples,
) -> None:
    rel = str(item["image"])
    subject = str(item.get("subject", rel))
    source = _source(root, rel, spec.spatial_dims)
    try:
        raw = read_image(source.paths, source.source_format)
        prepared = prepare_image(raw, modality, spec)
    except ImageReadError as err:
        raise SiteDataError(f"probe image {rel}: {err.reason}") from None
    size = tuple(spec.img_size)
    image = fit_size(prepared.array, size, pad_value(prepared.kind))
    shape = tuple(image.shape[1:])

    def padded(values: np.ndarray, fill: float) -> np.ndarray:
        return fit_size(values[None], size, fill)[0]

    if kind in ("image_label", "hematoxylin_density"):
        cells = grid_starts(shape, size)
        label = classes.index(str(item["label"])) if kind == "image_label" else -1
        taken = 0
        for index in rng.permutation(len(cells))[: per_item * 4]:
            patch = crop(image, cells[index], size)
            if tissue_fraction(patch) >= TISSUE_FRACTION:
                samples.add(patch, label, subject, cells[index], shape, size)
                taken += 1
                if taken >= per_item:
                    break
        return

    work_shape = tuple(prepared.array.shape[1:])
    labels = np.full(shape, -1, dtype=np.int8)
    require_zero: np.ndarray | None = None  # summed-area table: normal crops must not touch these voxels (tumour)
    body: np.ndarray | None = None  # summed-area table: crops must hold MIN_BODY_FRACTION of these voxels
    if kind == "tissue_maps":
        maps = [_read_map(root, str(item["maps"][name]), raw.spatial_shape, work_shape) for name in classes[1:]]
        probs = [padded(_unit_scale(m), 0.0) for m in maps]
        other = np.clip(1.0 - sum(probs), 0.0, 1.0)
        stacked = np.stack([other, *probs])
        winner = stacked.argmax(axis=0)
        confident = stacked.max(axis=0) >= TISSUE_CONFIDENCE
        head = image[0] > foreground_threshold(prepared.kind)
        labels[confident & head] = winner[confident & head]
    elif kind == "mask":
        mask = padded(_read_map(root, str(item["mask"]), raw.spatial_shape, work_shape), 0.0) > 0.5
        foreground = image[0] > foreground_threshold(prepared.kind)
        labels[foreground & ~mask] = classes.index("normal")
        labels[mask] = classes.index("tumour")
        require_zero = _summed_area(mask)
    elif kind == "hu_tissue":
        hu = padded(prepared.values, -1024.0)
        for index, (_, low, high) in enumerate(HU_CLASSES):
            labels[(hu >= low) & (hu <= high)] = index
        body = _summed_area(hu > BODY_HU)
    else:
        raise SiteDataError(f"unknown probe task kind {kind!r} in {TASKS_FILE}")
    half = np.array(size) // 2
    inner = tuple(slice(int(h), int(n - (s - h) + 1)) for h, n, s in zip(half, shape, size))
    centres_ok = np.full(shape, -1, dtype=np.int8)  # labels where a centred crop fits inside the image
    centres_ok[inner] = labels[inner]
    flat = centres_ok.ravel()
    for label in range(len(classes)):
        index = np.flatnonzero(flat == label)
        if not index.size:
            continue
        if index.size > per_item * 4:  # a few random candidates, not millions of voxels
            index = np.unique(index[rng.integers(0, index.size, per_item * 4)])
            index = index[rng.permutation(index.size)]
        starts = np.stack(np.unravel_index(index, shape), axis=1) - half
        if require_zero is not None and label == classes.index("normal"):
            starts = starts[_box_sums(require_zero, starts, size) == 0]
        if body is not None:
            starts = starts[_box_sums(body, starts, size) >= MIN_BODY_FRACTION * voxels(size)]
        for start in starts[:per_item]:
            samples.add(crop(image, start, size), label, subject, start, shape, size)


def _unit_scale(values: np.ndarray) -> np.ndarray:
    """Probability maps stored as 0–255 (the MNI 'converted' maps) or 0–1, as 0–1."""
    peak = float(values.max())
    return values / 255.0 if 1.0 < peak <= 255.0 else values / max(peak, 1.0)


def _summed_area(volume: np.ndarray) -> np.ndarray:
    """Summed-area table of a boolean volume, padded with a leading zero plane per axis."""
    table = volume.astype(np.int32)
    for axis in range(table.ndim):
        np.cumsum(table, axis=axis, out=table)
    return np.pad(table, [(1, 0)] * table.ndim)


def _box_sums(table: np.ndarray, starts: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Number of True voxels in each crop, from a summed-area table (one lookup per corner)."""
    total = np.zeros(len(starts), dtype=np.int64)
    for corner in itertools.product((0, 1), repeat=table.ndim):
        index = tuple(starts[:, a] + corner[a] * size[a] for a in range(table.ndim))
        sign = (-1) ** (table.ndim - sum(corner))
        total += sign * table[index]
    return total


def hematoxylin_density(patch: np.ndarray) -> float:
    """Mean haematoxylin optical density of an RGB (3, H, W) patch in [0, 1] (Ruifrok-Johnston deconvolution)."""
    rgb = np.clip(patch.reshape(3, -1).T, 1e-6, 1.0)
    optical = np.log(rgb) / np.log(1e-6)
    return float(np.maximum(optical @ _HED_FROM_RGB, 0.0)[:, 0].mean())


def _label_by_median(samples: _Samples) -> None:
    density = np.array([hematoxylin_density(p) for p in samples.patches])
    if not density.size:
        return
    threshold = float(np.median(density))
    samples.labels = [int(d > threshold) for d in density]


def _cap_classes(labels: list[int], n_classes: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    array = np.array(labels, dtype=np.int64)
    keep: list[np.ndarray] = []
    for label in range(n_classes):
        members = np.flatnonzero(array == label)
        if len(members) > cap:
            members = rng.choice(members, size=cap, replace=False)
        keep.append(members)
    return np.sort(np.concatenate(keep)) if keep else np.array([], dtype=np.int64)


def _covers(labels: np.ndarray, is_test: np.ndarray, present: list[int]) -> bool:
    """True when every present class has samples on both sides of the split."""
    return all(np.any(labels[is_test] == c) and np.any(labels[~is_test] == c) for c in present)


def _split(samples: _Samples, keep: np.ndarray, n_classes: int, seed: int, task: str) -> tuple[list[np.ndarray], str]:
    """Per-fold, per-sample train flags (1.0 train, 0.0 test, NaN unused) over every sample index, and a note.

    The first fold is the primary split (see the module docstring); the others are the cross-validation folds.
    """
    labels = np.array(samples.labels)
    subjects = np.array(samples.subjects)
    present = sorted(set(labels[keep].tolist()))
    names = sorted(set(subjects[keep].tolist()))
    if len(names) >= 2:
        count = min(len(names) - 1, max(1, round(len(names) * TEST_FRACTION)))
        rng = np.random.default_rng(stable_seed(seed, task, "subjects"))
        for _ in range(200):
            order = rng.permutation(len(names))
            test = {names[i] for i in order[:count]}
            if _covers(labels[keep], np.isin(subjects[keep], list(test)), present):
                break
        else:
            test = set()
        if test:
            others = [set(group) for group in itertools.combinations(names, count) if set(group) != test]
            shuffle = np.random.default_rng(stable_seed(seed, task, "folds")).permutation(len(others))
            folds = []
            for group in [test] + [others[i] for i in shuffle]:
                is_test = np.isin(subjects[keep], list(group))
                if _covers(labels[keep], is_test, present):
                    flags = np.full(len(labels), np.nan)
                    flags[keep] = (~is_test).astype(float)
                    folds.append(flags)
                if len(folds) == MAX_FOLDS:
                    break
            note = f"subject-level split: test subjects {sorted(test)} of {len(names)}"
            return folds, note + f"; {len(folds)} cross-validation folds over the subjects"
    folds = []
    for test_first in (False, True):  # primary: the last 30 % tests; mirrored: the first 30 % tests
        flags = np.full(len(labels), np.nan)
        for i in keep:
            start = samples.axis_start[i]
            cut = round(samples.axis_length[i] * (TEST_FRACTION if test_first else 1.0 - TEST_FRACTION))
            before, after = start + samples.crop_length[i] <= cut, start >= cut
            if before or after:
                flags[i] = float(after if test_first else before)
        folds.append(flags)
    why = "one subject" if len(names) < 2 else "no subject split puts every class on both sides"
    note = (
        f"region-level split ({why}): first {1 - TEST_FRACTION:.0%} of each image's longest axis trains, "
        "the rest tests; patches across the cut dropped"
    )
    train = folds[0][keep]
    missing = [
        c
        for c in present
        if not (np.any((labels[keep] == c) & (train == 1.0)) and np.any((labels[keep] == c) & (train == 0.0)))
    ]
    if missing:
        note += f"; classes {missing} are not on both sides"
    usable = keep[~np.isnan(folds[0][keep]) & ~np.isnan(folds[1][keep])]
    if not missing and _covers(labels[usable], folds[1][usable] == 0.0, present):
        return folds, note + "; a second fold tests the first 30 % instead"
    return folds[:1], note
