"""The attacks as pure functions: hand-computed AUCs, the TPR at 1 % FPR, distances and the DCR ratio."""

from __future__ import annotations

import pytest
import torch

from invcoss_core.config import build_config
from invcoss_core.models import build_model
from invcoss_core.privacy import (
    attack_scores,
    calibrated_loss_attack,
    dcr_ratio,
    loss_attack,
    nearest_distance,
    per_sample_losses,
    pool_distance_attack,
)


def test_attack_scores_hand_computed() -> None:
    perfect = attack_scores(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0]))
    assert perfect.auc == 1.0 and perfect.tpr_at_1pct_fpr == 1.0
    assert (perfect.members, perfect.non_members) == (2, 2)
    # member scores 1, 3 vs non-members 0, 2: pairs (1>0), (1<2), (3>0), (3>2) -> 3 of 4
    mixed = attack_scores(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 2.0]))
    assert mixed.auc == pytest.approx(0.75)
    assert mixed.tpr_at_1pct_fpr == pytest.approx(0.5)  # before any non-member is flagged, only 3 is caught
    inverted = attack_scores(torch.tensor([0.0]), torch.tensor([1.0]))
    assert inverted.auc == 0.0


def test_attack_scores_refuse_empty_or_non_finite_input() -> None:
    with pytest.raises(ValueError, match="members and non-members"):
        attack_scores(torch.tensor([]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="NaN"):
        attack_scores(torch.tensor([float("nan")]), torch.tensor([1.0]))


def test_loss_attacks_score_lower_loss_and_larger_drop_as_member() -> None:
    assert loss_attack(torch.tensor([0.1, 0.2]), torch.tensor([0.5, 0.6])).auc == 1.0
    # raw losses look alike, but training lowered the members' loss by 0.5 and the non-members' by 0.1
    calibrated = calibrated_loss_attack(
        member_after=torch.tensor([0.5, 0.6]),
        member_before=torch.tensor([1.0, 1.1]),
        non_member_after=torch.tensor([0.5, 0.6]),
        non_member_before=torch.tensor([0.6, 0.7]),
    )
    assert calibrated.auc == 1.0


def test_pool_distance_attack_and_dcr_ratio_see_a_pool_that_copies_members() -> None:
    g = torch.Generator().manual_seed(0)
    members, non_members = torch.randn(20, 64, generator=g), torch.randn(20, 64, generator=g)
    copying_pool = members[:10] + 0.01 * torch.randn(10, 64, generator=g)
    assert pool_distance_attack(members[:10], non_members[:10], copying_pool).auc == 1.0
    assert dcr_ratio(copying_pool, members, non_members) < 0.1
    fresh_pool = torch.randn(10, 64, generator=g)
    assert 0.5 < dcr_ratio(fresh_pool, members, non_members) < 2.0
    with pytest.raises(ValueError, match="equal"):
        dcr_ratio(fresh_pool, members, non_members[:5])


def test_nearest_distance_metrics() -> None:
    q = torch.tensor([[1.0, 0.0]])
    r = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    assert nearest_distance(q, r).item() == pytest.approx(2**0.5)
    assert nearest_distance(q, r, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="metric"):
        nearest_distance(q, r, "manhattan")


def test_per_sample_losses_use_the_same_masks_for_every_model() -> None:
    config = build_config("tiny")
    model = build_model(config.model).eval()
    images = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    a, b = per_sample_losses([model, model], images, "xray", torch.Generator().manual_seed(2), repeats=2)
    assert a.shape == (5,) and torch.equal(a, b)  # same model, same masks: identical per-sample losses
    again = per_sample_losses([model], images, "xray", torch.Generator().manual_seed(2), repeats=2)[0]
    assert torch.equal(a, again)  # reproducible from the generator
    assert bool((a > 0).all())
