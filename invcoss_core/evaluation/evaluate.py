"""Evaluate one model after one stage: probes on every task, held-out reconstruction on every seen modality."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from invcoss_core.evaluation.data import BenchData, ProbeTask
from invcoss_core.evaluation.probes import (
    ProbeScores,
    ProbeSettings,
    encoder_features,
    pixel_features,
    probe_scores,
    stride_indices,
)
from invcoss_core.evaluation.recon import ReconSettings, decoder_probe_loss, own_decoder_loss
from invcoss_core.models import MultiModalMAE


@dataclass
class StageEval:
    """Measures of one model: per task {"knn", "linear"} balanced accuracy; per seen modality the held-out
    masked-reconstruction loss with the decoder co-trained on it (`recon`) and, when enabled, with a decoder
    refitted on the frozen encoder (`recon_refit`)."""

    probes: dict[str, dict[str, float]] = field(default_factory=dict)
    recon: dict[str, float] = field(default_factory=dict)
    recon_refit: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StageEval:
        """Inverse of `to_json`."""
        return cls(
            probes={k: dict(v) for k, v in data["probes"].items()},
            recon=dict(data["recon"]),
            recon_refit=dict(data.get("recon_refit", {})),
            seconds=float(data.get("seconds", 0.0)),
        )


def _capped(indices: torch.Tensor, settings: ProbeSettings) -> torch.Tensor:
    return indices[stride_indices(indices.numel(), settings.max_samples)]


def task_scores(features: torch.Tensor, task: ProbeTask, settings: ProbeSettings) -> ProbeScores:
    """Both probes of one task on precomputed features (N, D) of all its samples.

    With `settings.folds` > 1 the scores are the mean over the task's first folds (see `ProbeTask.folds`), and
    n_train / n_test are summed over them.
    """
    folds = [task.fold(k) for k in range(min(settings.folds, task.num_folds))]
    scores = [
        probe_scores(features[train], task.y[train], features[test], task.y[test], task.num_classes, settings)
        for train, test in ((_capped(a, settings), _capped(b, settings)) for a, b in folds)
    ]
    return ProbeScores(
        knn=sum(s.knn for s in scores) / len(scores),
        linear=sum(s.linear for s in scores) / len(scores),
        n_train=sum(s.n_train for s in scores),
        n_test=sum(s.n_test for s in scores),
    )


def probe_model(
    model: MultiModalMAE, tasks: Sequence[ProbeTask], settings: ProbeSettings, device: torch.device | str = "cpu"
) -> dict[str, dict[str, float]]:
    """Frozen-encoder kNN and linear balanced accuracy of `model` on every task."""
    out: dict[str, dict[str, float]] = {}
    for task in tasks:
        feats = encoder_features(model, task.x, task.modality, settings.batch_size, device, settings.features)
        scores = task_scores(feats, task, settings)
        out[task.name] = {"knn": scores.knn, "linear": scores.linear}
    return out


def probe_pixels(tasks: Sequence[ProbeTask], settings: ProbeSettings) -> dict[str, dict[str, float]]:
    """The raw-pixel baseline: the same probes on (pooled) pixels instead of encoder features."""
    out: dict[str, dict[str, float]] = {}
    for task in tasks:
        scores = task_scores(pixel_features(task.x), task, settings)
        out[task.name] = {"knn": scores.knn, "linear": scores.linear}
    return out


def evaluate_model(
    model: MultiModalMAE,
    data: BenchData,
    seen: Sequence[str],
    anchors: Mapping[str, dict[str, torch.Tensor]],
    probes: ProbeSettings,
    recon: ReconSettings,
    device: torch.device | str = "cpu",
) -> StageEval:
    """All measures of `model` after a stage.

    Args:
        seen: modalities trained so far (reconstruction is measured on these only).
        anchors: modality -> state of the decoder co-trained with it (its own stage's decoder).
    Raises:
        KeyError: when a seen modality has no anchor decoder.
    """
    start = time.perf_counter()
    result = StageEval(probes=probe_model(model, data.tasks, probes, device))
    for modality in seen:
        images = data.modalities[modality]
        result.recon[modality] = own_decoder_loss(model, anchors[modality], images.val, modality, recon, device).loss
        if recon.decoder_steps > 0:
            result.recon_refit[modality] = decoder_probe_loss(
                model, images.train, images.val, modality, recon, device
            ).loss
    result.seconds = time.perf_counter() - start
    return result
