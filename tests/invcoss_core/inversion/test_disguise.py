"""Disguised copies: real training images planted in the pool after a flip, shift, intensity change, noise or
crop-and-resize are blocked by the gate, in 2D and 3D; held-out real images mostly are not."""

from __future__ import annotations

import pytest
import torch

from invcoss_core.inversion import apply_gate
from invcoss_core.inversion.disguise import DISGUISES, copy_similarity, disguise
from tests.invcoss_core.inversion.conftest import Trained

PLANTED = 8


def _gate(trained: Trained, images: torch.Tensor, **config: object):  # type: ignore[no-untyped-def]
    gate_config = trained.config.gate.model_copy(update={"action": "drop", **config})
    features = trained.model.embed(images, trained.modality)
    return apply_gate(images, features, trained.data, trained.model, trained.modality, gate_config)


@pytest.mark.parametrize("name", sorted(DISGUISES))
def test_gate_blocks_disguised_training_copies(trained: Trained, name: str) -> None:
    g = torch.Generator().manual_seed(7)
    planted = disguise(trained.data.tensors()[:PLANTED], name, g).to(torch.float16)  # as the pool would carry it
    outcome = _gate(trained, planted.float())
    assert outcome.summary.blocked == PLANTED and outcome.images.shape[0] == 0, name


@pytest.mark.parametrize("name", ["flip", "shift", "crop_resize"])
def test_the_copy_search_is_what_catches_geometric_disguises(trained: Trained, name: str) -> None:
    g = torch.Generator().manual_seed(7)
    planted = disguise(trained.data.tensors()[:PLANTED], name, g)
    plain = _gate(trained, planted, copy_threshold=None)  # nearest-neighbour correlation alone
    assert plain.summary.blocked < PLANTED


def test_copy_similarity_finds_the_source_image(trained_3d: Trained) -> None:
    real = trained_3d.data.tensors()
    planted = disguise(real[[3, 17]], "flip", torch.Generator().manual_seed(0))
    score, index = copy_similarity(planted, lambda: iter(real.split(16)), lambda i: real[i])
    assert index.tolist() == [3, 17] and bool((score > 0.99).all())


def test_unrelated_images_are_not_blocked(trained: Trained) -> None:
    # The search maximises over many views, so it must still leave images unlike any real one alone. How held-out
    # *real* images fare (look-alikes of other subjects) is measured on the sample data by
    # benchmarks/bench_gate_disguise.py (docs/results/privacy/gate.md).
    shape = tuple(trained.data.tensors().shape[1:])
    unrelated = torch.rand((16, *shape), generator=torch.Generator().manual_seed(99))
    outcome = _gate(trained, unrelated)
    assert outcome.summary.blocked == 0
    assert outcome.summary.max_similarity["copy"] < 0.6
