"""Membership-inference attacks on a hand-off, as small pure functions: what a recipient of the artifact could run.

Convention: every attack turns samples into a *membership score* (higher = more likely a training sample) and
`attack_scores` measures how well it separates training (member) from audit (non-member) samples with
scikit-learn's ROC: AUC and the true-positive rate at a 1 % false-positive rate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score, roc_curve

from invcoss_core.models import MultiModalMAE
from invcoss_core.models.mae import masked_patch_loss
from invcoss_core.privacy.report import AttackScore

__all__ = [
    "attack_scores",
    "calibrated_loss_attack",
    "dcr_ratio",
    "loss_attack",
    "nearest_distance",
    "per_sample_losses",
    "pool_distance_attack",
]


def attack_scores(members: torch.Tensor, non_members: torch.Tensor, max_fpr: float = 0.01) -> AttackScore:
    """ROC AUC and TPR at `max_fpr` of membership scores (higher = member).

    Args:
        members: (N,) scores of training samples; non_members: (M,) scores of audit samples.
    Returns:
        AttackScore (the TPR is that of the last ROC point whose FPR ≤ max_fpr).
    Raises:
        ValueError: when either side is empty or a score is not finite.
    """
    m = members.detach().double().cpu().numpy().reshape(-1)
    n = non_members.detach().double().cpu().numpy().reshape(-1)
    if m.size == 0 or n.size == 0:
        raise ValueError(f"an attack needs members and non-members; got {m.size} and {n.size}")
    scores = np.concatenate([m, n])
    if not np.isfinite(scores).all():
        raise ValueError("membership scores hold NaN or inf")
    labels = np.concatenate([np.ones(m.size), np.zeros(n.size)])
    fpr, tpr, _ = roc_curve(labels, scores)
    return AttackScore(
        auc=round(float(roc_auc_score(labels, scores)), 6),
        tpr_at_1pct_fpr=round(float(tpr[fpr <= max_fpr].max()), 6),
        members=int(m.size),
        non_members=int(n.size),
    )


@torch.no_grad()
def per_sample_losses(
    models: Sequence[MultiModalMAE],
    images: torch.Tensor,
    modality: str,
    generator: torch.Generator,
    *,
    repeats: int = 4,
    batch_size: int = 64,
) -> list[torch.Tensor]:
    """Each model's masked-reconstruction loss per sample, under the same random masks for every model.

    Args:
        models: e.g. (handed-off model, reference model); evaluated in eval mode on their own device.
        images: (N, C, *img_size) samples in [0, 1].
        generator: draws the masks (CPU generator: reproducible); `repeats` masks per sample are averaged.
    Returns:
        one (N,) float32 CPU tensor per model.
    """
    out = [torch.zeros(images.shape[0]) for _ in models]
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size]
        for _ in range(repeats):
            noise = models[0].masking_noise(batch.shape[0], modality, generator, torch.device("cpu"))
            for k, model in enumerate(models):
                model.eval()
                x = batch.to(model.device, torch.float32)
                enc = model.forward_encoder(x, modality, noise=noise.to(model.device))
                pred = model.forward_decoder(enc.latent, enc.ids_restore, modality)
                target = model.patchify(x, modality)
                norm = model.cfg.norm_pix_loss
                losses = [
                    masked_patch_loss(pred[i : i + 1], target[i : i + 1], enc.mask[i : i + 1], norm)
                    for i in range(x.shape[0])
                ]
                out[k][start : start + batch.shape[0]] += torch.stack(losses).float().cpu() / repeats
    return out


def loss_attack(member_loss: torch.Tensor, non_member_loss: torch.Tensor) -> AttackScore:
    """Loss threshold (Yeom et al.): a sample the model reconstructs better is more likely a training sample."""
    return attack_scores(-member_loss, -non_member_loss)


def calibrated_loss_attack(
    member_after: torch.Tensor,
    member_before: torch.Tensor,
    non_member_after: torch.Tensor,
    non_member_before: torch.Tensor,
) -> AttackScore:
    """Loss attack calibrated per sample by a reference model that never saw the site's images.

    score = −(loss after − loss before): what training lowered, beyond how easy the sample was anyway. Removes
    most of the subject shift (anatomy, sequence) that the raw loss mixes with memorisation.
    """
    return attack_scores(-(member_after - member_before), -(non_member_after - non_member_before))


def nearest_distance(queries: torch.Tensor, records: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """(N,) distance of each query row to its closest record row.

    Args:
        queries: (N, D); records: (M, D).
        metric: "euclidean" or "cosine" (1 − cosine similarity).
    """
    q, r = queries.float().reshape(queries.shape[0], -1), records.float().reshape(records.shape[0], -1)
    if metric == "cosine":
        sim = F.normalize(q, dim=1) @ F.normalize(r, dim=1).T
        return (1.0 - sim.max(dim=1).values).clamp_min(0.0)
    if metric != "euclidean":
        raise ValueError(f"unknown metric {metric!r}; use 'euclidean' or 'cosine'")
    return torch.cdist(q, r).min(dim=1).values


def pool_distance_attack(
    members: torch.Tensor, non_members: torch.Tensor, pool: torch.Tensor, metric: str = "euclidean"
) -> AttackScore:
    """A real sample close to some synthetic image is more likely a training sample (score = −distance).

    Args:
        members, non_members: (N, D) / (M, D) real samples (flattened pixels or features); pool: (K, D).
    """
    return attack_scores(-nearest_distance(members, pool, metric), -nearest_distance(non_members, pool, metric))


def dcr_ratio(pool: torch.Tensor, members: torch.Tensor, non_members: torch.Tensor, metric: str = "euclidean") -> float:
    """Distance to closest record: median over the pool of (closest member) / (closest non-member) distance.

    Both reference sets must have the same size (a larger set is closer by chance alone); ≈ 1 when the pool is
    no closer to training samples than to unseen ones, ≪ 1 when it copies training samples.

    Raises:
        ValueError: when members and non_members differ in size.
    """
    if members.shape[0] != non_members.shape[0]:
        raise ValueError(f"dcr_ratio needs equal reference sets; got {members.shape[0]} and {non_members.shape[0]}")
    to_members = nearest_distance(pool, members, metric).median()
    to_non = nearest_distance(pool, non_members, metric).median()
    return round(float(to_members / to_non.clamp_min(1e-12)), 6)
