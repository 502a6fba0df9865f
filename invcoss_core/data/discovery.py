"""Finding the images of a site folder: walk it safely, recognise formats, group DICOM series, assign subjects.

Only cheap checks happen here (file type, size, permissions, symlinks, DICOM headers); pixel data is read later,
one image at a time. Every file that is neither used nor a known side file is listed with the reason.

Subjects (what a train/validation split keeps on one side), first match wins:
1. ``subjects.csv`` in the modality folder, lines ``<relative path>,<subject>`` (a folder name covers its files);
2. the DICOM PatientID;
3. the first folder below the modality folder (``sub-01/t1.nii.gz`` → ``sub-01``);
4. the file name without its extensions.
"""

from __future__ import annotations

import csv
import errno
import logging
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from invcoss_core.data.errors import ImageReadError
from invcoss_core.data.readers import (
    FORMAT_DICOM,
    FORMAT_DICOM_SERIES,
    FORMAT_NIFTI,
    FORMAT_NRRD,
    FORMAT_PIL,
    FORMAT_TIFF,
    MAX_FILE_BYTES,
)

logger = logging.getLogger(__name__)

SUBJECTS_FILE = "subjects.csv"

_EXTENSIONS: tuple[tuple[str, str], ...] = (
    (".nii.gz", FORMAT_NIFTI),
    (".nii", FORMAT_NIFTI),
    (".nrrd", FORMAT_NRRD),
    (".nhdr", FORMAT_NRRD),
    (".dcm", FORMAT_DICOM),
    (".dicom", FORMAT_DICOM),
    (".ima", FORMAT_DICOM),
    (".png", FORMAT_PIL),
    (".jpg", FORMAT_PIL),
    (".jpeg", FORMAT_PIL),
    (".tif", FORMAT_TIFF),
    (".tiff", FORMAT_TIFF),
    (".svs", FORMAT_TIFF),
)
# Side files that belong in a data folder but are not images: listed as ignored, not as rejected.
_SIDE_SUFFIXES = (".json", ".md")
_SIDE_PREFIXES = ("readme", "license", "licence", "notice")


@dataclass(frozen=True)
class ImageSource:
    """One image of a site folder: a file, or the slice files of one DICOM series."""

    name: str  # path relative to the modality folder (POSIX); a series: its folder (+ "#<uid tail>" if several)
    paths: tuple[Path, ...]
    source_format: str  # a readers.FORMAT_* name
    subject: str


@dataclass
class Discovery:
    """What a folder holds: usable candidates, rejected files (name, reason) and ignored side files."""

    folder: Path
    sources: list[ImageSource] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def subjects(self) -> list[str]:
        """Distinct subjects of the candidates, sorted."""
        return sorted({s.subject for s in self.sources})


def sniff_format(path: Path) -> str | None:
    """The reader a file needs, from its extension or (extension-less DICOM) its 'DICM' magic.

    Raises:
        OSError: when the file cannot be opened to look at its first bytes.
    """
    lower = path.name.lower()
    for suffix, fmt in _EXTENSIONS:
        if lower.endswith(suffix):
            return fmt
    with open(path, "rb") as fh:
        head = fh.read(132)
    if len(head) == 132 and head[128:132] == b"DICM":
        return FORMAT_DICOM
    return None


def _is_side_file(name: str) -> bool:
    lower = name.lower()
    return lower == SUBJECTS_FILE or lower.endswith(_SIDE_SUFFIXES) or lower.startswith(_SIDE_PREFIXES)


def _strip_extensions(name: str) -> str:
    lower = name.lower()
    for suffix, _ in _EXTENSIONS:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name.split(".")[0] or name


def _read_subjects(folder: Path, discovery: Discovery) -> dict[str, str]:
    path = folder / SUBJECTS_FILE
    if not path.is_file():
        return {}
    mapping: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.reader(fh):
                if len(row) < 2 or not row[0].strip() or row[0].strip().lower() in ("file", "path", "name"):
                    continue
                mapping[row[0].strip().strip("/")] = row[1].strip()
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        discovery.rejected.append((SUBJECTS_FILE, f"cannot read the subject table: {err}"))
    return mapping


def _walk(folder: Path, discovery: Discovery) -> list[tuple[str, Path]]:
    """Regular files below `folder` as (relative name, path); follows folder symlinks once, reports loops."""
    files: list[tuple[str, Path]] = []
    visited: set[str] = set()
    stack: list[Path] = [folder]
    while stack:
        current = stack.pop()
        rel_dir = current.relative_to(folder).as_posix() if current != folder else ""
        real = os.path.realpath(current)
        if real in visited:
            discovery.rejected.append((rel_dir, "symlink loop: this folder was already visited"))
            continue
        visited.add(real)
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except PermissionError:
            discovery.rejected.append((rel_dir or ".", "permission denied: cannot list this folder"))
            continue
        except OSError as err:
            discovery.rejected.append((rel_dir or ".", f"cannot list this folder: {err.strerror or err}"))
            continue
        subdirs: list[Path] = []
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if entry.name.startswith("."):
                discovery.ignored.append(rel)
                continue
            try:
                st = os.stat(entry.path)  # follows symlinks: a loop or a dangling link raises here
            except OSError as err:
                if err.errno == errno.ELOOP:
                    discovery.rejected.append((rel, "symlink loop"))
                elif entry.is_symlink():
                    discovery.rejected.append((rel, "broken symlink: its target does not exist"))
                else:
                    discovery.rejected.append((rel, f"cannot stat: {err.strerror or err}"))
                continue
            if os.path.isdir(entry.path):
                subdirs.append(Path(entry.path))
            elif not os.path.isfile(entry.path):
                discovery.rejected.append((rel, "not a regular file"))
            elif _is_side_file(entry.name):
                discovery.ignored.append(rel)
            elif st.st_size == 0:
                discovery.rejected.append((rel, "empty file (0 bytes)"))
            elif st.st_size > MAX_FILE_BYTES:
                discovery.rejected.append((rel, f"absurd size: {st.st_size} bytes (limit {MAX_FILE_BYTES})"))
            elif not os.access(entry.path, os.R_OK):
                discovery.rejected.append((rel, "permission denied: the file is not readable"))
            else:
                files.append((rel, Path(entry.path)))
        stack.extend(reversed(subdirs))
    return files


def _default_subject(rel: str, mapping: dict[str, str], dicom_patient: str | None) -> str:
    if rel in mapping:
        return mapping[rel]
    parts = rel.split("/")
    for depth in range(len(parts) - 1, 0, -1):
        prefix = "/".join(parts[:depth])
        if prefix in mapping:
            return mapping[prefix]
    if dicom_patient:
        return dicom_patient
    if len(parts) > 1:
        return parts[0]
    return _strip_extensions(parts[0])


def _dicom_header(path: Path) -> Any:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # malformed headers warn at every element; the reject says enough
        return pydicom.dcmread(str(path), stop_before_pixels=True)


def discover_images(folder: Path, group_dicom_series: bool) -> Discovery:
    """List the image candidates of one modality folder, with the reason for every file that is refused.

    Args:
        folder: the modality folder (walked recursively; hidden files and side files are ignored).
        group_dicom_series: True for 3-D modalities: single-frame DICOM files of one SeriesInstanceUID in one
            folder become one volume. False: every DICOM file is its own image.

    Returns:
        A Discovery; sources are sorted by name so that everything downstream is deterministic.
    """
    discovery = Discovery(folder=folder)
    mapping = _read_subjects(folder, discovery)
    series: dict[tuple[str, str], list[tuple[str, Path, str | None, float]]] = defaultdict(list)
    files = _walk(folder, discovery)
    nhdr_data: set[str] = set()
    for rel, path in files:
        if rel.lower().endswith(".nhdr"):
            nhdr_data.update(_nhdr_data_files(path, rel))
    candidates: list[tuple[str, Path, str]] = []
    for rel, path in files:
        if rel in nhdr_data:
            discovery.ignored.append(rel)
            continue
        try:
            fmt = sniff_format(path)
        except PermissionError:
            discovery.rejected.append((rel, "permission denied: the file is not readable"))
            continue
        except OSError as err:
            discovery.rejected.append((rel, f"cannot open: {err.strerror or err}"))
            continue
        if fmt is None:
            suffix = Path(rel).suffix or "(no extension)"
            discovery.rejected.append((rel, f"not a supported image file ({suffix}; no DICOM header)"))
            continue
        candidates.append((rel, path, fmt))

    for rel, path, fmt in candidates:
        if fmt != FORMAT_DICOM:
            discovery.sources.append(ImageSource(rel, (path,), fmt, _default_subject(rel, mapping, None)))
            continue
        try:
            header = _dicom_header(path)
        except Exception as err:  # malformed headers raise arbitrary types
            discovery.rejected.append((rel, f"not a readable DICOM file: {type(err).__name__}: {err}"[:300]))
            continue
        patient = str(header.get("PatientID", "") or "").strip() or None
        frames = int(header.get("NumberOfFrames", 1) or 1) if _is_int(header.get("NumberOfFrames", 1)) else 1
        uid = str(header.get("SeriesInstanceUID", "") or "")
        if group_dicom_series and frames == 1 and uid and "Rows" in header:
            parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
            series[(parent, uid)].append((rel, path, patient, _instance(header)))
        else:
            discovery.sources.append(ImageSource(rel, (path,), FORMAT_DICOM, _default_subject(rel, mapping, patient)))

    per_parent: dict[str, int] = defaultdict(int)
    for parent, _uid in series:
        per_parent[parent] += 1
    for (parent, uid), members in series.items():
        members.sort(key=lambda m: (m[3], m[0]))
        rel0, path0, patient, _ = members[0]
        if len(members) == 1:
            subject = _default_subject(rel0, mapping, patient)
            discovery.sources.append(ImageSource(rel0, (path0,), FORMAT_DICOM, subject))
            continue
        base = parent or "."
        name = base if per_parent[parent] == 1 else f"{base}#{uid[-8:]}"
        subject = _default_subject(rel0, mapping, patient)
        paths = tuple(m[1] for m in members)
        discovery.sources.append(ImageSource(name, paths, FORMAT_DICOM_SERIES, subject))

    discovery.sources.sort(key=lambda s: s.name)
    logger.debug(
        "discovered %d images, %d rejected, %d ignored",
        len(discovery.sources),
        len(discovery.rejected),
        len(discovery.ignored),
    )
    return discovery


def _is_int(value: Any) -> bool:
    try:
        int(value)
    except (TypeError, ValueError):
        return False
    return True


def _instance(header: Any) -> float:
    value = header.get("InstanceNumber")
    try:
        return float(value) if value is not None else 0.0
    except (TypeError, ValueError):
        return 0.0


def _nhdr_data_files(path: Path, rel: str) -> set[str]:
    """Relative names of the data files a detached NRRD header points at (they are not images themselves)."""
    import nrrd

    try:
        header = nrrd.read_header(str(path))
    except Exception:  # a broken header is reported when the image is read
        return set()
    names = header.get("data file") or header.get("datafile")
    if not names or not isinstance(names, str):
        return set()
    parent = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
    return {parent + names.strip()}


def source_for_file(path: Path) -> ImageSource:
    """The ImageSource of one file, with the same checks as a folder walk (subject: the file name).

    Raises:
        ImageReadError: for a missing, empty, unreadable, oversized or unsupported file.
    """
    try:
        st = os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ImageReadError("symlink loop") from None
        raise ImageReadError(f"cannot stat: {err.strerror or err}") from None
    if not os.path.isfile(path):
        raise ImageReadError("not a regular file")
    if st.st_size == 0:
        raise ImageReadError("empty file (0 bytes)")
    if st.st_size > MAX_FILE_BYTES:
        raise ImageReadError(f"absurd size: {st.st_size} bytes (limit {MAX_FILE_BYTES})")
    try:
        fmt = sniff_format(path)
    except OSError as err:
        raise ImageReadError(f"cannot open: {err.strerror or err}") from None
    if fmt is None:
        raise ImageReadError(f"not a supported image file ({path.suffix or '(no extension)'}; no DICOM header)")
    return ImageSource(path.name, (path,), fmt, _strip_extensions(path.name))
