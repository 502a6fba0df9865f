"""InvUNet: the two-branch multi-scale U-Net generator that the inversion optimises (2D and 3D).

Layout (layer sizes are ours; the paper gives the idea, not the sizes)::

    noise ε (B, noise_ch, *S)          z (B, latent_dim)
        │ stem (1×1)                     │ linear → (B, c_L, *S/2^L)
        ▼                                ├──────────────────────────────┐
    enc_0 ─ strided conv ─► enc_1 … enc_L ┤ (+ z map) bottleneck         │ memory cache branch:
        │ skip            │ skip          ▼                               │ learned constant + z map,
        │                 │        dec_L ◄────────────── mem_L ◄─────────┘ one conv per scale at the
        │                 └──────► dec_1 ◄── cross-branch skip ── mem_1     coarser resolution, then
        └────────────────────────► dec_0 ◄── cross-branch skip ── mem_0     up-sampling
                                     │ 1×1 channel mix, sigmoid
                                     ▼
                              x̂ (B, C, *S) in [0, 1]

The main inversion branch encodes a fixed per-image noise field (its U-Net skips carry high-frequency detail);
the memory cache branch turns z and a learned "memory" tensor into multi-scale structure priors. At each
decoder scale the up-sampled main features, the encoder skip and the memory prior are *added* (FPN-style fusion:
cheaper than concatenation at full resolution, which dominates the cost in 3D). Up-sampling is nearest-neighbour
resizing followed by a 3×3 convolution (resize-convolution) — never a transposed convolution with stride = patch
size, which produced the patch-grid artefacts of the first experiment (notes/small-scale-findings.md).

Cost (measured on CPU, 32 volumes of 16³): a stride-1 3×3×3 convolution is factorised into (1,3,3) then (3,1,1)
— the same receptive field at half the time (98 → 51 ms forward + backward for 8 → 8 channels) — and the output
head mixes channels with a broadcast multiply-sum (13.7 → 2.7 ms for 8 → 1 channels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["InvUNet"]


def _conv3x3(spatial_dims: int, cin: int, cout: int, stride: int = 1) -> nn.Module:
    """3×3(×3) convolution; in 3D with stride 1 factorised as (1,3,3) then (3,1,1)."""
    if spatial_dims == 2:
        return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1)
    if stride != 1:
        return nn.Conv3d(cin, cout, kernel_size=3, stride=stride, padding=1)
    return nn.Sequential(
        nn.Conv3d(cin, cout, kernel_size=(1, 3, 3), padding=(0, 1, 1), bias=False),
        nn.Conv3d(cout, cout, kernel_size=(3, 1, 1), padding=(1, 0, 0)),
    )


def _conv1x1(spatial_dims: int, cin: int, cout: int) -> nn.Conv2d | nn.Conv3d:
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    return conv(cin, cout, kernel_size=1)


class _ChannelMix(nn.Module):
    """1×1 convolution as a broadcast multiply-sum: far cheaper than conv kernels for a few output channels."""

    def __init__(self, spatial_dims: int, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin))
        self.bias = nn.Parameter(torch.zeros(cout))
        self._spatial = (1,) * spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, cin, *S) → (B, cout, *S)."""
        weight = self.weight.view(1, *self.weight.shape, *self._spatial)  # (1, cout, cin, 1, ...)
        return (x.unsqueeze(1) * weight).sum(dim=2) + self.bias.view(1, -1, *self._spatial)


class _ConvNormAct(nn.Sequential):
    """conv → GroupNorm → LeakyReLU; GroupNorm keeps every image of a batch independent (unlike BatchNorm)."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(
            _conv3x3(spatial_dims, cin, cout, stride),
            nn.GroupNorm(math.gcd(8, cout), cout),
            nn.LeakyReLU(0.2, inplace=True),
        )


class InvUNet(nn.Module):
    """Generator x̂ = G(ε, z) for one modality's tokenizer shape.

    Args:
        spatial_dims: 2 or 3.
        out_channels: image channels of the modality (1 grey, 3 RGB).
        img_size: spatial size per axis, e.g. (16, 16) or (16, 16, 16).
        latent_dim: length of z.
        base_channels: width at full resolution; level i has min(base·2^i, 4·base) channels.
        levels: down-sampling steps; every axis of `img_size` must be divisible by 2**levels.
        noise_channels: channels of the fixed noise field ε that the main branch encodes.
    Raises:
        ValueError: for a bad dimension, a non-positive size or an `img_size` that 2**levels does not divide.
    """

    def __init__(
        self,
        spatial_dims: int,
        out_channels: int,
        img_size: Sequence[int],
        latent_dim: int,
        base_channels: int = 16,
        levels: int = 2,
        noise_channels: int = 4,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        size = tuple(int(s) for s in img_size)
        if len(size) != spatial_dims:
            raise ValueError(f"img_size {size} needs {spatial_dims} entries for spatial_dims={spatial_dims}")
        for name, value in (
            ("out_channels", out_channels),
            ("latent_dim", latent_dim),
            ("base_channels", base_channels),
            ("levels", levels),
            ("noise_channels", noise_channels),
        ):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        factor = 2**levels
        if any(s < factor or s % factor for s in size):
            fits = _max_levels(size)
            hint = f"lower inversion.levels to {fits} or less" if fits else "use an even img_size"
            raise ValueError(f"img_size {size} must be divisible by 2**levels = {factor} on every axis; {hint}")
        self.spatial_dims = spatial_dims
        self.out_channels = out_channels
        self.img_size = size
        self.latent_dim = latent_dim
        self.levels = levels
        self.noise_channels = noise_channels
        widths = [min(base_channels * 2**i, 4 * base_channels) for i in range(levels + 1)]
        self.widths = widths
        self.bottleneck_size = tuple(s // factor for s in size)

        # Main inversion branch: encoder over ε, bottleneck with z, decoder with additive skips.
        # ε is white noise: lifting it point-wise is enough, the 3×3 convolutions after it shape it spatially.
        self.stem = nn.Sequential(
            _conv1x1(spatial_dims, noise_channels, widths[0]),
            nn.GroupNorm(math.gcd(8, widths[0]), widths[0]),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.down = nn.ModuleList(_ConvNormAct(spatial_dims, widths[i], widths[i + 1], stride=2) for i in range(levels))
        bottleneck_cells = math.prod(self.bottleneck_size)
        self.latent_proj = nn.Linear(latent_dim, widths[-1] * bottleneck_cells)
        self.bottleneck = _ConvNormAct(spatial_dims, widths[-1], widths[-1])
        # Channel reduction happens *before* up-sampling, at the coarser (cheaper) resolution.
        self.reduce = nn.ModuleList(_conv1x1(spatial_dims, widths[i + 1], widths[i]) for i in range(levels))
        self.decode = nn.ModuleList(_ConvNormAct(spatial_dims, widths[i], widths[i]) for i in range(levels))
        self.head = _ChannelMix(spatial_dims, widths[0], out_channels)

        # Memory cache branch: a learned structure memory, modulated by z, refined once per scale.
        self.memory = nn.Parameter(torch.zeros(1, widths[-1], *self.bottleneck_size))
        self.memory_convs = nn.ModuleList(_ConvNormAct(spatial_dims, widths[i + 1], widths[i]) for i in range(levels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal convolutions, unit-scale latent projection, zero head bias.

        The head keeps a unit-variance pre-activation so that the first images already have contrast (sigmoid of
        ~N(0, 1): std ≈ 0.2 around 0.5). A near-zero head made them flat, and flat images are a trivial minimum
        of the normalised-pixel MAE loss (every hidden patch's target becomes 0).
        """
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(module.weight, a=0.2, nonlinearity="leaky_relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.latent_proj.weight, std=1.0 / math.sqrt(self.latent_dim))
        nn.init.zeros_(self.latent_proj.bias)
        nn.init.normal_(self.memory, std=1.0)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(self.widths[0]))

    def input_noise(self, batch: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """A fresh fixed noise field ε for `batch` images: (B, noise_channels, *img_size) standard normal."""
        noise = torch.randn(batch, self.noise_channels, *self.img_size, generator=generator)
        return noise.to(device)

    def _up(self, x: torch.Tensor) -> torch.Tensor:
        # Nearest-neighbour: every caller follows it with a 3×3 convolution (resize-convolution).
        return F.interpolate(x, scale_factor=2.0, mode="nearest")

    def forward(self, noise: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Generate images.

        Args:
            noise: (B, noise_channels, *img_size) fixed noise field ε.
            z: (B, latent_dim) latent codes.
        Returns:
            (B, out_channels, *img_size) images in [0, 1].
        Raises:
            ValueError: when the shapes do not match the constructor's arguments.
        """
        b = z.shape[0]
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape (B, {self.latent_dim}); got {tuple(z.shape)}")
        if tuple(noise.shape) != (b, self.noise_channels, *self.img_size):
            raise ValueError(
                f"noise must have shape ({b}, {self.noise_channels}, {', '.join(map(str, self.img_size))}); "
                f"got {tuple(noise.shape)}"
            )
        skips = [self.stem(noise)]  # level 0 … L, main branch
        for down in self.down:
            skips.append(down(skips[-1]))
        z_map = self.latent_proj(z).view(b, self.widths[-1], *self.bottleneck_size)
        h = self.bottleneck(skips[-1] + z_map)
        memory = self.memory + z_map  # (B, c_L, *bottleneck): the cached structure, per image
        for i in reversed(range(self.levels)):
            memory = self._up(self.memory_convs[i](memory))  # structure prior at level i
            h = self._up(self.reduce[i](h))
            h = self.decode[i](h + skips[i] + memory)  # cross-branch fusion restores detail
        return torch.sigmoid(self.head(h))


def _max_levels(size: Sequence[int]) -> int:
    levels = 0
    while all(s % 2 ** (levels + 1) == 0 and s >= 2 ** (levels + 1) for s in size):
        levels += 1
    return levels
