"""Tests of the InvUNet generator: shapes, value range, gradients and argument validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from invcoss_core.inversion.invunet import InvUNet


@pytest.mark.parametrize(
    ("spatial_dims", "channels", "size"),
    [(2, 1, (16, 16)), (2, 3, (16, 32)), (3, 1, (16, 16, 16))],
)
def test_invunet_output_has_the_tokenizer_shape_and_lies_in_unit_range(
    spatial_dims: int, channels: int, size: tuple[int, ...]
) -> None:
    g = torch.Generator().manual_seed(0)
    net = InvUNet(spatial_dims, channels, size, latent_dim=8, base_channels=8, levels=2)
    with torch.no_grad():
        out = net(net.input_noise(3, g, torch.device("cpu")), torch.randn(3, 8, generator=g))
    assert out.shape == (3, channels, *size)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(out.std()) > 0.05  # the first images already have contrast (a flat start is a trivial optimum)


def test_invunet_gradients_reach_the_latent_and_every_branch() -> None:
    g = torch.Generator().manual_seed(0)
    net = InvUNet(2, 1, (16, 16), latent_dim=8, base_channels=8, levels=2)
    z = torch.randn(2, 8, generator=g, requires_grad=True)
    net(net.input_noise(2, g, torch.device("cpu")), z).mean().backward()
    assert z.grad is not None and float(z.grad.abs().sum()) > 0
    assert net.memory.grad is not None and float(net.memory.grad.abs().sum()) > 0  # memory cache branch is used
    stem_grad = next(net.stem.parameters()).grad  # the main branch's encoder is used
    assert stem_grad is not None and float(stem_grad.abs().sum()) > 0


def test_invunet_has_no_transposed_convolutions() -> None:
    net = InvUNet(3, 1, (16, 16, 16), latent_dim=8, base_channels=8, levels=2)
    assert not any(isinstance(m, (nn.ConvTranspose2d, nn.ConvTranspose3d)) for m in net.modules())


def test_invunet_depends_on_the_latent_code() -> None:
    g = torch.Generator().manual_seed(0)
    net = InvUNet(2, 1, (16, 16), latent_dim=8, base_channels=8, levels=2)
    noise = net.input_noise(1, g, torch.device("cpu"))
    with torch.no_grad():
        a = net(noise, torch.zeros(1, 8))
        b = net(noise, torch.ones(1, 8))
    assert float((a - b).abs().max()) > 1e-3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spatial_dims": 4}, "spatial_dims must be 2 or 3"),
        ({"img_size": (16, 16, 16)}, "needs 2 entries"),
        ({"img_size": (12, 16)}, r"divisible by 2\*\*levels = 8.*levels to 2"),
        ({"img_size": (15, 16)}, "use an even img_size"),
        ({"latent_dim": 0}, "latent_dim must be a positive integer"),
        ({"base_channels": 0}, "base_channels must be a positive integer"),
        ({"out_channels": 0}, "out_channels must be a positive integer"),
    ],
)
def test_invunet_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "spatial_dims": 2,
        "out_channels": 1,
        "img_size": (16, 16),
        "latent_dim": 8,
        "base_channels": 8,
        "levels": 3,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        InvUNet(**args)  # type: ignore[arg-type]


def test_invunet_forward_rejects_wrong_shapes() -> None:
    net = InvUNet(2, 1, (16, 16), latent_dim=8, base_channels=8, levels=2)
    with pytest.raises(ValueError, match="z must have shape"):
        net(torch.zeros(2, 4, 16, 16), torch.zeros(2, 7))
    with pytest.raises(ValueError, match="noise must have shape"):
        net(torch.zeros(2, 4, 8, 8), torch.zeros(2, 8))
