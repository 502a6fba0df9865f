"""Replay diagnostics: zero drift for an unchanged model, full coverage for a pool of the real images."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from invcoss_core.evaluation.diagnostics import feature_drift, replay_diagnostics
from invcoss_core.models import build_model
from tests.helpers import make_config, structured_images


def test_unchanged_model_has_no_drift_and_a_real_pool_covers_itself() -> None:
    torch.manual_seed(0)
    model = build_model(make_config().model).eval()
    real = structured_images(24, (1, 16, 16, 16), seed=5)
    diag = replay_diagnostics(model, copy.deepcopy(model), real.clone(), real, real, "ct")
    assert diag.drift_real == 0.0 and diag.drift_pool == 0.0
    assert diag.coverage == pytest.approx(1.0)
    assert diag.coverage == pytest.approx(diag.coverage_real_train)
    assert diag.pool_size == 24


def test_drift_grows_with_a_changed_encoder_and_no_pool_leaves_nan() -> None:
    torch.manual_seed(0)
    model = build_model(make_config().model).eval()
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.encoder.blocks.parameters():
            p.add_(0.05 * torch.randn_like(p))
    real = structured_images(16, (1, 16, 16, 16), seed=6)
    assert feature_drift(moved, model, real, "ct") > 0.0
    diag = replay_diagnostics(moved, model, None, real, real, "ct")
    assert math.isnan(diag.coverage) and diag.pool_size == 0
