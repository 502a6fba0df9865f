"""``invcoss data check``: read every image of a site folder and say what is usable, and why not."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from invcoss_core.config import DataConfig, ModalitySpec
from invcoss_core.data.dataset import read_image_parts, resolve_modality_folder
from invcoss_core.data.discovery import discover_images
from invcoss_core.data.errors import ImageReadError
from invcoss_core.data.preprocess import prepare_image
from invcoss_core.data.sampling import plan_split

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileCheck:
    """One image (file or DICOM series) of the folder: its facts when usable, the reason when not."""

    name: str
    usable: bool
    reason: str = ""  # why it was rejected, or notes for a usable image
    subject: str | None = None
    source_format: str | None = None
    shape: tuple[int, ...] | None = None  # stored shape (RGB: with the colour axis last)
    spacing: tuple[float, ...] | None = None  # mm per spatial axis, None when the file does not say
    dtype: str | None = None
    value_range: tuple[float, float] | None = None  # stored values (CT: HU), min and max
    working_shape: tuple[int, ...] | None = None  # after resampling to the working grid


@dataclass
class CheckReport:
    """All files of one modality folder with their verdicts."""

    folder: Path
    modality: str
    files: list[FileCheck] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    split_note: str = ""

    @property
    def usable(self) -> list[FileCheck]:
        """Images that can be trained on."""
        return [f for f in self.files if f.usable]

    @property
    def rejected(self) -> list[FileCheck]:
        """Files that were refused, each with its reason."""
        return [f for f in self.files if not f.usable]

    @property
    def subjects(self) -> list[str]:
        """Subjects of the usable images."""
        return sorted({f.subject for f in self.usable if f.subject is not None})


def check_site_data(root: Path, modality: str, spec: ModalitySpec, data_cfg: DataConfig | None = None) -> CheckReport:
    """Read every image of a site's modality folder and record its shape, spacing and value range or its reject.

    Args:
        root: the site data folder (``root/<modality>/`` when it exists, else ``root``).
        modality: modality name.
        spec: the model's input specification for the modality.
        data_cfg: used for the train/validation split summary; defaults to DataConfig().

    Returns:
        A CheckReport; ``usable`` is empty when the site cannot train.

    Raises:
        SiteDataError: when the folder does not exist.
    """
    data_cfg = data_cfg or DataConfig()
    folder = resolve_modality_folder(Path(root), modality)
    discovery = discover_images(folder, group_dicom_series=spec.spatial_dims == 3)
    report = CheckReport(folder, modality, ignored=list(discovery.ignored))
    report.files.extend(FileCheck(name, False, reason) for name, reason in discovery.rejected)
    for source in discovery.sources:
        try:
            raw = read_image_parts(source, modality, spec, count=1)[0]  # a whole slide: its richest region
            prepared = prepare_image(raw, modality, spec)
        except ImageReadError as err:
            report.files.append(FileCheck(source.name, False, err.reason, source.subject, source.source_format))
            continue
        report.files.append(
            FileCheck(
                name=source.name,
                usable=True,
                reason="; ".join(prepared.notes),
                subject=source.subject,
                source_format=source.source_format,
                shape=tuple(raw.array.shape),
                spacing=raw.spacing,
                dtype=raw.source_dtype,
                value_range=(float(raw.array.min()), float(raw.array.max())),
                working_shape=tuple(prepared.array.shape[1:]),
            )
        )
    report.files.sort(key=lambda f: (not f.usable, f.name))
    if report.subjects:
        plan = plan_split(report.subjects, "train", data_cfg.val_fraction, 0)
        report.split_note = plan.note
    logger.info("checked %s: %d usable, %d rejected", modality, len(report.usable), len(report.rejected))
    return report
