"""Frozen-encoder probes: cosine kNN and a linear classifier on standardised features, scored by balanced accuracy.

Both probes are deterministic functions of their inputs (no random state): kNN (scikit-learn's) has no parameters,
and the linear probe starts from zeros and runs full-batch L-BFGS, whose path depends on the data only. The
train/test split is the probe task's own (subject-level where the labels allow it), never re-drawn here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from sklearn.neighbors import KNeighborsClassifier

from invcoss_core.models import MultiModalMAE


class ProbeError(ValueError):
    """A probe cannot be fitted: an empty split, a single class in training, mismatched shapes."""


class ProbeSettings(BaseModel):
    """How the probes are fitted; one setting for every method so that the numbers compare."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    knn_k: int = Field(10, gt=0)  # neighbours that vote (similarity-weighted)
    linear_steps: int = Field(100, gt=0)  # L-BFGS iterations of the full-batch linear probe
    linear_weight_decay: float = Field(1e-3, ge=0)  # L2 on the weights, relative to the mean loss
    max_samples: int | None = Field(4000, gt=0)  # per task and split; a deterministic stride keeps the rest
    # Cross-validation folds averaged per task (other held-out subjects, or the mirrored region cut), capped by
    # what the task offers; 1 scores the primary split only.
    folds: int = Field(1, gt=0)
    # Encoder feature per sample (`MultiModalMAE.embed`): "mean_centre" adds the tokens at the input's centre to
    # the mean of all tokens. Every CT and MRI task is labelled by the centre voxel (tissue class, inside a
    # tumour), which a mean over the whole input dilutes; the pathology tasks are whole-patch properties, which the
    # mean half still carries.
    features: Literal["mean", "mean_centre"] = "mean_centre"
    batch_size: int = Field(256, gt=0)  # feature extraction batch


@dataclass(frozen=True)
class ProbeScores:
    """Balanced accuracies (mean per-class recall, in [0, 1]) of both probes on one task's test split."""

    knn: float
    linear: float
    n_train: int
    n_test: int


def balanced_accuracy(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean over the classes present in `target` of the share of their samples predicted correctly.

    Kept instead of `sklearn.metrics.balanced_accuracy_score`: the same value (|diff| < 1e-9) in about a tenth of
    the time at the bench's sizes (benchmarks/bench_library_numerics.py, docs/results/library-numerics).

    Args:
        pred, target: (N,) integer class ids.
    Returns:
        balanced accuracy in [0, 1]; chance level is 1 / (classes present).
    """
    recalls = []
    for c in range(num_classes):
        member = target == c
        if bool(member.any()):
            recalls.append(float((pred[member] == c).float().mean()))
    if not recalls:
        raise ProbeError("balanced accuracy of an empty test set")
    return sum(recalls) / len(recalls)


def _similarity_weights(distances: np.ndarray) -> np.ndarray:
    """Vote weights from cosine distances: the similarity, clipped at 0, plus 1e-9 so every neighbour counts."""
    return np.clip(1.0 - distances, 0.0, None) + 1e-9


def knn_predict(
    train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, num_classes: int, k: int
) -> torch.Tensor:
    """Similarity-weighted vote of the k nearest training samples under cosine similarity (scikit-learn).

    scikit-learn's brute-force neighbours gave the same labels as our former torch vote on every test sample at
    the bench's sizes, in no more time (benchmarks/bench_library_numerics.py, docs/results/library-numerics).

    Args:
        train_f: (N, D) features; train_y: (N,) labels in [0, num_classes); test_f: (M, D).
    Returns:
        (M,) predicted labels (int64). Ties go to the lower class id (deterministic).
    """
    classifier = KNeighborsClassifier(
        n_neighbors=min(k, train_f.shape[0]), metric="cosine", algorithm="brute", weights=_similarity_weights
    )
    classifier.fit(train_f.double().numpy(), train_y.long().numpy())
    return torch.from_numpy(np.asarray(classifier.predict(test_f.double().numpy()), dtype=np.int64))


def linear_predict(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    test_f: torch.Tensor,
    num_classes: int,
    steps: int,
    weight_decay: float,
) -> torch.Tensor:
    """Multinomial logistic regression on standardised features, class-balanced, full-batch L-BFGS from zeros.

    Kept instead of scikit-learn's `LogisticRegression`: it reaches our labels only at tol 1e-8, and then takes
    1.6-2x our time at the CPU bench's sizes (0.86x at the base profile's cap; benchmarks/bench_library_numerics.py,
    docs/results/library-numerics).

    Args:
        train_f: (N, D); train_y: (N,); test_f: (M, D).
        steps: L-BFGS iterations; weight_decay: L2 strength on the weights.
    Returns:
        (M,) predicted labels.
    """
    x = train_f.double()
    mean = x.mean(dim=0, keepdim=True)
    std = x.std(dim=0, keepdim=True).clamp_min(1e-6)
    x = (x - mean) / std
    y = train_y.long()
    counts = torch.bincount(y, minlength=num_classes).double()
    class_weight = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp_min(1)), torch.zeros(()))
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ w + b, y, weight=class_weight) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        z = (test_f.double() - mean) / std
        return (z @ w + b).argmax(dim=1)


def probe_scores(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    test_f: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    settings: ProbeSettings,
) -> ProbeScores:
    """Fit both probes on the training features and score them on the test features.

    Raises:
        ProbeError: for an empty split or fewer than two training classes.
    """
    if train_f.shape[0] == 0 or test_f.shape[0] == 0:
        raise ProbeError(f"empty probe split: {train_f.shape[0]} train / {test_f.shape[0]} test samples")
    if torch.unique(train_y).numel() < 2:
        raise ProbeError("the probe's training split holds a single class; a classifier cannot be fitted")
    if not (bool(torch.isfinite(train_f).all()) and bool(torch.isfinite(test_f).all())):
        raise ProbeError("probe features hold NaN or inf")
    knn = knn_predict(train_f, train_y, test_f, num_classes, settings.knn_k)
    lin = linear_predict(train_f, train_y, test_f, num_classes, settings.linear_steps, settings.linear_weight_decay)
    return ProbeScores(
        knn=balanced_accuracy(knn, test_y, num_classes),
        linear=balanced_accuracy(lin, test_y, num_classes),
        n_train=int(train_f.shape[0]),
        n_test=int(test_f.shape[0]),
    )


def stride_indices(n: int, cap: int | None) -> torch.Tensor:
    """At most `cap` indices of range(n) at an even stride (deterministic sub-sampling)."""
    if cap is None or n <= cap:
        return torch.arange(n)
    return torch.linspace(0, n - 1, cap).round().long().unique()


@torch.no_grad()
def encoder_features(
    model: MultiModalMAE,
    images: torch.Tensor,
    modality: str,
    batch_size: int,
    device: torch.device | str = "cpu",
    pooling: str = "mean",
) -> torch.Tensor:
    """Frozen-encoder features of `images` (unmasked patch tokens pooled by `pooling`, see `MultiModalMAE.embed`).

    Args:
        images: (N, C, *img_size) in [0, 1].
    Returns:
        (N, D), or (N, 2·D) for "mean_centre", float32 on the CPU.
    """
    model.eval()
    out = [
        model.embed(images[i : i + batch_size].to(device), modality, pooling).cpu()
        for i in range(0, len(images), batch_size)
    ]
    width = model.cfg.hidden_size * (2 if pooling == "mean_centre" else 1)
    return torch.cat(out) if out else torch.zeros(0, width)


PIXEL_FEATURE_DIM = 4096  # the raw-pixel baseline pools its input to at most this many values


def pixel_features(images: torch.Tensor, max_dim: int = PIXEL_FEATURE_DIM) -> torch.Tensor:
    """Raw-pixel baseline features: the flattened image, average-pooled until at most `max_dim` values.

    Args:
        images: (N, C, *spatial).
    Returns:
        (N, <= max_dim) float32.
    """
    x = images.float()
    pool = F.avg_pool3d if x.dim() == 5 else F.avg_pool2d
    while math.prod(x.shape[1:]) > max_dim and min(x.shape[2:]) >= 2:
        x = pool(x, 2)
    return x.flatten(1)


FeatureFn = Callable[[torch.Tensor, str], torch.Tensor]
