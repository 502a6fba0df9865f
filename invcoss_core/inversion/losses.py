"""The four inversion losses as pure functions: L_task, L_norm, L_img (total variation) and L_rep.

`L_inv = α_task·L_task + α_norm·L_norm + α_img·L_img + α_rep·L_rep` (DESIGN §3). Each function checks the shapes
it is given and returns a scalar; `InversionTerms` carries the four values so that each can be logged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from invcoss_core.config import InversionConfig
from invcoss_core.models import masked_patch_loss

__all__ = [
    "TERM_NAMES",
    "InversionTerms",
    "LossShapeError",
    "batch_token_stats",
    "norm_loss",
    "repulsion_loss",
    "task_loss",
    "tv_loss",
]


class LossShapeError(ValueError):
    """A loss was handed tensors whose shapes do not fit together."""


def task_loss(pred: torch.Tensor, patches: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
    """The frozen MAE's masked-reconstruction loss: mean squared error on the hidden patches only.

    The shape-checked `invcoss_core.models.masked_patch_loss`, the function `MultiModalMAE.forward_loss` uses, so
    the inversion optimises exactly what the model was trained to minimise.

    Args:
        pred: (B, L, P) decoder predictions for every patch.
        patches: (B, L, P) the images' patches (`model.patchify`).
        mask: (B, L) 1 where a patch was hidden from the encoder.
        norm_pix: normalise each target patch by its own mean and variance (the MAE's norm_pix_loss).
    Returns:
        scalar float32 loss.
    Raises:
        LossShapeError: when the shapes disagree.
    """
    if pred.shape != patches.shape or pred.dim() != 3 or tuple(mask.shape) != tuple(pred.shape[:2]):
        raise LossShapeError(
            f"task_loss needs pred and patches (B, L, P) and mask (B, L); got pred {tuple(pred.shape)}, "
            f"patches {tuple(patches.shape)}, mask {tuple(mask.shape)}"
        )
    return masked_patch_loss(pred, patches, mask, norm_pix)


def batch_token_stats(block_inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance of each block's input tokens over the batch and token axes.

    Args:
        block_inputs: one (B, L, D) tensor per encoder block (`capture_block_inputs`), in block order.
    Returns:
        mean (depth, D) and var (depth, D), float32 — the same estimator as `FeatureStatsRecorder`.
    Raises:
        LossShapeError: for an empty list or tensors of different shapes.
    """
    if not block_inputs:
        raise LossShapeError("batch_token_stats needs at least one block input")
    first = block_inputs[0].shape
    if len(first) != 3 or any(t.shape != first for t in block_inputs):
        raise LossShapeError(f"block inputs must all be (B, L, D); got {[tuple(t.shape) for t in block_inputs]}")
    tokens = torch.stack(list(block_inputs)).float().flatten(1, 2)  # (depth, B·L, D)
    var, mean = torch.var_mean(tokens, dim=1, unbiased=False)
    return mean, var


def norm_loss(
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    ref_mean: torch.Tensor,
    ref_var: torch.Tensor,
    eps: float = 1e-3,
) -> torch.Tensor:
    """Statistics matching against the recorded block-input statistics, normalised per layer.

    For each layer l: ‖(μ_l − μ̄_l) / σ̄_l‖₂/√D + ‖(σ²_l − σ̄²_l) / σ̄²_l‖₂/√D, averaged over layers. *(ours)* At raw
    scale the summed L2 distances were ~250 against L_task ≈ 1 and swamped every other term
    (notes/small-scale-findings.md); standardising by the recorded spread makes each layer's term dimensionless —
    the mean term reads "recorded standard deviations off, root-mean-square over channels", the variance term
    "relative variance error" — so α_norm = 1 means what it says at any width and depth. Channels with almost
    no recorded variance are guarded by `eps` times the layer's mean variance.

    Args:
        batch_mean, batch_var: (depth, D) statistics of the synthetic batch (`batch_token_stats`).
        ref_mean, ref_var: (depth, D) recorded statistics (`invcoss_core.stats.modality_stats`).
        eps: relative floor of the per-channel variance used as the scale.
    Returns:
        scalar: 0 when the statistics match; differentiable otherwise (the gradient at an exact match is 0).
    Raises:
        LossShapeError: when the four tensors do not share one (depth, D) shape.
    """
    shape = ref_mean.shape
    if ref_mean.dim() != 2 or any(t.shape != shape for t in (batch_mean, batch_var, ref_var)):
        raise LossShapeError(
            "norm_loss needs four (depth, D) tensors; got "
            f"{[tuple(t.shape) for t in (batch_mean, batch_var, ref_mean, ref_var)]}"
        )
    ref_var = ref_var.float().clamp_min(0.0)
    scale = ref_var + eps * ref_var.mean(dim=1, keepdim=True) + 1e-12  # (depth, D)
    root_d = shape[1] ** 0.5
    mean_term = torch.linalg.vector_norm((batch_mean - ref_mean.float()) / scale.sqrt(), dim=1) / root_d
    var_term = torch.linalg.vector_norm((batch_var - ref_var) / scale, dim=1) / root_d
    return (mean_term + var_term).mean()


def tv_loss(images: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation: mean absolute difference of neighbours along every spatial axis.

    Args:
        images: (B, C, H, W) or (B, C, D, H, W); 3D adds the depth-direction term.
    Returns:
        scalar; 0 for a constant image.
    Raises:
        LossShapeError: for any other rank.
    """
    if images.dim() not in (4, 5):
        raise LossShapeError(f"tv_loss needs (B, C, H, W) or (B, C, D, H, W); got {tuple(images.shape)}")
    total = images.new_zeros(())
    for axis in range(2, images.dim()):
        if images.shape[axis] > 1:
            total = total + torch.diff(images, dim=axis).abs().mean()
    return total


def repulsion_loss(features: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """Repulsion from already generated images: (1/(B·|P|)) Σ_i Σ_j cos(h_i, p_j)², no temperature.

    Mean-pooled ViT features share a dominant common direction (raw cosines ≥ 0.999 between any two images with
    our small models), so this term varies little and pushes gently; centring the features on the pool's mean
    was tried and made the images *less* diverse (every image is driven towards the pool's least-variance
    direction when D ≤ |P|), so the paper's raw form is kept.

    Args:
        features: (B, D) frozen-encoder features h of the batch being optimised.
        pool: (P, D) features of images generated before (detached here); P may be 0.
    Returns:
        scalar in [0, 1]; 0 when the pool is empty or all pairs are orthogonal, 1 when all are parallel.
    Raises:
        LossShapeError: when the feature widths differ or a tensor is not 2-D.
    """
    if features.dim() != 2 or pool.dim() != 2 or features.shape[1] != pool.shape[1]:
        raise LossShapeError(
            f"repulsion_loss needs features (B, D) and pool (P, D); got {tuple(features.shape)} and {tuple(pool.shape)}"
        )
    if pool.shape[0] == 0:
        return features.new_zeros(())
    cos = F.normalize(features.float(), dim=1) @ F.normalize(pool.detach().float(), dim=1).T  # (B, P)
    return cos.pow(2).mean()


@dataclass(frozen=True)
class InversionTerms:
    """The four loss terms of one optimisation step (scalars with their graph) and their weighted sum.

    features: optional (B, D) detached encoder features of the batch at this step (what joins the repulsion pool).
    """

    task: torch.Tensor
    norm: torch.Tensor
    img: torch.Tensor
    rep: torch.Tensor
    features: torch.Tensor | None = None

    def total(self, config: InversionConfig) -> torch.Tensor:
        """L_inv = α_task·L_task + α_norm·L_norm + α_img·L_img + α_rep·L_rep; a term with α = 0 is left out."""
        weighted = [
            (config.alpha_task, self.task),
            (config.alpha_norm, self.norm),
            (config.alpha_img, self.img),
            (config.alpha_rep, self.rep),
        ]
        return sum((alpha * term for alpha, term in weighted if alpha > 0), start=self.task.new_zeros(()))

    def stacked(self, total: torch.Tensor) -> torch.Tensor:
        """(5,) detached tensor: task, norm, img, rep, total — one device→host copy per batch, not per term."""
        return torch.stack([self.task, self.norm, self.img, self.rep, total]).detach().float()


TERM_NAMES: tuple[str, ...] = ("task", "norm", "img", "rep", "total")
