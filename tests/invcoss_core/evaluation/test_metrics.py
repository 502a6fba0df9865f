"""Accuracy-matrix metrics on hand-computed matrices."""

from __future__ import annotations

import math

import pytest

from invcoss_core.evaluation.metrics import (
    MetricError,
    average_accuracy,
    avg_prev,
    backward_transfer,
    elementwise_mean_sd,
    forgetting,
    mean_sd,
    paired_difference,
    recon_increase,
    sign_test_p,
    t975,
    task_backward_transfer,
)

NAN = math.nan
# Three stages; tasks 0, 1 belong to stage 0, task 2 to stage 1, task 3 to stage 2.
ACC = [
    [0.80, 0.60, 0.50, 0.40],
    [0.70, 0.65, 0.90, 0.45],
    [0.60, 0.50, 0.70, 0.85],
]
TASK_STAGE = [0, 0, 1, 2]


def test_average_accuracy_counts_only_seen_tasks() -> None:
    assert average_accuracy(ACC, TASK_STAGE, 0) == pytest.approx((0.80 + 0.60) / 2)
    assert average_accuracy(ACC, TASK_STAGE, 1) == pytest.approx((0.70 + 0.65 + 0.90) / 3)
    assert average_accuracy(ACC, TASK_STAGE) == pytest.approx((0.60 + 0.50 + 0.70 + 0.85) / 4)


def test_avg_prev_is_the_final_row_on_earlier_tasks() -> None:
    assert avg_prev(ACC[-1], TASK_STAGE, 3) == pytest.approx((0.60 + 0.50 + 0.70) / 3)


def test_avg_prev_scores_a_single_row_reference_on_the_same_tasks() -> None:
    joint_row = [0.9, 0.8, 0.7, 0.6]
    assert avg_prev(joint_row, TASK_STAGE, 3) == pytest.approx(0.8)


def test_backward_transfer_hand_computed() -> None:
    # (0.60 - 0.80) + (0.50 - 0.60) + (0.70 - 0.90) = -0.50 over 3 earlier tasks.
    assert backward_transfer(ACC, TASK_STAGE) == pytest.approx(-0.50 / 3)


def test_task_backward_transfer_hand_computed() -> None:
    per_task = task_backward_transfer(ACC, TASK_STAGE)
    assert per_task[:3] == pytest.approx([0.60 - 0.80, 0.50 - 0.60, 0.70 - 0.90]) and math.isnan(per_task[3])


def test_backward_transfer_positive_when_later_stages_help() -> None:
    acc = [[0.5, 0.1], [0.7, 0.9]]
    assert backward_transfer(acc, [0, 1]) == pytest.approx(0.2)


def test_backward_transfer_of_one_stage_is_nan() -> None:
    assert math.isnan(backward_transfer([[0.5, 0.6]], [0, 0]))


def test_forgetting_uses_the_best_earlier_accuracy() -> None:
    # task 1 peaked at 0.65 after stage 1: forgetting 0.65 - 0.50.
    assert forgetting(ACC, TASK_STAGE)[:3] == pytest.approx([0.20, 0.15, 0.20])
    assert math.isnan(forgetting(ACC, TASK_STAGE)[3])


def test_recon_increase_from_own_stage_to_the_end() -> None:
    recon = [[0.50, NAN, NAN], [0.60, 0.40, NAN], [0.70, 0.45, 0.30]]
    rise = recon_increase(recon, [0, 1, 2])
    assert rise[:2] == pytest.approx([0.20, 0.05])
    assert math.isnan(rise[2])


def test_metrics_ignore_unmeasured_cells() -> None:
    acc = [[0.8, NAN], [0.6, 0.9]]
    assert average_accuracy(acc, [0, 1], 0) == pytest.approx(0.8)


def test_mismatched_stage_assignment_is_refused() -> None:
    with pytest.raises(MetricError, match="one stage per column"):
        backward_transfer(ACC, [0, 1])
    with pytest.raises(MetricError, match="outside"):
        backward_transfer(ACC, [0, 0, 1, 5])


def test_mean_sd_uses_sample_sd_and_skips_nan() -> None:
    stat = mean_sd([1.0, 2.0, 3.0, NAN])
    assert (stat.mean, stat.sd, stat.n) == (pytest.approx(2.0), pytest.approx(1.0), 3)
    assert math.isnan(mean_sd([4.0]).sd), "one seed has no known spread"
    assert math.isnan(mean_sd([]).mean)


def test_elementwise_mean_sd_over_seeds() -> None:
    mean, sd = elementwise_mean_sd([[[1.0, NAN]], [[3.0, NAN]]])
    assert mean[0, 0] == pytest.approx(2.0)
    assert sd[0, 0] == pytest.approx(math.sqrt(2.0))
    assert math.isnan(mean[0, 1])


def test_paired_difference_by_seed_id_hand_computed() -> None:
    # seeds 0, 1, 2, 4 of a and 0, 1, 2, 3 of b: only 0, 1, 2 pair; differences 0.02, 0.04, 0.06
    a = {0: 0.70, 1: 0.66, 2: 0.75, 4: 0.10}
    b = {0: 0.68, 1: 0.62, 2: 0.69, 3: 0.99}
    d = paired_difference(a, b)
    assert d.n == 3 and d.mean == pytest.approx(0.04) and d.sd == pytest.approx(0.02)
    assert d.se == pytest.approx(0.02 / math.sqrt(3))
    low, high = d.ci95
    assert low == pytest.approx(0.04 - 4.303 * 0.02 / math.sqrt(3)) and high == pytest.approx(
        0.04 + 4.303 * 0.02 / 3**0.5
    )


def test_paired_difference_removes_the_spread_two_methods_share() -> None:
    shared = {0: 0.60, 1: 0.70, 2: 0.80}  # a seed effect both methods carry
    a = {k: v + 0.03 for k, v in shared.items()}
    d = paired_difference(a, shared)
    assert d.mean == pytest.approx(0.03) and d.sd == pytest.approx(0.0, abs=1e-12)
    assert mean_sd(list(a.values())).sd == pytest.approx(0.1)  # unpaired, the seed effect hides it


def test_paired_difference_of_one_seed_has_no_interval() -> None:
    d = paired_difference({0: 0.5}, {0: 0.4, 1: 0.3})
    assert d.n == 1 and d.mean == pytest.approx(0.1) and math.isnan(d.sd) and all(map(math.isnan, d.ci95))
    assert paired_difference({0: 0.5}, {1: 0.4}).n == 0


def test_t975_table() -> None:
    assert t975(1) == pytest.approx(12.706) and t975(4) == pytest.approx(2.776) and t975(100) == pytest.approx(2.042)
    with pytest.raises(MetricError):
        t975(0)


def test_sign_test_hand_computed() -> None:
    assert sign_test_p(5, 5) == pytest.approx(1 / 32)
    assert sign_test_p(4, 5) == pytest.approx((5 + 1) / 32)
    assert sign_test_p(3, 3) == pytest.approx(1 / 8)
    assert sign_test_p(0, 4) == 1.0
    with pytest.raises(MetricError):
        sign_test_p(6, 5)
