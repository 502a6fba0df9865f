"""Bad site data: every kind of broken file is rejected with a reason naming it; bad sites refuse to start."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from invcoss_core.config import DataConfig, StageConfig
from invcoss_core.data import SiteDataError, load_site_dataset
from invcoss_core.data.check import check_site_data
from tests.invcoss_core.data.conftest import spec_of
from tests.invcoss_core.data.factories import ct_phantom, mri_phantom, write_nifti, write_nrrd, write_png


def _absurd_nifti(path: Path) -> None:
    """A NIfTI header that claims 30000³ voxels over a few bytes of data."""
    write_nifti(path, np.zeros((4, 4, 4), np.int16) + 1)
    data = bytearray(path.read_bytes())
    struct.pack_into("<8h", data, 40, 3, 30000, 30000, 30000, 1, 1, 1, 1)
    path.write_bytes(bytes(data))


def _absurd_png(path: Path) -> None:
    """A PNG whose IHDR claims 100000 × 100000 pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _bad_folder(root: Path) -> dict[str, str]:
    """One file per kind of bad input in an MRI folder; returns name → expected words of the reason."""
    folder = root / "mri"
    folder.mkdir(parents=True)
    (folder / "empty.nii.gz").write_bytes(b"")
    good = gzip.compress(write_nifti(root / "tmp.nii", mri_phantom()).read_bytes())
    (folder / "truncated.nii.gz").write_bytes(good[: len(good) // 2])
    write_nifti(folder / "flat.nii.gz", mri_phantom()[:, :, 12])
    nan = mri_phantom()
    nan[3, 3, 3] = np.nan
    write_nifti(folder / "nan.nii.gz", nan)
    inf = mri_phantom()
    inf[1, 1, 1] = np.inf
    write_nrrd(folder / "inf.nrrd", inf, (1.0, 1.0, 1.0))
    _absurd_nifti(folder / "absurd.nii")
    (folder / "notes.txt").write_text("hello")
    (folder / "data.bin").write_bytes(os.urandom(256))
    write_nifti(folder / "constant.nii.gz", np.full((8, 8, 8), 3.0, np.float32))
    write_png(folder / "photo.png", (mri_phantom()[:, :, 5] / 4).astype(np.uint8))
    os.symlink("loop_b.nii.gz", folder / "loop_a.nii.gz")
    os.symlink("loop_a.nii.gz", folder / "loop_b.nii.gz")
    os.symlink("missing.nii.gz", folder / "dangling.nii.gz")
    (folder / "sub").mkdir()
    os.symlink("..", folder / "sub" / "up")
    return {
        "empty.nii.gz": "empty file",
        "truncated.nii.gz": "truncated",
        "flat.nii.gz": "wrong dimensionality",
        "nan.nii.gz": "NaN",
        "inf.nrrd": "NaN or infinite",
        "absurd.nii": "absurd size",
        "notes.txt": "not a supported image",
        "data.bin": "not a supported image",
        "constant.nii.gz": "constant",
        "photo.png": "wrong dimensionality",
        "loop_a.nii.gz": "symlink loop",
        "loop_b.nii.gz": "symlink loop",
        "dangling.nii.gz": "broken symlink",
        "sub/up": "symlink loop",
    }


def test_each_bad_file_is_rejected_with_its_reason(tmp_path: Path, tiny: StageConfig) -> None:
    expected = _bad_folder(tmp_path)
    write_nifti(tmp_path / "mri" / "good.nii.gz", mri_phantom(), (1.5, 1.5, 1.5))
    dataset = load_site_dataset(tmp_path, "mri", spec_of(tiny, "mri"), DataConfig(samples_per_volume=3), "all")
    reasons = dict(dataset.report.rejected)
    for name, words in expected.items():
        assert name in reasons, f"{name} was not rejected"
        assert words.lower() in reasons[name].lower(), f"{name}: {reasons[name]!r} lacks {words!r}"
    assert dataset.report.loaded == ["good.nii.gz"]
    assert len(dataset) == 3 and dataset.report.files_rejected == len(expected)


def test_unreadable_permissions_are_rejected(tmp_path: Path, tiny: StageConfig) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 files stay readable, nothing to reject")
    folder = tmp_path / "mri"
    write_nifti(folder / "good.nii.gz", mri_phantom(), (1.5, 1.5, 1.5))
    locked = write_nifti(folder / "locked.nii.gz", mri_phantom())
    locked.chmod(0)
    try:
        dataset = load_site_dataset(tmp_path, "mri", spec_of(tiny, "mri"), DataConfig(samples_per_volume=2), "all")
    finally:
        locked.chmod(0o644)
    assert "permission denied" in dict(dataset.report.rejected)["locked.nii.gz"]


def test_unreadable_file_path_is_rejected_even_as_root(
    tmp_path: Path, tiny: StageConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root reads chmod-000 files, so the unreadable case is simulated at the access check."""
    import invcoss_core.data.discovery as discovery

    folder = tmp_path / "mri"
    write_nifti(folder / "good.nii.gz", mri_phantom(), (1.5, 1.5, 1.5))
    locked = write_nifti(folder / "locked.nii.gz", mri_phantom())
    real_access = os.access
    monkeypatch.setattr(discovery.os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    dataset = load_site_dataset(tmp_path, "mri", spec_of(tiny, "mri"), DataConfig(samples_per_volume=2), "all")
    assert dict(dataset.report.rejected) == {"locked.nii.gz": "permission denied: the file is not readable"}


def test_site_without_valid_file_refuses_with_reasons(tmp_path: Path, tiny: StageConfig) -> None:
    _bad_folder(tmp_path)
    with pytest.raises(SiteDataError) as info:
        load_site_dataset(tmp_path, "mri", spec_of(tiny, "mri"), DataConfig(), "all")
    message = str(info.value)
    assert "no usable image for modality 'mri'" in message and "invcoss data check" in message
    assert "empty.nii.gz" in message or "absurd.nii" in message


def test_empty_or_missing_site_folder_refuses(tmp_path: Path, tiny: StageConfig) -> None:
    with pytest.raises(SiteDataError, match="does not exist"):
        load_site_dataset(tmp_path / "nope", "ct", spec_of(tiny, "ct"), DataConfig())
    (tmp_path / "ct").mkdir()
    with pytest.raises(SiteDataError, match="holds no image files"):
        load_site_dataset(tmp_path, "ct", spec_of(tiny, "ct"), DataConfig())


def test_partly_bad_folder_is_used_with_a_count_or_refused_when_strict(tmp_path: Path, tiny: StageConfig) -> None:
    folder = tmp_path / "ct"
    write_nifti(folder / "a.nii.gz", ct_phantom(seed=1), (1.5, 1.5, 3.0))
    write_nifti(folder / "b.nii.gz", ct_phantom(seed=2), (1.5, 1.5, 3.0))
    (folder / "c.nii.gz").write_bytes(b"\x1f\x8b\x08garbage")
    lenient = load_site_dataset(tmp_path, "ct", spec_of(tiny, "ct"), DataConfig(samples_per_volume=2), "all")
    assert lenient.report.files_loaded == 2 and lenient.report.files_rejected == 1
    with pytest.raises(SiteDataError, match=r"(?s)strict mode: 1 files .*c\.nii\.gz"):
        load_site_dataset(tmp_path, "ct", spec_of(tiny, "ct"), DataConfig(strict=True), "all")


def test_absurd_png_is_refused_before_decoding(tmp_path: Path, tiny: StageConfig) -> None:
    folder = tmp_path / "xray"
    folder.mkdir()
    _absurd_png(folder / "huge.png")
    report = check_site_data(tmp_path, "xray", spec_of(tiny, "xray"))
    assert not report.usable
    assert "absurd size" in report.rejected[0].reason
