"""Probes: separable features score ~1, shuffled labels score ~chance, results are deterministic."""

from __future__ import annotations

import pytest
import torch

from invcoss_core.evaluation.probes import (
    ProbeError,
    ProbeScores,
    ProbeSettings,
    balanced_accuracy,
    knn_predict,
    pixel_features,
    probe_scores,
)

SETTINGS = ProbeSettings(knn_k=5, linear_steps=50)


def _clusters(n: int, classes: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    y = torch.arange(n) % classes
    return centres[y] + spread * torch.randn(n, dim, generator=g), y


def test_balanced_accuracy_hand_computed() -> None:
    pred = torch.tensor([0, 0, 0, 1, 1, 0])
    target = torch.tensor([0, 0, 0, 0, 1, 1])
    # class 0: 3 of 4 right; class 1: 1 of 2 right.
    assert balanced_accuracy(pred, target, 2) == pytest.approx((0.75 + 0.5) / 2)


def test_probes_separate_separable_clusters() -> None:
    x, y = _clusters(200, 3, 16, 0.3, seed=0)
    scores = probe_scores(x[:120], y[:120], x[120:], y[120:], 3, SETTINGS)
    assert scores.knn == pytest.approx(1.0)
    assert scores.linear == pytest.approx(1.0)
    assert (scores.n_train, scores.n_test) == (120, 80)


def test_probes_score_chance_on_shuffled_labels() -> None:
    x, y = _clusters(400, 2, 16, 0.3, seed=1)
    y = y[torch.randperm(400, generator=torch.Generator().manual_seed(2))]
    scores = probe_scores(x[:250], y[:250], x[250:], y[250:], 2, SETTINGS)
    assert 0.3 < scores.knn < 0.7
    assert 0.3 < scores.linear < 0.7


def test_probes_are_deterministic() -> None:
    x, y = _clusters(150, 3, 8, 2.0, seed=3)
    first = probe_scores(x[:100], y[:100], x[100:], y[100:], 3, SETTINGS)
    second = probe_scores(x[:100].clone(), y[:100].clone(), x[100:].clone(), y[100:].clone(), 3, SETTINGS)
    assert first == second


def test_knn_uses_cosine_not_euclidean_distance() -> None:
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    # Far from (1, 0) in Euclidean terms but pointing the same way.
    assert knn_predict(train, labels, torch.tensor([[10.0, 0.5]]), 2, k=1).tolist() == [0]


def test_single_training_class_is_refused() -> None:
    x = torch.randn(10, 4)
    with pytest.raises(ProbeError, match="single class"):
        probe_scores(x, torch.zeros(10, dtype=torch.long), x, torch.zeros(10, dtype=torch.long), 2, SETTINGS)


def test_pixel_features_pool_large_volumes() -> None:
    feats = pixel_features(torch.rand(3, 1, 32, 32, 32), max_dim=4096)
    assert feats.shape == (3, 4096)
    assert pixel_features(torch.rand(2, 3, 8, 8)).shape == (2, 192)


def test_task_scores_average_the_folds() -> None:
    # Subjects A (0-9) and C (20-39) carry the label in the sign of feature 0, subject B (10-19) the opposite sign.
    # Fold 0 trains on A + C and tests B: always wrong. Fold 1 trains on B + C (C outweighs B) and tests A: right.
    from invcoss_core.evaluation.data import ProbeTask
    from invcoss_core.evaluation.evaluate import task_scores

    y = torch.tensor([0, 1] * 20)
    sign = torch.where(y == 1, 1.0, -1.0)
    sign[10:20] *= -1
    sign[20:] *= 2
    features = torch.stack([sign, 1e-3 * torch.arange(40.0)], dim=1)
    subject = torch.tensor([0] * 10 + [1] * 10 + [2] * 20)
    fold0 = torch.where(subject == 1, 0, 1).to(torch.int8)
    fold1 = torch.where(subject == 0, 0, 1).to(torch.int8)
    task = ProbeTask("flip", "ct", torch.zeros(40, 1), y, fold0 == 1, ("a", "b"), folds=torch.stack([fold0, fold1]))

    def scores(folds: int) -> ProbeScores:
        return task_scores(features, task, ProbeSettings(knn_k=3, linear_steps=30, folds=folds))

    assert scores(1).linear == 0.0 and scores(1).n_test == 10 and scores(1).n_train == 30
    assert scores(2).linear == 0.5 and scores(2).n_test == 20 and scores(2).n_train == 60
    assert scores(9).n_test == 20, "folds beyond what the task offers are not invented"


def test_encoder_features_pooling_widths_and_the_probe_setting_reaches_the_model() -> None:
    from invcoss_core.config import build_config
    from invcoss_core.evaluation.data import ProbeTask
    from invcoss_core.evaluation.evaluate import probe_model
    from invcoss_core.evaluation.probes import encoder_features
    from invcoss_core.models import build_model

    cfg = build_config("tiny").model
    model = build_model(cfg)
    x = torch.rand(5, *cfg.spec("ct").input_shape)
    d = cfg.hidden_size
    assert encoder_features(model, x, "ct", 2).shape == (5, d)
    assert encoder_features(model, x, "ct", 2, pooling="mean_centre").shape == (5, 2 * d)
    assert encoder_features(model, x[:0], "ct", 2, pooling="mean_centre").shape == (0, 2 * d)
    assert ProbeSettings().features == "mean_centre", "CT/MRI tasks are labelled by the centre voxel"

    seen: list[str] = []
    embed = model.embed

    def recording(images: torch.Tensor, modality: str, pooling: str = "mean") -> torch.Tensor:
        seen.append(pooling)
        return embed(images, modality, pooling)

    model.embed = recording  # type: ignore[method-assign]
    task = ProbeTask(
        "t", "ct", torch.rand(8, *cfg.spec("ct").input_shape), torch.arange(8) % 2, torch.arange(8) < 6, ("a", "b")
    )
    for features in ("mean", "mean_centre"):
        probe_model(model, [task], ProbeSettings(knn_k=2, linear_steps=5, features=features))
        assert seen and set(seen) == {features}
        seen.clear()
