"""Fixtures of the inversion tests: tiny MAEs trained a few dozen steps on structured images (shared per session)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from invcoss_core.config import InversionConfig, StageConfig, build_config
from invcoss_core.data import TensorImages
from invcoss_core.models import MultiModalMAE
from invcoss_core.training import load_student, run_stage
from tests.helpers import structured_images

# Short inversions: the tests check behaviour, not image quality.
FAST_INVERSION = {"batch_size": 8, "iterations": 16, "iterations_per_batch": 6, "num_images": 16}


@dataclass(frozen=True)
class Trained:
    """A trained tiny model with what the inversion needs."""

    config: StageConfig
    modality: str
    model: MultiModalMAE
    stats: dict[str, torch.Tensor]
    data: TensorImages

    def inversion(self, **overrides: object) -> InversionConfig:
        return self.config.inversion.model_copy(update=overrides)


def _train(modality: str, shape: tuple[int, ...], seed: int) -> Trained:
    config = build_config(
        "tiny", {"train": {"epochs": 6, "batch_size": 8}, "inversion": FAST_INVERSION}
    )  # 40 images: 5 steps per epoch, 30 steps
    data = TensorImages(structured_images(40, shape, seed=seed, kind="blobs"))
    result = run_stage(config=config, modality=modality, train_data=data)
    return Trained(config, modality, load_student(result.artifact), dict(result.artifact.stats), data)


@pytest.fixture(scope="session")
def trained_2d() -> Trained:
    return _train("xray", (1, 16, 16), seed=11)


@pytest.fixture(scope="session")
def trained_3d() -> Trained:
    return _train("ct", (1, 16, 16, 16), seed=12)


@pytest.fixture(params=["2d", "3d"])
def trained(request: pytest.FixtureRequest, trained_2d: Trained, trained_3d: Trained) -> Trained:
    return trained_2d if request.param == "2d" else trained_3d
