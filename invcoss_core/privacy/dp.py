"""Differentially private training at the site: DP-SGD on the stage's own (real) images.

Each step draws its batch of real samples by Poisson sampling (every sample independently with probability
q = batch_size / n), computes one gradient *per sample* of the masked-reconstruction loss (`torch.func`: vmap of
grad), clips each to `max_grad_norm`, sums them, adds Gaussian noise of standard deviation
`noise_multiplier · max_grad_norm` and divides by the expected batch size — the DP-SGD of Abadi et al. (2016) as
Opacus implements it. The privacy loss over all steps is accounted by Opacus's RDP accountant.

Scope of the guarantee (recorded in the manifest as `DPSummary.scope`):
- It protects one training *sample* (a slice, crop or patch), not a subject: a subject who contributed k samples
  is protected at roughly k·ε (group privacy). The audit attacks by subject, which is why its figure is the one to
  read.
- It covers the handed-off *weights*. The replay terms of the loss (synthetic images of earlier stages, the
  frozen teacher) involve none of this site's images and are added without clipping or noise. The feature
  statistics and the gated synthetic pool of this stage are computed from the real images without noise and are
  not covered.

The noise and the Poisson draws come from a generator seeded from the operating system's entropy, not from the
run seed (which a recipient may know): a DP stage is therefore not bit-reproducible.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad_and_value, vmap

from invcoss_core.models import MultiModalMAE
from invcoss_core.privacy.report import DPSummary

ACCOUNTANT = "opacus-rdp"
SCOPE = "sample-level; covers the weights only (not the feature statistics or the synthetic pool)"


def secret_generator() -> torch.Generator:
    """A CPU generator seeded from the OS's entropy: noise a recipient cannot regenerate from the run seed."""
    return torch.Generator().manual_seed(secrets.randbits(63))


class PoissonBatches:
    """A batch sampler for DP-SGD: `steps` batches, each sample included independently with `sample_rate`.

    Batches vary in size and may be empty (an empty batch still takes a step: its gradient is noise only).
    """

    def __init__(self, n: int, sample_rate: float, steps: int, generator: torch.Generator) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.n, self.sample_rate, self.steps, self.generator = n, sample_rate, steps, generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            chosen = torch.rand(self.n, generator=self.generator) < self.sample_rate
            yield chosen.nonzero().flatten().tolist()


def collate_or_empty(items: list[torch.Tensor]) -> torch.Tensor | None:
    """`default_collate` for a Poisson batch: None for an empty one."""
    return torch.stack(items) if items else None


def used_parameters(model: MultiModalMAE, modality: str, generator: torch.Generator) -> list[str]:
    """Names of the parameters a `modality` MAE loss depends on, found from a random input (no real image).

    The other modalities' patch embeddings and decoder heads never receive a gradient from this loss: their
    sensitivity is zero, so they get neither per-sample gradients nor noise.
    """
    spec = model.spec(modality)
    x = torch.rand(2, *spec.input_shape, generator=generator).to(model.device)
    probe = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    noise = model.masking_noise(2, modality, generator, model.device)
    loss = functional_call(model, (probe, buffers), (x, modality), {"noise": noise}).loss
    grads = torch.autograd.grad(loss, list(probe.values()), allow_unused=True)
    return [name for name, g in zip(probe, grads, strict=True) if g is not None]


@dataclass
class DPStep:
    """Per-sample-clipped, noised gradients of the private (real-image) loss of one stage's model."""

    model: MultiModalMAE
    modality: str
    max_grad_norm: float
    noise_multiplier: float
    expected_batch: float  # q · n: the divisor of the noised sum (Opacus's convention)
    noise_generator: torch.Generator
    microbatch: int = 16  # per-sample gradients computed this many samples at a time (memory)

    def __post_init__(self) -> None:
        self.names = used_parameters(self.model, self.modality, self.noise_generator)
        if not self.names:
            raise ValueError(f"no parameter of the model depends on a {self.modality!r} loss")

    def _per_sample(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        params = dict(self.model.named_parameters())
        trainable = {name: params[name].detach() for name in self.names}
        frozen = {name: p.detach() for name, p in params.items() if name not in trainable}
        buffers = dict(self.model.named_buffers())
        modality = self.modality

        def loss_of(p: dict[str, torch.Tensor], xi: torch.Tensor, ni: torch.Tensor) -> torch.Tensor:
            out = functional_call(self.model, ({**p, **frozen}, buffers), (xi[None], modality), {"noise": ni[None]})
            return out.loss

        per_sample = vmap(grad_and_value(loss_of), in_dims=(None, 0, 0), randomness="different")
        with warnings.catch_warnings():  # vmap falls back to a loop for CPU flash attention and says so each call
            warnings.filterwarnings("ignore", message="There is a performance drop")
            grads, losses = per_sample(trainable, x, noise)
        return grads, losses

    def __call__(self, x: torch.Tensor | None, noise: torch.Tensor | None) -> torch.Tensor:
        """Set each used parameter's `.grad` to the DP-SGD gradient of the MAE loss on `x`; return the batch loss.

        Args:
            x: (B, C, *img_size) the Poisson batch of real samples, or None for an empty one.
            noise: (B, L) the masking noise of those samples.
        Returns:
            the mean unclipped loss over the batch (detached; 0 for an empty batch) for monitoring.
        """
        params = dict(self.model.named_parameters())
        summed = {name: torch.zeros_like(params[name]) for name in self.names}
        loss_sum = torch.zeros((), device=self.model.device)
        count = 0 if x is None else x.shape[0]
        for start in range(0, count, self.microbatch):
            assert x is not None and noise is not None
            grads, losses = self._per_sample(x[start : start + self.microbatch], noise[start : start + self.microbatch])
            flat = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], dim=1)  # (b, parameters)
            norms = flat.norm(dim=1)
            factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            for name, g in grads.items():
                summed[name] += torch.einsum("b,b...->...", factor, g)
            loss_sum = loss_sum + losses.detach().sum()
        std = self.noise_multiplier * self.max_grad_norm
        for name in self.names:
            noise_draw = torch.randn(summed[name].shape, generator=self.noise_generator).to(summed[name].device)
            params[name].grad = (summed[name] + std * noise_draw) / self.expected_batch
        return loss_sum / max(count, 1)


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε of `steps` Poisson-subsampled Gaussian steps at `delta` (Opacus's RDP accountant)."""
    if noise_multiplier <= 0:
        raise ValueError("DP-SGD without noise gives no guarantee: noise_multiplier must be > 0")
    from opacus.accountants import RDPAccountant  # a heavy import, only for DP stages

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(delta=delta))


def dp_summary(
    noise_multiplier: float, max_grad_norm: float, sample_rate: float, steps: int, delta: float
) -> DPSummary:
    """The guarantee of a DP stage, as the manifest records it."""
    return DPSummary(
        epsilon=epsilon(noise_multiplier, sample_rate, steps, delta),
        delta=delta,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        sample_rate=sample_rate,
        steps=steps,
        accountant=ACCOUNTANT,
        scope=SCOPE,
    )


__all__ = [
    "ACCOUNTANT",
    "SCOPE",
    "DPStep",
    "PoissonBatches",
    "collate_or_empty",
    "dp_summary",
    "epsilon",
    "secret_generator",
    "used_parameters",
]
