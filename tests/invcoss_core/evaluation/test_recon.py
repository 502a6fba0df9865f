"""Held-out reconstruction: fixed masks make it deterministic; the decoder probe fits and leaves the model alone."""

from __future__ import annotations

import pytest
import torch

from invcoss_core.evaluation.recon import (
    ReconSettings,
    decoder_probe_loss,
    decoder_state,
    fixed_noise,
    masked_recon_loss,
    own_decoder_loss,
)
from invcoss_core.models import build_model
from tests.helpers import make_config, structured_images

SETTINGS = ReconSettings(max_train=32, max_test=16, masks_per_image=2, decoder_steps=40, decoder_batch=16)


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(make_config().model).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return structured_images(48, (1, 16, 16, 16), seed=4, kind="blobs")


def test_fixed_noise_depends_only_on_seed_modality_and_salt(model: torch.nn.Module) -> None:
    a = fixed_noise(model, "ct", 5, seed=1)
    assert torch.equal(a, fixed_noise(model, "ct", 5, seed=1))
    assert not torch.equal(a, fixed_noise(model, "mri", 5, seed=1))
    assert not torch.equal(a, fixed_noise(model, "ct", 5, seed=2))


def test_masked_recon_loss_is_deterministic_and_batch_size_free(model: torch.nn.Module, images: torch.Tensor) -> None:
    noise = fixed_noise(model, "ct", images.shape[0], seed=0)
    whole = masked_recon_loss(model, images, "ct", noise, batch_size=64)
    chunked = masked_recon_loss(model, images, "ct", noise, batch_size=7)
    with torch.no_grad():
        direct = float(model(images, "ct", noise=noise).loss)
    assert whole == pytest.approx(direct, rel=1e-5)
    assert chunked == pytest.approx(whole, rel=1e-5)


def test_decoder_probe_is_deterministic_and_leaves_the_model_unchanged(
    model: torch.nn.Module, images: torch.Tensor
) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = decoder_probe_loss(model, images[:32], images[32:], "ct", SETTINGS)
    second = decoder_probe_loss(model, images[:32], images[32:], "ct", SETTINGS)
    assert first.loss == second.loss
    assert first.n_test == 16
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_decoder_probe_beats_an_untrained_decoder(model: torch.nn.Module, images: torch.Tensor) -> None:
    untrained = masked_recon_loss(model, images[32:], "ct", fixed_noise(model, "ct", 16, SETTINGS.mask_seed))
    fitted = decoder_probe_loss(model, images[:32], images[32:], "ct", SETTINGS).loss
    assert fitted < untrained


def test_own_decoder_loss_is_the_plain_loss_on_the_test_subset(model: torch.nn.Module, images: torch.Tensor) -> None:
    own = decoder_state(model.state_dict())
    own_loss = own_decoder_loss(model, own, images, "ct", SETTINGS).loss
    test = images[torch.linspace(0, 47, 16).round().long().unique()]
    plain = masked_recon_loss(model, test, "ct", fixed_noise(model, "ct", 16, SETTINGS.mask_seed, "test"))
    assert own_loss == pytest.approx(plain, rel=1e-6)
