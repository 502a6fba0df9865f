"""Shared fixtures for the method-core tests: tiny configs, in-memory datasets and the real sample data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from invcoss_core.config import StageConfig, build_config
from invcoss_core.data import SampleFetchError, TensorImages, default_samples_dir, fetch_samples
from tests.helpers import structured_images


@pytest.fixture
def tiny_config() -> StageConfig:
    return build_config("tiny", {"train": {"epochs": 2, "batch_size": 8}})


@pytest.fixture
def ct_data() -> TensorImages:
    return TensorImages(structured_images(40, (1, 16, 16, 16), seed=1, kind="blobs"))


@pytest.fixture
def mri_data() -> TensorImages:
    return TensorImages(structured_images(40, (1, 16, 16, 16), seed=2, kind="stripes"))


@pytest.fixture
def pathology_data() -> TensorImages:
    return TensorImages(structured_images(40, (3, 16, 16), seed=3, kind="stripes"))


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """The real sample data (`invcoss samples fetch` into $INVCOSS_SAMPLES_DIR or the user cache, once).

    Skips when the fetch is impossible, unless $INVCOSS_REQUIRE_SAMPLES is set (CI), where it fails.
    """
    try:
        return fetch_samples(default_samples_dir(), progress=False)
    except (SampleFetchError, OSError) as err:
        if os.environ.get("INVCOSS_REQUIRE_SAMPLES"):
            pytest.fail(f"INVCOSS_REQUIRE_SAMPLES is set but the sample fetch failed: {err}")
        pytest.skip(f"sample data unavailable: {err}")
