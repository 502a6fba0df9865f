"""Fixtures for multi-process federation tests: site data folders and local federations that always clean up."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Smallest settings that still run every part of the product: MAE training with epoch checkpoints, inversion
# with the privacy gate, signing, verification.
FAST_DEFAULTS = {
    "replay": {"strategy": "inversion"},
    "train": {"epochs": 2},
    "data": {"samples_per_volume": 4},
    "inversion": {"iterations": 3, "iterations_per_batch": 2},
}


def generated_site_data(root: Path) -> Path:
    """Small real-format site folders (NIfTI volumes, PNG tiles) when the sample data is not on this machine."""
    import nibabel as nib
    from PIL import Image

    rng = np.random.default_rng(0)
    for modality in ("ct", "mri"):
        folder = root / modality
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(2):
            grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 40)] * 3, indexing="ij"))
            centre = rng.uniform(-0.5, 0.5, size=(3, 1, 1, 1))
            volume = np.exp(-((grid - centre) ** 2).sum(0) * 4) * 1000 + rng.normal(0, 20, (40, 40, 40))
            nib.save(nib.Nifti1Image(volume.astype(np.float32), np.eye(4)), folder / f"subject{i}.nii.gz")
    folder = root / "pathology"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        tile = (rng.uniform(0, 1, (96, 96, 3)) * 60 + np.linspace(120, 220, 96)[None, :, None]).astype(np.uint8)
        Image.fromarray(tile).save(folder / f"tile{i}.png")
    return root


@pytest.fixture(scope="session")
def site_data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real sample images when present (always with INVCOSS_REQUIRE_SAMPLES=1), else generated folders."""
    from invcoss_core.data import default_samples_dir, fetch_samples

    if os.environ.get("INVCOSS_REQUIRE_SAMPLES") == "1" or (default_samples_dir() / "manifest.json").is_file():
        return fetch_samples(progress=False)
    return generated_site_data(tmp_path_factory.mktemp("site-data"))
