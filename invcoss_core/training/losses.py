"""Replay losses of the stage loop: intra-modal mixup and feature distillation to the frozen previous model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from invcoss_core.models import MultiModalMAE


def intra_modal_mixup(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mix each image with another of the same batch, lambda ~ U(0, 1) per sample (MedCoSS buffer path).

    Args:
        images: (B, C, *spatial) one modality's replay batch.
        generator: CPU generator for the permutation and the lambdas.
    Returns:
        (B, C, *spatial) mixed images, same dtype and device.
    """
    b = images.shape[0]
    perm = torch.randperm(b, generator=generator).to(images.device)
    lam = torch.rand(b, generator=generator).to(images.device, images.dtype)
    lam = lam.view(b, *([1] * (images.dim() - 1)))
    return lam * images + (1 - lam) * images[perm]


def feature_distillation(
    student: MultiModalMAE, teacher: MultiModalMAE, images: torch.Tensor, modality: str, noise: torch.Tensor
) -> torch.Tensor:
    """MSE between student and frozen-teacher encoder outputs under the same random mask.

    Args:
        images: (B, C, *spatial) replay images of `modality`.
        noise: (B, L) masking noise shared by both encoders.
    Returns:
        scalar loss.
    """
    with torch.no_grad():
        target = teacher.forward_encoder(images, modality, noise=noise).latent
    latent = student.forward_encoder(images, modality, noise=noise).latent
    return F.mse_loss(latent.float(), target.float())
