"""load_site_dataset and load_image_for_embedding on generated site folders of every modality."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from invcoss_core.config import DataConfig, StageConfig
from invcoss_core.data import ImageReadError, SiteDataError, load_image_for_embedding, load_site_dataset
from tests.invcoss_core.data.conftest import spec_of
from tests.invcoss_core.data.factories import ct_phantom, write_nifti

MODALITIES = ("ct", "mri", "pathology", "xray")


@pytest.mark.parametrize("modality", MODALITIES)
def test_samples_have_the_input_shape_and_unit_range(
    site: Path, tiny: StageConfig, small_data: DataConfig, modality: str
) -> None:
    spec = spec_of(tiny, modality)
    dataset = load_site_dataset(site, modality, spec, small_data, split="all")
    x = dataset.tensors()
    assert x.dtype == torch.float32 and tuple(x.shape) == (3 * small_data.samples_per_volume, *spec.input_shape)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.std()) > 0.01
    assert len(dataset) == len(dataset.subjects) == dataset.report.n_samples
    assert tuple(dataset[0].shape) == spec.input_shape
    assert dataset.report.files_loaded == 3 and dataset.report.files_rejected == 0


@pytest.mark.parametrize("modality", MODALITIES)
def test_train_and_val_keep_subjects_apart(
    site: Path, tiny: StageConfig, small_data: DataConfig, modality: str
) -> None:
    spec = spec_of(tiny, modality)
    train = load_site_dataset(site, modality, spec, small_data, split="train", seed=5)
    val = load_site_dataset(site, modality, spec, small_data, split="val", seed=5)
    assert set(train.subjects).isdisjoint(val.subjects)
    assert set(train.subjects) | set(val.subjects) == set(train.report.subjects) | set(val.report.subjects)
    assert train.report.split_mode == "subject" and len(train) and len(val)


def test_same_seed_same_samples_other_seed_other_samples(site: Path, tiny: StageConfig, small_data: DataConfig) -> None:
    spec = spec_of(tiny, "ct")
    a = load_site_dataset(site, "ct", spec, small_data, "all", seed=1).tensors()
    b = load_site_dataset(site, "ct", spec, small_data, "all", seed=1).tensors()
    c = load_site_dataset(site, "ct", spec, small_data, "all", seed=2).tensors()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_max_samples_caps_the_dataset(site: Path, tiny: StageConfig) -> None:
    data = DataConfig(samples_per_volume=8, max_samples=5)
    dataset = load_site_dataset(site, "pathology", spec_of(tiny, "pathology"), data, "all")
    assert len(dataset) == 5 and dataset.report.n_samples == 5
    assert any("max_samples" in note for note in dataset.report.notes)


def test_single_subject_splits_by_region_and_says_so(tmp_path: Path, tiny: StageConfig) -> None:
    volume = np.zeros((20, 80, 20), np.int16) - 1000
    volume[:, :64, :] = 40  # soft tissue in the training region
    volume[:, 64:, :] = 800  # bone in the last fifth: validation only
    write_nifti(tmp_path / "ct" / "one.nii.gz", volume, (1.5, 1.5, 1.5))
    data = DataConfig(samples_per_volume=20, val_fraction=0.2)
    train = load_site_dataset(tmp_path, "ct", spec_of(tiny, "ct"), data, "train")
    val = load_site_dataset(tmp_path, "ct", spec_of(tiny, "ct"), data, "val")
    assert train.report.split_mode == "region" and "one subject" in train.report.notes[0]
    bone = (800 + 1000) / 2000
    assert float(train.tensors().max()) < bone - 1e-3
    assert float(val.tensors().min()) == pytest.approx(bone, abs=1e-3)


def test_val_without_val_fraction_is_refused(site: Path, tiny: StageConfig) -> None:
    with pytest.raises(SiteDataError, match="val_fraction is 0"):
        load_site_dataset(site, "ct", spec_of(tiny, "ct"), DataConfig(val_fraction=0.0), "val")


def test_root_may_be_the_modality_folder_itself(site: Path, tiny: StageConfig, small_data: DataConfig) -> None:
    dataset = load_site_dataset(site / "xray", "xray", spec_of(tiny, "xray"), small_data, "all")
    assert dataset.report.files_loaded == 3


def test_embedding_input_of_each_modality(site: Path, tiny: StageConfig) -> None:
    for modality, name in (
        ("ct", "p1.nii.gz"),
        ("ct", "p3"),
        ("mri", "s3.dcm"),
        ("pathology", "h2.tif"),
        ("xray", "x1.dcm"),
    ):
        spec = spec_of(tiny, modality)
        x = load_image_for_embedding(site / modality / name, modality, spec)
        assert tuple(x.shape) == spec.input_shape and x.dtype == torch.float32
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_embedding_of_a_bad_file_names_it(tmp_path: Path, tiny: StageConfig) -> None:
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"nope")
    with pytest.raises(ImageReadError, match=r"broken\.nii\.gz"):
        load_image_for_embedding(bad, "ct", spec_of(tiny, "ct"))
    flat = write_nifti(tmp_path / "flat.nii.gz", ct_phantom()[:, :, 5])
    with pytest.raises(ImageReadError, match="wrong dimensionality"):
        load_image_for_embedding(flat, "ct", spec_of(tiny, "ct"))


def test_small_profile_shapes(site: Path, small_data: DataConfig) -> None:
    from invcoss_core.config import build_config

    small = build_config("small")
    for modality in MODALITIES:
        spec = spec_of(small, modality)
        dataset = load_site_dataset(site, modality, spec, small_data, "all")
        assert tuple(dataset.tensors().shape[1:]) == spec.input_shape
