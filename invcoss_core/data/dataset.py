"""A site's training data: read its modality folder, reject bad files with reasons, cut model inputs.

``load_site_dataset`` is what the stage trainer calls. Samples are small, so all of them are cut once at
construction (deterministic given the seed) and kept as one float32 tensor.

Splits keep a subject on one side: with two or more subjects, ``data.val_fraction`` of them (at least one) are
held out for ``split="val"``; with a single subject, each image's longest axis is cut instead and the report says
so. Only the images of the requested split are read, so a bad file of the other split is reported when that
split is loaded (``invcoss data check`` reads them all).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from invcoss_core.config import DataConfig, ModalitySpec
from invcoss_core.data.discovery import Discovery, ImageSource, discover_images, source_for_file
from invcoss_core.data.errors import ImageReadError, SiteDataError
from invcoss_core.data.preprocess import PreparedImage, modality_kind, pad_value, prepare_image
from invcoss_core.data.readers import FORMAT_TIFF, RawImage, parser_errors_as_rejects, read_image
from invcoss_core.data.sampling import (
    Bounds,
    cap_indices,
    centre_input,
    fit_size,
    plan_split,
    region_bounds,
    region_overlaps,
    sample_patches,
    stable_seed,
)
from invcoss_core.data.slides import read_slide_regions, whole_slide_shape

logger = logging.getLogger(__name__)

Split = Literal["train", "val", "all"]


@dataclass
class LoadReport:
    """What loading a site folder did: files used, files rejected with reasons, how samples were drawn."""

    modality: str
    folder: str
    split: str
    split_mode: str  # "subject", "region" or "all"
    loaded: list[str] = field(default_factory=list)  # names of the images that gave samples
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)
    ignored: list[str] = field(default_factory=list)  # side files (README, subjects.csv, JSON)
    subjects: list[str] = field(default_factory=list)  # subjects that contributed samples
    samples_per_file: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def files_loaded(self) -> int:
        """Number of images that contributed samples."""
        return len(self.loaded)

    @property
    def files_rejected(self) -> int:
        """Number of files refused (reasons in ``rejected``)."""
        return len(self.rejected)

    @property
    def n_samples(self) -> int:
        """Samples in the dataset."""
        return sum(self.samples_per_file.values())

    def summary(self) -> str:
        """One line for logs and CLIs (counts only: no file names)."""
        return (
            f"{self.modality} [{self.split}, {self.split_mode} split]: {self.n_samples} samples from "
            f"{self.files_loaded} images of {len(self.subjects)} subjects; {self.files_rejected} files rejected"
        )


class TensorImages(Dataset[torch.Tensor]):
    """Images already in memory as one stacked (N, C, *spatial) tensor; item i is ``images[i]`` (not copied)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]

    def tensors(self) -> torch.Tensor:
        """All images, (N, C, *spatial) (shared, not copied)."""
        return self.images


class SiteDataset(TensorImages):
    """Precomputed model inputs of one site and modality: item i is a float32 tensor of ``spec.input_shape``.

    `tensors()` is every sample stacked, (N, C, *img_size) float32 in [0, 1]; `subjects[i]` names sample i's subject.
    """

    def __init__(self, samples: torch.Tensor, subjects: list[str], report: LoadReport) -> None:
        if samples.ndim < 3 or samples.shape[0] != len(subjects):
            raise ValueError(f"samples {tuple(samples.shape)} and {len(subjects)} subjects do not match")
        super().__init__(samples)
        self.subjects = subjects
        self.report = report


def resolve_modality_folder(root: Path, modality: str) -> Path:
    """``root/<modality>`` when that folder exists, else ``root`` itself.

    Raises:
        SiteDataError: when the folder does not exist or is not a folder.
    """
    root = Path(root)
    candidate = root / modality
    if candidate.is_dir():
        return candidate
    if not root.exists():
        raise SiteDataError(f"site data folder {root} does not exist; point --site-data at your image folder")
    if not root.is_dir():
        raise SiteDataError(f"site data path {root} is not a folder")
    return root


def read_image_parts(
    source: ImageSource, modality: str, spec: ModalitySpec, count: int | None = None
) -> list[RawImage]:
    """Read one image: whole, or — a pathology slide over the size limit — as regions of its full resolution.

    A whole slide (`slides.whole_slide_shape`) is read as tissue regions of its full-resolution level, so that its
    patches have the magnification of every other slide: with `count` None the training regions (drawn on tissue,
    seeded by the file's name so that every split and run reads the same ones), else the `count` regions with most
    tissue (`invcoss embed`, `invcoss data check`).

    Returns:
        One RawImage, or one per region of a whole slide.

    Raises:
        ImageReadError: with the reason the image cannot be used.
    """
    if source.source_format == FORMAT_TIFF and len(source.paths) == 1 and modality_kind(modality, spec) == "pathology":
        with parser_errors_as_rejects(FORMAT_TIFF):
            if whole_slide_shape(source.paths[0]) is not None:
                rng = np.random.default_rng(stable_seed(source.name, "slide regions")) if count is None else None
                return read_slide_regions(source.paths[0], rng, count)
    return [read_image(source.paths, source.source_format)]


def load_prepared_parts(
    source: ImageSource, modality: str, spec: ModalitySpec, count: int | None = None
) -> list[PreparedImage]:
    """Read (`read_image_parts`), validate and preprocess one image; one PreparedImage per part.

    Raises:
        ImageReadError: with the reason the image cannot be used.
    """
    return [prepare_image(raw, modality, spec) for raw in read_image_parts(source, modality, spec, count)]


def _no_data_error(folder: Path, modality: str, discovery: Discovery, rejected: list[tuple[str, str]]) -> str:
    lines = [f"no usable image for modality '{modality}' in {folder}"]
    if rejected:
        lines.append(f"{len(rejected)} files were rejected, e.g.:")
        lines.extend(f"  - {name}: {reason}" for name, reason in rejected[:5])
    elif not discovery.sources:
        lines.append("the folder holds no image files (.nii/.nii.gz, .nrrd, .dcm, .png, .jpg, .tif/.tiff/.svs)")
    lines.append(f"inspect it with: invcoss data check --site-data {folder} --modality {modality}")
    return "\n".join(lines)


def load_site_dataset(
    root: Path,
    modality: str,
    spec: ModalitySpec,
    data_cfg: DataConfig,
    split: Split = "train",
    seed: int = 0,
) -> SiteDataset:
    """Load a site's images of one modality as model inputs.

    Args:
        root: the site data folder; ``root/<modality>/`` is used when it exists, else ``root`` itself.
        modality: modality name (``ct``, ``mri``, ``pathology``, ``xray`` or any name the model knows).
        spec: the model's input specification for this modality (``input_shape`` of every sample).
        data_cfg: samples per image, sample cap, validation share, strict mode.
        split: "train", "val" (held-out subjects, or held-out regions with one subject) or "all".
        seed: sets which subjects are held out and where samples are cut.

    Returns:
        A SiteDataset of float32 tensors of shape ``spec.input_shape`` in [0, 1], with per-sample subjects and a
        LoadReport.

    Raises:
        SiteDataError: when the folder is missing, nothing usable is found, a strict-mode file is rejected, or the
            split is not available (val with val_fraction 0).
    """
    folder = resolve_modality_folder(Path(root), modality)
    discovery = discover_images(folder, group_dicom_series=spec.spatial_dims == 3)
    rejected = list(discovery.rejected)
    if not discovery.sources:
        raise SiteDataError(_no_data_error(folder, modality, discovery, rejected))
    try:
        plan = plan_split(discovery.subjects, split, data_cfg.val_fraction, seed)
    except ValueError as err:
        raise SiteDataError(str(err)) from None
    report = LoadReport(
        modality, str(folder), split, plan.mode, rejected=rejected, ignored=list(discovery.ignored), notes=[plan.note]
    )
    chosen = [source for source in discovery.sources if source.subject in plan.subjects]
    per_file = data_cfg.samples_per_volume
    if data_cfg.max_samples is not None:  # never cut (and hold) far more samples than the cap keeps
        per_file = min(per_file, max(1, math.ceil(data_cfg.max_samples / len(chosen))))
    chunks: list[np.ndarray] = []
    subjects: list[str] = []
    for source in chosen:
        try:
            parts = load_prepared_parts(source, modality, spec)
        except ImageReadError as err:
            report.rejected.append((source.name, err.reason))
            logger.debug("rejected %s: %s", source.name, err.reason)
            continue
        cut: list[np.ndarray] = []
        for index, prepared in enumerate(parts):  # a whole slide's regions share the file's samples
            wanted = per_file // len(parts) + (1 if index < per_file % len(parts) else 0)
            if wanted == 0:
                continue
            image = fit_size(prepared.array, spec.img_size, pad_value(prepared.kind))
            bounds: Bounds | None = None
            if plan.mode == "region":
                part = "val" if split == "val" else "train"
                bounds = region_bounds(image.shape[1:], spec.img_size, data_cfg.val_fraction, part)
                if region_overlaps(image.shape[1:], spec.img_size, data_cfg.val_fraction):
                    report.notes.append(f"{source.name}: too small to keep train and val regions apart")
            rng = np.random.default_rng(stable_seed(seed, source.name, split, *([index] if index else [])))
            cut.append(sample_patches(image, prepared.kind, spec.img_size, wanted, rng, bounds))
            report.notes.extend(f"{source.name}: {note}" for note in prepared.notes)
        patches = np.concatenate(cut)
        chunks.append(patches)
        subjects.extend([source.subject] * len(patches))
        report.loaded.append(source.name)
        report.samples_per_file[source.name] = len(patches)
    if data_cfg.strict and report.rejected:
        listed = "\n".join(f"  - {name}: {reason}" for name, reason in report.rejected[:20])
        raise SiteDataError(
            f"strict mode: {report.files_rejected} files in {folder} were rejected:\n{listed}\n"
            "fix or remove them, or set data.strict = false to skip them"
        )
    if not chunks:
        raise SiteDataError(_no_data_error(folder, modality, discovery, report.rejected))
    samples = np.concatenate(chunks)
    keep = cap_indices(len(samples), data_cfg.max_samples, np.random.default_rng(stable_seed(seed, "cap", split)))
    if len(keep) < len(samples):
        report.notes.append(f"capped at data.max_samples = {data_cfg.max_samples} of {len(samples)} samples")
        samples = samples[keep]
        subjects = [subjects[i] for i in keep]
        kept_per_file: dict[str, int] = {}
        owners = np.repeat(list(report.samples_per_file), list(report.samples_per_file.values()))
        for i in keep:
            kept_per_file[str(owners[i])] = kept_per_file.get(str(owners[i]), 0) + 1
        report.samples_per_file = kept_per_file
    report.subjects = sorted(set(subjects))
    if report.rejected:
        logger.warning(
            "%s: %d files rejected (see the load report or run `invcoss data check`)", modality, report.files_rejected
        )
    logger.info("%s", report.summary())
    tensor = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    expected = (len(subjects), *spec.input_shape)
    if tuple(tensor.shape) != expected:
        raise SiteDataError(f"internal shape mismatch: samples {tuple(tensor.shape)}, expected {expected}")
    return SiteDataset(tensor, subjects, report)


def load_image_for_embedding(path: Path, modality: str, spec: ModalitySpec) -> torch.Tensor:
    """The model's own preprocessing of one image file (or DICOM series folder) into one input.

    3-D: the sub-volume around the foreground's centre at the working spacing; pathology: the centre crop at
    working scale (of a whole slide: of its region with most tissue); X-ray: the whole image (centred square) resized.

    Args:
        path: an image file, or a folder holding one DICOM series.
        modality: modality name.
        spec: the model's input specification for this modality.

    Returns:
        float32 tensor of shape ``spec.input_shape`` in [0, 1].

    Raises:
        ImageReadError: when the file cannot be used (the message names it and says why; a ValueError).
    """
    path = Path(path)
    if path.is_dir():
        discovery = discover_images(path, group_dicom_series=spec.spatial_dims == 3)
        if len(discovery.sources) != 1:
            raise ImageReadError(
                f"{path.name}: a folder with {len(discovery.sources)} images; pass one file or one DICOM series folder"
            )
        source = discovery.sources[0]
    else:
        try:
            source = source_for_file(path)
        except ImageReadError as err:
            raise ImageReadError(f"{path.name}: {err.reason}") from None
    try:
        prepared = load_prepared_parts(source, modality, spec, count=1)[0]
    except ImageReadError as err:
        raise ImageReadError(f"{path.name}: {err.reason}") from None
    image = fit_size(prepared.array, spec.img_size, pad_value(prepared.kind))
    return torch.from_numpy(centre_input(image, prepared.kind, spec.img_size).astype(np.float32))
