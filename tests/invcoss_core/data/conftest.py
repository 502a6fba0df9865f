"""Fixtures of the data tests: profile specs, generated site folders, and the real sample data (fetched once)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from invcoss_core.config import DataConfig, ModalitySpec, StageConfig, build_config
from tests.invcoss_core.data.factories import (
    ct_phantom,
    he_tile,
    mri_phantom,
    write_dicom,
    write_dicom_series,
    write_nifti,
    write_nrrd,
    write_png,
    write_tiff,
    xray_image,
)


@pytest.fixture(scope="session")
def tiny() -> StageConfig:
    """The tiny profile (16³ volumes, 16² images)."""
    return build_config("tiny")


@pytest.fixture()
def small_data() -> DataConfig:
    """Few samples per image, so that tests stay fast."""
    return DataConfig(samples_per_volume=4, val_fraction=0.5)


def spec_of(config: StageConfig, modality: str) -> ModalitySpec:
    """The ModalitySpec of a modality in a profile."""
    return config.model.spec(modality)


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    """A generated site folder with every modality in several formats and subjects."""
    root = tmp_path / "site"
    write_nifti(root / "ct" / "p1.nii.gz", ct_phantom(seed=1), (1.5, 1.5, 3.0))
    write_nrrd(root / "ct" / "p2.nrrd", ct_phantom(seed=2), (1.5, 1.5, 3.0))
    write_dicom_series(root / "ct" / "p3", ct_phantom(seed=3), patient_id="p3", spacing=(1.5, 1.5, 3.0))
    write_nifti(root / "mri" / "s1.nii.gz", mri_phantom(seed=1), (1.5, 1.5, 1.5))
    write_nifti(root / "mri" / "s2.nii", mri_phantom(seed=2), (2.0, 2.0, 2.0))
    multi = mri_phantom(seed=3).transpose(2, 1, 0).astype(np.int16)  # (frames, rows, cols)
    write_dicom(root / "mri" / "s3.dcm", multi, modality="MR", patient_id="s3")
    write_png(root / "pathology" / "h1.png", he_tile(seed=1))
    write_tiff(root / "pathology" / "h2.tif", he_tile(seed=2), "rgb")
    write_png(root / "pathology" / "h3.png", he_tile(seed=3))
    write_dicom(root / "xray" / "x1.dcm", xray_image(seed=1).astype(np.int16), modality="DX", patient_id="x1")
    write_png(root / "xray" / "x2.png", xray_image(seed=2))
    write_tiff(root / "xray" / "x3.tif", xray_image(seed=3))
    return root
