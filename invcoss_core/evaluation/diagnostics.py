"""Why a replay method keeps (or loses) an earlier modality: what its replay pool covers and how far features moved.

For one earlier modality m, with the model right after m's own stage as the reference (the teacher the later
stages distil towards) and the final model as the student:
- `drift_real`: the distillation objective (MSE of masked encoder outputs, same masks for both models) measured on
  held-out real images of m — what the method should have kept small;
- `drift_pool`: the same on the method's replay pool (synthetic images or the real buffer) — what it did keep small;
  a small `drift_pool` with a large `drift_real` means the pool does not stand in for the real data;
- `coverage`: mean over held-out real images of the cosine similarity (reference encoder features) to the nearest
  pool image, beside `coverage_real_train`, the same to the nearest real training image (what a perfect stand-in
  reaches), and `pool_self_similarity` (mean pairwise cosine inside the pool: diversity, lower is more diverse);
- pixel statistics of the pool and of real images (mean, per-image sd).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from invcoss_core.evaluation.probes import encoder_features, stride_indices
from invcoss_core.evaluation.recon import fixed_noise
from invcoss_core.models import MultiModalMAE


@dataclass(frozen=True)
class ReplayDiagnostics:
    """Coverage and drift numbers of one method's replay pool for one earlier modality (see module docstring)."""

    pool_size: int
    drift_real: float
    drift_pool: float
    coverage: float
    coverage_real_train: float
    pool_self_similarity: float
    pool_mean: float
    pool_image_sd: float
    real_mean: float
    real_image_sd: float

    def to_json(self) -> dict[str, float]:
        """A JSON-ready dict."""
        return {k: float(v) for k, v in asdict(self).items()}


@torch.no_grad()
def feature_drift(
    student: MultiModalMAE, reference: MultiModalMAE, images: torch.Tensor, modality: str, batch_size: int = 256
) -> float:
    """Mean squared difference of the masked encoder outputs of two models (the distillation loss), fixed masks.

    Args:
        images: (N, C, *img_size) images of `modality` (moved in batches to the models' device).
    Returns:
        the MSE averaged over images, tokens and channels.
    """
    device = student.device
    noise = fixed_noise(student, modality, images.shape[0], seed=0, salt="drift")
    student.eval()
    reference.eval()
    total, count = 0.0, 0
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size].to(device)
        n = noise[i : i + batch_size].to(device)
        a = student.forward_encoder(x, modality, noise=n).latent.float()
        b = reference.forward_encoder(x, modality, noise=n).latent.float()
        total += float(F.mse_loss(a, b, reduction="sum"))
        count += a.numel()
    return total / max(count, 1)


def _nearest_cosine(queries: torch.Tensor, keys: torch.Tensor) -> float:
    q = F.normalize(queries.double(), dim=1)
    k = F.normalize(keys.double(), dim=1)
    return float((q @ k.T).max(dim=1).values.mean())


def _self_similarity(features: torch.Tensor) -> float:
    f = F.normalize(features.double(), dim=1)
    n = f.shape[0]
    if n < 2:
        return float("nan")
    sim = f @ f.T
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def _pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    flat = images.float().flatten(1)
    return float(flat.mean()), float(flat.std(dim=1).mean())


def replay_diagnostics(
    student: MultiModalMAE,
    reference: MultiModalMAE,
    pool: torch.Tensor | None,
    real_val: torch.Tensor,
    real_train: torch.Tensor,
    modality: str,
    max_images: int = 512,
) -> ReplayDiagnostics:
    """Coverage and drift of a replay pool for `modality` (see the module docstring).

    Args:
        student: the final model; reference: the model right after `modality`'s own stage.
        pool: (P, C, *img_size) the method's replay images of `modality` (float16 or float32, in [0, 1]); None for
            a method without a pool (then only `drift_real` and the real-image numbers are filled, the rest NaN).
        real_val: held-out real images; real_train: the stage's real training images.
        The models run on their own device (a GPU bench's diagnostics stay on the GPU); the images may be on the CPU.
    """
    nan = float("nan")
    val = real_val[stride_indices(real_val.shape[0], max_images)]
    train = real_train[stride_indices(real_train.shape[0], max_images)]
    device = reference.device
    f_val = encoder_features(reference, val, modality, 256, device)
    f_train = encoder_features(reference, train, modality, 256, device)
    real_mean, real_sd = _pixel_stats(val)
    drift_pool = coverage = self_similarity = pool_mean = pool_sd = nan
    size = 0
    if pool is not None and pool.shape[0] > 0:
        pool = pool.float()[stride_indices(pool.shape[0], max_images)]
        f_pool = encoder_features(reference, pool, modality, 256, device)
        size = int(pool.shape[0])
        drift_pool = feature_drift(student, reference, pool, modality)
        coverage = _nearest_cosine(f_val, f_pool)
        self_similarity = _self_similarity(f_pool)
        pool_mean, pool_sd = _pixel_stats(pool)
    return ReplayDiagnostics(
        pool_size=size,
        drift_real=feature_drift(student, reference, val, modality),
        drift_pool=drift_pool,
        coverage=coverage,
        coverage_real_train=_nearest_cosine(f_val, f_train),
        pool_self_similarity=self_similarity,
        pool_mean=pool_mean,
        pool_image_sd=pool_sd,
        real_mean=real_mean,
        real_image_sd=real_sd,
    )
