"""The real sample data (fetched once per test session): layout, loading per modality, checks, probe tasks."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from invcoss_core.config import DataConfig, StageConfig
from invcoss_core.data import cli, list_probe_tasks, load_image_for_embedding, load_probe_task, load_site_dataset
from invcoss_core.data.check import check_site_data
from invcoss_core.data.readers import read_dicom_series, read_nifti, read_nrrd
from invcoss_core.data.samples import PINS, default_package_cache
from tests.invcoss_core.data.conftest import spec_of

MODALITIES = ("ct", "mri", "pathology", "xray")


def test_manifest_lists_files_subjects_and_pinned_sources(sample_data: Path) -> None:
    manifest = json.loads((sample_data / "manifest.json").read_text())
    assert set(MODALITIES) <= set(manifest["modalities"])
    for name in MODALITIES:
        entry = manifest["modalities"][name]
        assert entry["files"] and entry["subjects"] and entry["sources"]
        assert all((sample_data / f).exists() for f in entry["files"])
        assert all(len(s["sha256"]) == 64 and s["licence"] and s["version"] for s in entry["sources"])
    assert manifest["total_bytes"] < 100e6
    assert (sample_data / "labels" / "tasks.json").is_file()


@pytest.mark.parametrize("modality", MODALITIES)
def test_every_real_modality_loads_in_the_tiny_profile(sample_data: Path, tiny: StageConfig, modality: str) -> None:
    spec = spec_of(tiny, modality)
    data = DataConfig(samples_per_volume=4)
    train = load_site_dataset(sample_data, modality, spec, data, split="train")
    val = load_site_dataset(sample_data, modality, spec, data, split="val")
    for dataset in (train, val):
        x = dataset.tensors()
        assert tuple(x.shape[1:]) == spec.input_shape and len(x) > 0
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.std()) > 0.02
        assert dataset.report.files_rejected == 0
    assert set(train.subjects).isdisjoint(val.subjects)


def test_real_data_check_reports_every_file_usable(sample_data: Path, tiny: StageConfig) -> None:
    for modality in MODALITIES:
        report = check_site_data(sample_data, modality, spec_of(tiny, modality))
        assert report.usable and not report.rejected, modality
        if modality == "ct":
            assert all(f.value_range is not None and f.value_range[0] <= -1000 for f in report.usable)
    mri = {f.name: f for f in check_site_data(sample_data, "mri", spec_of(tiny, "mri")).files}
    assert mri["brain2"].source_format == "dicom-series" and mri["brain2"].shape == (256, 256, 23)


def test_real_data_check_command(sample_data: Path) -> None:
    result = CliRunner().invoke(
        cli.app, ["data", "check", "--site-data", str(sample_data), "--modality", "xray"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0 and "MONOCHROME1 inverted" in result.output


def test_real_probe_tasks_load(sample_data: Path, tiny: StageConfig) -> None:
    infos = {info.name: info for info in list_probe_tasks(sample_data)}
    assert {"mri_tissue", "mri_tumour", "ct_tumour", "ct_hu_tissue", "pathology_stain"} <= set(infos)
    for name, info in infos.items():
        probe = load_probe_task(sample_data, name, spec_of(tiny, info.modality), seed=0, max_per_class=12)
        assert tuple(probe.x.shape[1:]) == spec_of(tiny, info.modality).input_shape
        assert len(set(probe.y.tolist())) >= 2 and probe.train_mask.any() and (~probe.train_mask).any()
        assert probe.pseudo == name.startswith("pathology"), name


def test_real_embedding_inputs(sample_data: Path, tiny: StageConfig) -> None:
    cases = (
        ("ct", "ct/lung1.nii.gz"),
        ("mri", "mri/brain2"),
        ("pathology", "pathology/cmu_small_region.svs"),
        ("xray", "xray/rg1_chest.dcm"),
    )
    for modality, rel in cases:
        x = load_image_for_embedding(sample_data / rel, modality, spec_of(tiny, modality))
        assert tuple(x.shape) == spec_of(tiny, modality).input_shape and x.dtype == torch.float32


def test_brain2_series_and_its_tumour_mask_read_as_the_source_nrrd_pair(sample_data: Path, tmp_path: Path) -> None:
    """brain2 is stored as a DICOM series with a NIfTI tumour mask; both must read exactly as pyradiomics' own NRRD
    image and label read (all three readers return RAS order). Sample folders of format 2 built before the readers
    reoriented held the mask mirrored along z against the series: this fails on such a folder."""
    pin = next(p for p in PINS if p.name == "pyradiomics")
    sdist = default_package_cache() / pin.filename
    if not sdist.is_file():
        pytest.skip(f"{sdist} is not cached (the sample folder was built elsewhere)")
    with tarfile.open(sdist) as tar:
        for part in ("image", "label"):
            member = tar.extractfile(f"pyradiomics-{pin.version}/data/brain2_{part}.nrrd")
            assert member is not None
            (tmp_path / f"{part}.nrrd").write_bytes(member.read())
    series = read_dicom_series(sorted((sample_data / "mri" / "brain2").iterdir())).array
    mask = read_nifti(sample_data / "labels" / "tumour" / "brain2_mask.nii.gz").array > 0
    assert np.array_equal(series, read_nrrd(tmp_path / "image.nrrd").array)
    assert np.array_equal(mask, read_nrrd(tmp_path / "label.nrrd").array > 0) and mask.any()
