"""Privacy gate: no synthetic image leaves the site while it is too close to one of the site's real images.

Each synthetic image is compared with every real training sample by two measures of the nearest neighbour:
- pixel: Pearson correlation over all pixels (channels included) — invariant to brightness and contrast, so a
  re-windowed copy is still caught;
- feature: cosine of the frozen encoder's mean-pooled features (`MultiModalMAE.embed`), centred on the real
  set's mean feature.
An image is blocked when either measure exceeds its threshold; blocked images are re-synthesised (up to
`max_regenerate_rounds`) or dropped. The real set is streamed in chunks of `chunk_size`, so memory stays bounded
(O(N·P + chunk·P + M·D) for N synthetic images of P pixels and M real features of width D).

Thresholds (GateConfig defaults) were measured on the real sample crops (`invcoss samples fetch`: CT
lung1/lung2, MRI brain/breast/EPI/MNI, H&E/IHC pathology) with tiny- and small-profile MAEs trained on them.
Nearest-real similarity to the training crops:
- the same crop + N(0, 0.05²), clamped: pixel median 0.82–0.96 (1 % quantile 0.03–0.90); feature ≥ 0.86–0.997;
- a held-out subject's crop: pixel max 0.54–0.83 (small-profile CT: max 0.97, 99 % quantile 0.93); feature up
  to 0.9999 (MRI, pathology);
- synthetic images: pixel max 0.73 (InvUNet) / 0.58 (pixel-space); feature up to 0.9999 (small pathology).

- pixel_threshold 0.9: an exact copy scores 1.0; a copy with N(0, σ²) noise scores about s/√(s² + σ²) for a
  crop of standard deviation s, so σ = 0.05 copies are blocked whenever s ≥ 0.103 (measured: nearly all
  pathology crops, most MRI crops). Misses are near-uniform crops (CT median s = 0.07–0.10), where σ = 0.05
  noise swamps the content: such a noisy copy is as close to other subjects' uniform crops as to its source
  and holds little of the patient. Distinct subjects stay below 0.9 except ~5 % of CT look-alikes, which are
  then regenerated (a cost, not a leak); no synthetic image came near 0.9.
- feature_threshold 0.99999: features do not separate copies from look-alikes with these models — distinct
  subjects' crops and synthetic images reach 0.9999 even after centring (raw cosines are ≥ 0.99 for any
  pair), so the feature measure is only a backstop against exact copies (cosine 1 up to rounding), e.g. of
  uniform crops, whose pixel correlation is undefined (0 here).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from invcoss_core.artifact import GateSummary
from invcoss_core.config import GateConfig
from invcoss_core.inversion.disguise import copy_similarity
from invcoss_core.models import MultiModalMAE

logger = logging.getLogger(__name__)

__all__ = [
    "GateOutcome",
    "NearestReal",
    "RealReference",
    "Regenerate",
    "apply_gate",
    "disguised_copy",
    "gate_blocks",
    "nearest_real",
    "summarise_similarity",
]

QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.99, 1.0)

# Re-synthesise k images: returns (k, C, *S) images and their (k, D) features.
Regenerate = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class NearestReal:
    """Nearest-real similarities of N synthetic images: pixel (N,) correlation, feature (N,) cosine, and the
    (N,) index of the nearest real sample under each measure."""

    pixel: torch.Tensor
    feature: torch.Tensor
    pixel_index: torch.Tensor
    feature_index: torch.Tensor


def _standardise(images: torch.Tensor) -> torch.Tensor:
    """(N, C, *S) → (N, C·∏S) rows with zero mean and unit norm; a constant image becomes a zero row."""
    flat = images.reshape(images.shape[0], -1).float()
    flat = flat - flat.mean(dim=1, keepdim=True)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-8)


def _chunks(real: Dataset[torch.Tensor] | torch.Tensor, chunk_size: int) -> Iterator[torch.Tensor]:
    if isinstance(real, torch.Tensor):
        yield from real.split(chunk_size)
        return
    yield from DataLoader(real, batch_size=chunk_size, shuffle=False)


class RealReference:
    """The site's real set as the gate sees it: pixels streamed in chunks, encoder features cached once.

    Features are centred on the real set's mean feature before the cosine *(ours)*: mean-pooled ViT features
    share a large common component, and their raw cosine is ≥ 0.99 between any two crops (measured), which would
    block every synthetic image without telling a copy from a look-alike.

    Args:
        real: a Dataset of (C, *img_size) tensors or one (M, C, *img_size) tensor; it stays where it is and is
            read chunk by chunk (memory O(chunk · pixels + M · D)).
        model: the frozen encoder (`embed`); modality: its tokenizer.
        chunk_size: real samples per chunk; device: where to compute (default: the model's device).
    Raises:
        ValueError: when the real set is empty.
    """

    @torch.no_grad()
    def __init__(
        self,
        real: Dataset[torch.Tensor] | torch.Tensor,
        model: MultiModalMAE,
        modality: str,
        chunk_size: int = 256,
        device: torch.device | str | None = None,
    ) -> None:
        self.real = real
        self.model = model
        self.modality = modality
        self.chunk_size = chunk_size
        self.device = torch.device(device) if device is not None else model.device
        features = [
            model.embed(chunk.to(self.device, torch.float32), modality) for chunk in self.chunks() if len(chunk)
        ]
        if not features:
            raise ValueError("the privacy gate needs the site's real training images; the real set is empty")
        raw = torch.cat(features)  # (M, D)
        self.mean_feature = raw.mean(dim=0)
        self.features = F.normalize(raw - self.mean_feature, dim=1)  # (M, D) centred, unit rows
        self.sample_shape = tuple(self.real[0].shape)

    def __len__(self) -> int:
        return self.features.shape[0]

    def chunks(self) -> Iterator[torch.Tensor]:
        """The real samples in order, (chunk, C, *img_size) at a time."""
        return _chunks(self.real, self.chunk_size)

    def centred(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) features → centred on the real mean, unit rows (comparable with `self.features`)."""
        return F.normalize(features.to(self.device, torch.float32) - self.mean_feature, dim=1)


@torch.no_grad()
def nearest_real(
    synthetic: torch.Tensor,
    reference: RealReference,
    synthetic_features: torch.Tensor | None = None,
) -> NearestReal:
    """Nearest real neighbour of every synthetic image by pixel correlation and by centred feature cosine.

    Args:
        synthetic: (N, C, *img_size) images (any float dtype).
        reference: the site's real set (`RealReference`).
        synthetic_features: (N, D) `embed` features of `synthetic` when already known (saves an encoder pass).
    Returns:
        NearestReal with float32 CPU tensors.
    Raises:
        ValueError: when the synthetic images' shape differs from the real samples'.
    """
    if tuple(synthetic.shape[1:]) != reference.sample_shape:
        raise ValueError(
            f"synthetic images have shape {tuple(synthetic.shape[1:])} but real samples {reference.sample_shape}"
        )
    device = reference.device
    if synthetic_features is None:
        synthetic_features = reference.model.embed(synthetic.to(device, torch.float32), reference.modality)
    syn_feat = reference.centred(synthetic_features)  # (N, D)
    syn_pix = _standardise(synthetic.to(device))  # (N, P)
    n = synthetic.shape[0]
    best = {"pixel": torch.full((n,), -2.0, device=device), "feature": torch.full((n,), -2.0, device=device)}
    index = {
        "pixel": torch.zeros(n, dtype=torch.long, device=device),
        "feature": torch.zeros_like(best["pixel"]).long(),
    }
    offset = 0
    for chunk in reference.chunks():
        size = chunk.shape[0]
        sims = {
            "pixel": syn_pix @ _standardise(chunk.to(device)).T,  # (N, chunk)
            "feature": syn_feat @ reference.features[offset : offset + size].T,
        }
        for key, matrix in sims.items():
            value, where = matrix.max(dim=1)
            better = value > best[key]
            best[key][better] = value[better]
            index[key][better] = where[better] + offset
        offset += size
    return NearestReal(
        pixel=best["pixel"].cpu(),
        feature=best["feature"].cpu(),
        pixel_index=index["pixel"].cpu(),
        feature_index=index["feature"].cpu(),
    )


def summarise_similarity(values: torch.Tensor) -> list[float]:
    """The 50/90/99/100 % quantiles of nearest-real similarities (N,); empty when N = 0."""
    if values.numel() == 0:
        return []
    return [round(float(q), 6) for q in torch.quantile(values.float(), torch.tensor(QUANTILES))]


def disguised_copy(images: torch.Tensor, reference: RealReference, config: GateConfig) -> torch.Tensor:
    """(N,) best pixel correlation of each image with any real sample after undoing a flip, shift or crop-zoom.

    Off (`copy_threshold` None): zeros. See `invcoss_core.inversion.disguise.copy_similarity`.
    """
    if config.copy_threshold is None:
        return torch.zeros(images.shape[0])

    def real_at(index: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.as_tensor(reference.real[int(i)]) for i in index])

    best, _ = copy_similarity(
        images,
        reference.chunks,
        real_at,
        max_shift=config.copy_max_shift,
        scales=config.copy_scales,
        candidates_per_image=config.copy_candidates,
        device=reference.device,
    )
    return best


@dataclass(frozen=True)
class GateOutcome:
    """Images that may leave the site and what the gate measured.

    images: (K, C, *S) the kept images (K ≤ N), in the order they passed; features: (K, D) their features;
    pixel / feature: (K,) their nearest-real similarities; summary: the manifest's `privacy_gate`.
    """

    images: torch.Tensor
    features: torch.Tensor
    pixel: torch.Tensor
    feature: torch.Tensor
    summary: GateSummary


def apply_gate(
    images: torch.Tensor,
    features: torch.Tensor,
    real: Dataset[torch.Tensor] | torch.Tensor,
    model: MultiModalMAE,
    modality: str,
    config: GateConfig,
    *,
    regenerate: Regenerate | None = None,
    device: torch.device | str | None = None,
) -> GateOutcome:
    """Check every synthetic image against the real set; regenerate or drop the ones above a threshold.

    Args:
        images: (N, C, *img_size) synthetic images, as they would leave the site (e.g. float16).
        features: (N, D) their encoder features.
        real: the site's real training samples (see `nearest_real`).
        config: thresholds, action (`regenerate` | `drop`) and rounds.
        regenerate: makes k replacement images; required for action `regenerate` (without it blocked images
            are dropped).
    Returns:
        GateOutcome with the kept images and the GateSummary (counts over all rounds; max similarity and
        quantiles of what left).
    Raises:
        ValueError: for an empty real set or mismatched shapes.
    """
    reference = RealReference(real, model, modality, config.chunk_size, device)
    kept_images: list[torch.Tensor] = []
    kept_features: list[torch.Tensor] = []
    kept_pix: list[torch.Tensor] = []
    kept_feat: list[torch.Tensor] = []
    kept_copy: list[torch.Tensor] = []
    checked = blocked_total = dropped = regenerated = rounds = 0
    pending_images, pending_features = images, features
    while pending_images.shape[0] > 0:
        near = nearest_real(pending_images, reference, pending_features)
        copy = disguised_copy(pending_images, reference, config)
        blocked = (near.pixel > config.pixel_threshold) | (near.feature > config.feature_threshold)
        if config.copy_threshold is not None:
            blocked |= copy > config.copy_threshold
        checked += pending_images.shape[0]
        n_blocked = int(blocked.sum())
        blocked_total += n_blocked
        keep = ~blocked
        kept_images.append(pending_images[keep])
        kept_features.append(pending_features[keep.to(pending_features.device)])
        kept_pix.append(near.pixel[keep])
        kept_feat.append(near.feature[keep])
        kept_copy.append(copy[keep])
        if n_blocked == 0:
            break
        logger.info(
            "privacy gate: %d of %d %s images above threshold (round %d)",
            n_blocked,
            pending_images.shape[0],
            modality,
            rounds,
        )
        if config.action == "regenerate" and regenerate is not None and rounds < config.max_regenerate_rounds:
            pending_images, pending_features = regenerate(n_blocked)
            regenerated += n_blocked
            rounds += 1
        else:
            dropped = n_blocked
            break
    pixel = torch.cat(kept_pix)
    feature = torch.cat(kept_feat)
    measures = {"pixel": pixel, "feature": feature}
    threshold = {"pixel": config.pixel_threshold, "feature": config.feature_threshold}
    if config.copy_threshold is not None:
        measures["copy"] = torch.cat(kept_copy)
        threshold["copy"] = config.copy_threshold
    summary = GateSummary(
        checked=checked,
        blocked=blocked_total,
        dropped=dropped,
        regenerated=regenerated,
        threshold=threshold,
        max_similarity={k: round(float(v.max()), 6) for k, v in measures.items()} if pixel.numel() else {},
        quantiles={k: summarise_similarity(v) for k, v in measures.items()} if pixel.numel() else {},
    )
    return GateOutcome(
        images=torch.cat(kept_images),
        features=torch.cat(kept_features),
        pixel=pixel,
        feature=feature,
        summary=summary,
    )


def gate_blocks(
    images: torch.Tensor, reference: RealReference, config: GateConfig, features: torch.Tensor | None = None
) -> torch.Tensor:
    """(N,) True where an image is too close to one of the reference's real samples, by the gate's rules.

    The same rules as `apply_gate` (pixel correlation, centred feature cosine, and the disguised-copy search when
    `copy_threshold` is set), for a caller that needs verdicts only (a consortium site gating candidates it did not
    synthesise).
    """
    near = nearest_real(images, reference, features)
    blocked = (near.pixel > config.pixel_threshold) | (near.feature > config.feature_threshold)
    if config.copy_threshold is not None:
        blocked |= disguised_copy(images, reference, config) > config.copy_threshold
    return blocked
