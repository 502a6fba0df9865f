"""Fuzz: over 1,000 generated malformed files go through the site loader; none crashes it, each is rejected
with a reason, and the valid files beside them are still loaded."""

from __future__ import annotations

import io
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from invcoss_core.config import DataConfig, StageConfig
from invcoss_core.data import load_site_dataset
from tests.invcoss_core.data.conftest import spec_of
from tests.invcoss_core.data.factories import (
    ct_phantom,
    he_tile,
    write_dicom,
    write_nifti,
    write_nrrd,
    write_png,
    write_tiff,
    xray_image,
)

MALFORMED_PER_FOLDER = 520
PERTURBED_PER_FOLDER = 60
EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".dcm", ".png", ".tif", ".svs", ".jpg", "")


def _bytes_of(write: Callable[[Path], object], scratch: Path, name: str) -> bytes:
    path = scratch / name
    write(path)
    data = path.read_bytes()
    path.unlink()
    return data


def _constant(value: bytes) -> Callable[[], bytes]:
    return lambda: value


def _templates(scratch: Path, volume: bool, rng: np.random.Generator) -> dict[str, Callable[[], bytes]]:
    """Valid files of every format as bytes; DICOM is regenerated per call so each file is its own series."""
    grey = ct_phantom((12, 12, 6)) if volume else xray_image((24, 20))
    frames = grey.transpose(2, 1, 0) if volume else grey.astype(np.int16)
    fixed = {
        ".nii.gz": _bytes_of(lambda p: write_nifti(p, grey), scratch, "t.nii.gz"),
        ".nii": _bytes_of(lambda p: write_nifti(p, grey), scratch, "t.nii"),
        ".nrrd": _bytes_of(lambda p: write_nrrd(p, grey, encoding="raw"), scratch, "t.nrrd"),
        ".png": _bytes_of(lambda p: write_png(p, he_tile((24, 24))), scratch, "t.png"),
        ".tif": _bytes_of(lambda p: write_tiff(p, he_tile((24, 24)), "rgb"), scratch, "t.tif"),
    }
    buffer = io.BytesIO()
    from PIL import Image

    Image.fromarray(he_tile((24, 24))).save(buffer, format="JPEG")
    fixed[".jpg"] = buffer.getvalue()
    out: dict[str, Callable[[], bytes]] = {k: _constant(v) for k, v in fixed.items()}
    out[".svs"] = out[".tif"]
    out[".dcm"] = lambda: _bytes_of(lambda p: write_dicom(p, frames), scratch, "t.dcm")
    out[""] = out[".dcm"]
    return out


def _array_file(path: Path, array: np.ndarray) -> None:
    """Write an array in the format the name asks for (used for NaN, constant and wrong-shape cases)."""
    name = path.name
    if name.endswith((".nii", ".nii.gz")):
        write_nifti(path, array)
    elif name.endswith(".nrrd"):
        write_nrrd(path, array)
    else:
        write_tiff(path, array)


def _malformed(
    folder: Path, index: int, rng: np.random.Generator, templates: dict[str, Callable[[], bytes]], volume: bool
) -> str:
    """Write one file that must be rejected; returns its name."""
    kind = index % 11
    ext = EXTENSIONS[int(rng.integers(len(EXTENSIONS)))]
    name = f"m{index:04d}_{kind}{ext or '.bin'}"
    path = folder / name
    if kind == 0:  # empty
        path.write_bytes(b"")
    elif kind == 1:  # random bytes
        path.write_bytes(rng.bytes(int(rng.integers(1, 2048))))
    elif kind in (2, 3, 4):  # truncated valid file (the cut always lands in the pixel data)
        ext = ext if ext in templates and ext not in ("", ".jpg") else ".nii.gz"
        name = f"m{index:04d}_{kind}{ext}"
        path = folder / name
        data = templates[ext]()
        path.write_bytes(data[: max(1, int(len(data) * rng.uniform(0.02, 0.8)))])
    elif kind == 5:  # NaN or inf
        array = rng.normal(size=(10, 10, 6) if volume else (16, 16)).astype(np.float32)
        array[tuple(int(rng.integers(s)) for s in array.shape)] = np.nan if rng.random() < 0.5 else np.inf
        name = f"m{index:04d}_{kind}" + (".nii.gz", ".nrrd", ".tif")[index % 3]
        _array_file(folder / name, array)
    elif kind == 6:  # wrong dimensionality
        shape = ((20,), (16, 16), (8, 8, 4, 3))[index % 3] if volume else ((20,), (8, 8, 6), (6, 6, 4, 2))[index % 3]
        name = f"m{index:04d}_{kind}" + (".nii.gz", ".nrrd")[index % 2]
        _array_file(folder / name, rng.normal(size=shape).astype(np.float32))
    elif kind == 7:  # constant
        shape = (9, 9, 9) if volume else (20, 20)
        name = f"m{index:04d}_{kind}" + (".nii.gz", ".nrrd", ".tif")[index % 3]
        _array_file(folder / name, np.full(shape, float(rng.integers(-5, 5)), np.float32))
    elif kind == 8:  # absurd size in the header
        name = f"m{index:04d}_{kind}" + (".nii", ".nrrd")[index % 2]
        path = folder / name
        if name.endswith(".nii"):
            write_nifti(path, np.ones((2, 2, 2), np.int16))
            header = bytearray(path.read_bytes())
            dims = [int(rng.integers(20000, 32767)) for _ in range(3)]
            struct.pack_into("<4h", header, 40, 3, *dims)
            path.write_bytes(bytes(header))
        else:
            sizes = " ".join(str(int(rng.integers(70000, 10**6))) for _ in range(3))
            path.write_bytes(
                f"NRRD0004\ntype: short\ndimension: 3\nsizes: {sizes}\nencoding: raw\n\n".encode() + rng.bytes(64)
            )
    elif kind == 9:  # non-image content or a misleading extension
        name = f"m{index:04d}_{kind}" + (".txt", ".csv", ".raw", ".nii.gz", ".png")[index % 5]
        path = folder / name
        path.write_text("id,value\n1,2\n" * int(rng.integers(1, 50)))
    else:  # right bytes, wrong reader: a valid file of one format under another format's name
        source = (".png", ".nii.gz", ".tif", ".nrrd")[index % 4]
        target = (".nii", ".dcm", ".nrrd", ".png")[index % 4]
        name = f"m{index:04d}_{kind}{target}"
        (folder / name).write_bytes(templates[source]())
    return name


def _perturbed(folder: Path, index: int, rng: np.random.Generator, templates: dict[str, Callable[[], bytes]]) -> str:
    """A valid file with a few random bytes changed: it may still be valid; it must not crash the loader."""
    ext = EXTENSIONS[int(rng.integers(len(EXTENSIONS) - 1))]
    data = bytearray(templates[ext]())
    for _ in range(int(rng.integers(1, 8))):
        data[int(rng.integers(len(data)))] = int(rng.integers(256))
    name = f"p{index:04d}{ext}"
    (folder / name).write_bytes(bytes(data))
    return name


def _build(root: Path, modality: str, volume: bool, seed: int) -> tuple[set[str], set[str], set[str]]:
    folder = root / modality
    folder.mkdir(parents=True)
    scratch = root / "scratch"
    scratch.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    templates = _templates(scratch, volume, rng)
    malformed = {_malformed(folder, i, rng, templates, volume) for i in range(MALFORMED_PER_FOLDER)}
    perturbed = {_perturbed(folder, i, rng, templates) for i in range(PERTURBED_PER_FOLDER)}
    for i in range(3):
        os.symlink(f"loop{i}b.nii.gz", folder / f"loop{i}a.nii.gz")
        os.symlink(f"loop{i}a.nii.gz", folder / f"loop{i}b.nii.gz")
        malformed |= {f"loop{i}a.nii.gz", f"loop{i}b.nii.gz"}
    if volume:
        valid = {"valid_a.nii.gz", "valid_b.nrrd"}
        write_nifti(folder / "valid_a.nii.gz", ct_phantom(seed=seed), (1.5, 1.5, 3.0))
        write_nrrd(folder / "valid_b.nrrd", ct_phantom(seed=seed + 1), (1.5, 1.5, 3.0))
    else:
        valid = {"valid_a.png", "valid_b.dcm"}
        write_png(folder / "valid_a.png", xray_image(seed=seed))
        write_dicom(folder / "valid_b.dcm", xray_image(seed=seed + 1).astype(np.int16), modality="DX")
    return malformed, perturbed, valid


def test_fuzz_malformed_files_are_each_rejected_and_valid_files_still_load(tmp_path: Path, tiny: StageConfig) -> None:
    started = time.monotonic()
    total_malformed = 0
    for modality, volume, seed in (("ct", True, 1), ("xray", False, 2)):
        root = tmp_path / modality
        malformed, perturbed, valid = _build(root, modality, volume, seed)
        total_malformed += len(malformed)
        dataset = load_site_dataset(
            root, modality, spec_of(tiny, modality), DataConfig(samples_per_volume=2), split="all"
        )
        rejected = dict(dataset.report.rejected)
        loaded = set(dataset.report.loaded)
        assert all(reason.strip() for reason in rejected.values())
        missing = sorted(malformed - set(rejected))
        assert not missing, f"malformed files not rejected: {missing[:10]}"
        assert valid <= loaded, f"valid files not loaded: {valid - loaded}"
        assert not (malformed & loaded)
        unaccounted = perturbed - set(rejected) - loaded
        assert not unaccounted, f"perturbed files neither loaded nor rejected: {sorted(unaccounted)[:10]}"
        assert dataset.tensors().shape[1:] == spec_of(tiny, modality).input_shape
        assert float(dataset.tensors().min()) >= 0.0 and float(dataset.tensors().max()) <= 1.0
    assert total_malformed >= 1000
    assert time.monotonic() - started < 30.0
