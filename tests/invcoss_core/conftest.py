"""Shared fixtures for the method-core tests: tiny configs and in-memory datasets."""

from __future__ import annotations

import pytest

from invcoss_core.config import StageConfig, build_config
from invcoss_core.data import TensorImages
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
