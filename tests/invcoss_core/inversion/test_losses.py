"""Tests of the four inversion losses on hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from invcoss_core.config import build_config
from invcoss_core.inversion.losses import (
    LossShapeError,
    batch_token_stats,
    norm_loss,
    repulsion_loss,
    task_loss,
    tv_loss,
)
from invcoss_core.models import build_model


@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (2, 3, 8, 8), (2, 1, 4, 8, 8)])
def test_tv_loss_constant_image_is_zero(shape: tuple[int, ...]) -> None:
    assert float(tv_loss(torch.full(shape, 0.3))) == 0.0


def test_tv_loss_3d_counts_the_depth_direction() -> None:
    # Varies along depth only: 2D TV of every slice is 0, the 3D term is not.
    volume = torch.arange(4.0).view(1, 1, 4, 1, 1).expand(1, 1, 4, 8, 8) / 4
    assert float(tv_loss(volume)) == pytest.approx(0.25)


def test_tv_loss_hand_computed_value() -> None:
    image = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])  # a vertical edge: |dx| = 1 on both rows, dy = 0
    assert float(tv_loss(image)) == pytest.approx(1.0)


def test_repulsion_loss_orthogonal_features_is_zero() -> None:
    eye = torch.eye(4)
    assert float(repulsion_loss(eye[:2], eye[2:])) == pytest.approx(0.0, abs=1e-7)


def test_repulsion_loss_identical_features_is_one() -> None:
    feature = torch.randn(1, 5, generator=torch.Generator().manual_seed(0))
    assert float(repulsion_loss(feature.repeat(3, 1), feature.repeat(4, 1))) == pytest.approx(1.0, abs=1e-6)
    assert float(repulsion_loss(feature, -2.0 * feature)) == pytest.approx(1.0, abs=1e-6)  # cos² ignores sign, scale


def test_repulsion_loss_empty_pool_is_zero() -> None:
    assert float(repulsion_loss(torch.randn(3, 5), torch.zeros(0, 5))) == 0.0


def test_repulsion_loss_pushes_away_from_the_pool_only() -> None:
    h = torch.tensor([[1.0, 1.0]], requires_grad=True)
    pool = torch.tensor([[1.0, 0.0]], requires_grad=True)
    repulsion_loss(h, pool).backward()
    assert pool.grad is None  # the pool is detached
    assert h.grad is not None and float(h.grad[0, 1]) < 0  # descent raises the orthogonal component


def _stats(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 8, generator=g), torch.rand(3, 8, generator=g) + 0.5


def test_norm_loss_matching_statistics_is_zero() -> None:
    mean, var = _stats(0)
    assert float(norm_loss(mean, var, mean, var)) == pytest.approx(0.0, abs=1e-7)


def test_norm_loss_mismatch_is_positive_with_gradients() -> None:
    mean, var = _stats(0)
    batch_mean = (mean + 0.5).requires_grad_(True)
    batch_var = (var * 2).requires_grad_(True)
    loss = norm_loss(batch_mean, batch_var, mean, var)
    loss.backward()
    assert float(loss.detach()) > 0
    assert batch_mean.grad is not None and bool(torch.isfinite(batch_mean.grad).all())
    assert float(batch_mean.grad.abs().sum()) > 0 and float(batch_var.grad.abs().sum()) > 0  # type: ignore[union-attr]


def test_norm_loss_is_scale_free() -> None:
    # Standardised per layer: the same relative mismatch at 100x the feature scale gives the same loss.
    mean, var = _stats(1)
    small = norm_loss(mean + 0.3 * var.sqrt(), var * 1.5, mean, var)
    large = norm_loss(100 * (mean + 0.3 * var.sqrt()), 1e4 * var * 1.5, 100 * mean, 1e4 * var)
    assert float(small) == pytest.approx(float(large), rel=1e-4)
    assert float(small) == pytest.approx(0.3 + 0.5, rel=1e-2)  # 0.3 std off on every channel + 50 % variance error


def test_batch_token_stats_matches_the_recorder_estimator() -> None:
    tokens = [torch.randn(2, 5, 4), torch.randn(2, 5, 4) * 3]
    mean, var = batch_token_stats(tokens)
    flat = tokens[1].reshape(-1, 4)
    assert torch.allclose(mean[1], flat.mean(0)) and torch.allclose(var[1], flat.var(0, unbiased=False))


def test_task_loss_matches_the_model_forward_loss() -> None:
    model = build_model(build_config("tiny").model)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, "xray")
    mine = task_loss(out.pred, model.patchify(x, "xray"), out.mask, model.cfg.norm_pix_loss)
    assert float(mine) == pytest.approx(float(out.loss), rel=1e-6)


def test_losses_reject_mismatched_shapes() -> None:
    with pytest.raises(LossShapeError, match="pred and patches"):
        task_loss(torch.zeros(2, 4, 3), torch.zeros(2, 4, 5), torch.zeros(2, 4))
    with pytest.raises(LossShapeError, match="depth, D"):
        norm_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(3, 4))
    with pytest.raises(LossShapeError, match="tv_loss"):
        tv_loss(torch.zeros(4, 4))
    with pytest.raises(LossShapeError, match="pool"):
        repulsion_loss(torch.zeros(2, 4), torch.zeros(3, 5))
