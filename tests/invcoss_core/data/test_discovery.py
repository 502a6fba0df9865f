"""Folder discovery: DICOM series grouping, subjects, side files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from invcoss_core.data.discovery import discover_images, source_for_file
from invcoss_core.data.readers import FORMAT_DICOM, FORMAT_DICOM_SERIES, FORMAT_NIFTI
from tests.invcoss_core.data.factories import ct_phantom, write_dicom, write_dicom_series, write_nifti


def test_discover_groups_one_series_per_folder_for_volumes(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "pat1", ct_phantom((16, 16, 4)), patient_id="A")
    write_dicom(tmp_path / "single.dcm", ct_phantom((16, 16, 1))[:, :, 0], patient_id="B")
    found = discover_images(tmp_path, group_dicom_series=True)
    kinds = {s.name: (s.source_format, len(s.paths), s.subject) for s in found.sources}
    assert kinds == {"pat1": (FORMAT_DICOM_SERIES, 4, "A"), "single.dcm": (FORMAT_DICOM, 1, "B")}


def test_discover_keeps_dicom_files_apart_for_images(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "pat1", ct_phantom((16, 16, 3)))
    found = discover_images(tmp_path, group_dicom_series=False)
    assert len(found.sources) == 3 and all(s.source_format == FORMAT_DICOM for s in found.sources)


def test_discover_two_series_in_one_folder_get_distinct_names(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "study", ct_phantom((16, 16, 3)), shuffle_names=False)
    for path in (tmp_path / "study").iterdir():
        path.rename(path.with_name("a_" + path.name))
    write_dicom_series(tmp_path / "study", ct_phantom((16, 16, 3), seed=1))
    found = discover_images(tmp_path, group_dicom_series=True)
    assert len(found.sources) == 2
    assert len({s.name for s in found.sources}) == 2 and all(s.name.startswith("study#") for s in found.sources)


def test_subjects_from_table_folder_and_stem(tmp_path: Path) -> None:
    volume = ct_phantom((16, 16, 8))
    write_nifti(tmp_path / "sub-01" / "t1.nii.gz", volume)
    write_nifti(tmp_path / "sub-01" / "t2.nii.gz", volume)
    write_nifti(tmp_path / "scan_a.nii.gz", volume)
    write_nifti(tmp_path / "scan_b.nii.gz", volume)
    (tmp_path / "subjects.csv").write_text("file,subject\nscan_b.nii.gz,patient-7\n")
    found = discover_images(tmp_path, group_dicom_series=True)
    subjects = {s.name: s.subject for s in found.sources}
    assert subjects == {
        "sub-01/t1.nii.gz": "sub-01",
        "sub-01/t2.nii.gz": "sub-01",
        "scan_a.nii.gz": "scan_a",
        "scan_b.nii.gz": "patient-7",
    }
    assert "subjects.csv" in found.ignored and not found.rejected


def test_side_and_hidden_files_are_ignored_not_rejected(tmp_path: Path) -> None:
    write_nifti(tmp_path / "a.nii.gz", ct_phantom((16, 16, 8)))
    for name in ("README.md", "meta.json", ".DS_Store", "LICENSE"):
        (tmp_path / name).write_text("x")
    (tmp_path / "notes.txt").write_text("not an image")
    found = discover_images(tmp_path, group_dicom_series=True)
    assert sorted(found.ignored) == [".DS_Store", "LICENSE", "README.md", "meta.json"]
    assert [name for name, _ in found.rejected] == ["notes.txt"]
    assert "not a supported image file" in found.rejected[0][1]


def test_extensionless_dicom_is_recognised(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "IM0001", ct_phantom((16, 16, 1))[:, :, 0])
    assert source_for_file(path).source_format == FORMAT_DICOM


def test_sources_are_sorted_and_deterministic(tmp_path: Path) -> None:
    for name in ("c", "a", "b"):
        write_nifti(tmp_path / f"{name}.nii.gz", np.ones((4, 4, 4), np.float32))
    first = [s.name for s in discover_images(tmp_path, group_dicom_series=True).sources]
    assert first == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    assert first == [s.name for s in discover_images(tmp_path, group_dicom_series=True).sources]
    assert all(s.source_format == FORMAT_NIFTI for s in discover_images(tmp_path, True).sources)
