"""Tests of the privacy gate: nearest-real similarity, blocking, regeneration, dropping and its summary."""

from __future__ import annotations

import pytest
import torch

from invcoss_core.config import GateConfig
from invcoss_core.inversion.gate import RealReference, apply_gate, nearest_real
from tests.helpers import structured_images
from tests.invcoss_core.inversion.conftest import Trained


def _different_images(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Stripes and checkerboards: clearly unlike the blob images the models were trained on."""
    return structured_images(n, shape, seed=seed, kind="stripes")


def _candidates(trained: Trained) -> tuple[torch.Tensor, torch.Tensor]:
    """Six clearly different images, then a real training image, then a real image plus N(0, 0.05²) noise."""
    real = trained.data.tensors()
    shape = tuple(real.shape[1:])
    noise = 0.05 * torch.randn(shape, generator=torch.Generator().manual_seed(0))
    images = torch.cat([_different_images(6, shape, seed=21), real[3:4], (real[7:8] + noise).clamp(0, 1)])
    return images.to(torch.float16), trained.model.embed(images.float(), trained.modality)


def test_gate_blocks_an_injected_real_image_and_a_noisy_copy(trained: Trained) -> None:
    images, features = _candidates(trained)
    outcome = apply_gate(
        images, features, trained.data, trained.model, trained.modality, GateConfig(action="drop", chunk_size=16)
    )
    summary = outcome.summary
    assert (summary.checked, summary.blocked, summary.dropped, summary.regenerated) == (8, 2, 2, 0)
    assert outcome.images.shape[0] == 6
    assert torch.equal(outcome.images, images[:6])  # the clearly different ones pass, in order
    assert summary.max_similarity["pixel"] <= summary.threshold["pixel"]
    assert summary.max_similarity["feature"] <= summary.threshold["feature"]
    assert len(summary.quantiles["pixel"]) == 4 and summary.quantiles["pixel"][-1] == summary.max_similarity["pixel"]


def test_nearest_real_finds_the_copied_sample(trained_2d: Trained) -> None:
    real = trained_2d.data.tensors()
    reference = RealReference(real, trained_2d.model, "xray", chunk_size=16)
    near = nearest_real(real[[5, 30]], reference)
    assert near.pixel_index.tolist() == [5, 30] and near.feature_index.tolist() == [5, 30]
    assert torch.allclose(near.pixel, torch.ones(2), atol=1e-5)
    assert torch.allclose(near.feature, torch.ones(2), atol=1e-5)


def test_nearest_real_does_not_depend_on_the_chunk_size(trained_3d: Trained) -> None:
    queries = _different_images(5, (1, 16, 16, 16), seed=3)
    results = [
        nearest_real(queries, RealReference(trained_3d.data, trained_3d.model, "ct", chunk_size=size))
        for size in (3, 64)
    ]
    assert torch.allclose(results[0].pixel, results[1].pixel, atol=1e-6)
    assert torch.allclose(results[0].feature, results[1].feature, atol=1e-6)
    assert torch.equal(results[0].pixel_index, results[1].pixel_index)


def test_gate_regenerates_blocked_slots(trained_2d: Trained) -> None:
    images, features = _candidates(trained_2d)
    calls: list[int] = []

    def regenerate(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(count)
        fresh = _different_images(count, (1, 16, 16), seed=99)
        return fresh.to(torch.float16), trained_2d.model.embed(fresh, "xray")

    outcome = apply_gate(
        images, features, trained_2d.data, trained_2d.model, "xray", GateConfig(), regenerate=regenerate
    )
    assert calls == [2]
    assert outcome.images.shape[0] == 8
    assert (outcome.summary.checked, outcome.summary.blocked, outcome.summary.regenerated) == (10, 2, 2)
    assert outcome.summary.dropped == 0


def test_gate_drops_what_is_still_blocked_after_the_last_round(trained_2d: Trained) -> None:
    images, features = _candidates(trained_2d)
    real = trained_2d.data.tensors()

    def regenerate_copies(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        return real[:count].clone(), trained_2d.model.embed(real[:count], "xray")

    config = GateConfig(action="regenerate", max_regenerate_rounds=2)
    outcome = apply_gate(images, features, real, trained_2d.model, "xray", config, regenerate=regenerate_copies)
    assert outcome.images.shape[0] == 6
    assert (outcome.summary.blocked, outcome.summary.regenerated, outcome.summary.dropped) == (6, 4, 2)


def test_gate_refuses_an_empty_real_set(trained_2d: Trained) -> None:
    images, features = _candidates(trained_2d)
    with pytest.raises(ValueError, match="real set is empty"):
        apply_gate(images, features, torch.zeros(0, 1, 16, 16), trained_2d.model, "xray", GateConfig())


def test_gate_refuses_images_of_another_shape(trained_2d: Trained) -> None:
    reference = RealReference(trained_2d.data, trained_2d.model, "xray")
    with pytest.raises(ValueError, match="shape"):
        nearest_real(torch.zeros(2, 1, 8, 8), reference, torch.zeros(2, trained_2d.model.cfg.hidden_size))
