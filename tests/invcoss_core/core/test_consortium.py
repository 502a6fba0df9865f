"""Consortium-stage method steps: exact statistics pooling, rounds equal to a one-site stage, the all-site gate."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import ConcatDataset

from invcoss_core.artifact import decode_artifact
from invcoss_core.consortium import (
    consortium_artifact,
    gate_verdicts,
    initial_weights,
    pool_sufficient_stats,
    round_config,
    site_sufficient_stats,
    synthesize_candidates,
    train_round,
)
from invcoss_core.data import TensorImages
from invcoss_core.stats import SufficientStats, content_keyed_noise, stat_key
from invcoss_core.training import run_stage
from tests.helpers import make_config, structured_images


def test_pooled_sufficient_statistics_equal_those_of_the_union_of_the_sites_images() -> None:
    cfg = make_config(train={"batch_size": 8})
    weights = initial_weights(cfg, None)
    site_a = TensorImages(structured_images(13, (1, 16, 16, 16), seed=4, kind="blobs"))
    site_b = TensorImages(structured_images(21, (1, 16, 16, 16), seed=5, kind="stripes"))
    parts = [site_sufficient_stats(cfg, "ct", data, weights, torch.device("cpu")) for data in (site_a, site_b)]
    pooled = pool_sufficient_stats(parts)
    # The union seen by one party in another batching: masks follow each sample's content, not its batch.
    union_cfg = make_config(train={"batch_size": 5})
    union = site_sufficient_stats(union_cfg, "ct", ConcatDataset([site_b, site_a]), weights, torch.device("cpu"))
    expected = union.to_stats()
    assert pooled["ct.tokens"].item() == expected["ct.tokens"].item() == parts[0].count + parts[1].count
    for block in range(cfg.model.num_layers):
        for which in ("mean", "var"):
            key = stat_key("ct", block, which)
            torch.testing.assert_close(pooled[key], expected[key], rtol=1e-5, atol=1e-6)
    # Per-site statistics differ from the pooled ones: pooling is not a no-op on these inputs.
    alone = parts[0].to_stats()
    assert not torch.allclose(alone[stat_key("ct", 0, "mean")], pooled[stat_key("ct", 0, "mean")], atol=1e-4)


def test_content_keyed_masks_depend_on_the_sample_only() -> None:
    x = torch.rand(4, 1, 16, 16, 16)
    a = content_keyed_noise(x, 64)
    b = content_keyed_noise(x.flip(0), 64).flip(0)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])


def test_sufficient_statistics_wire_form_round_trips_and_rejects_bad_shapes() -> None:
    stats = SufficientStats("ct", 10, torch.rand(2, 8, dtype=torch.float64), torch.rand(2, 8, dtype=torch.float64))
    back = SufficientStats.from_tensors(stats.to_tensors(), "ct", 2, 8)
    assert back.count == 10 and torch.equal(back.sum, stats.sum) and torch.equal(back.sumsq, stats.sumsq)
    with pytest.raises(ValueError, match="shape"):
        SufficientStats.from_tensors(stats.to_tensors(), "ct", 3, 8)
    bad = stats.to_tensors()
    bad["ct.sum"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        SufficientStats.from_tensors(bad, "ct", 2, 8)


def test_one_site_rounds_with_carried_optimizer_state_equal_the_one_site_stage(ct_data: TensorImages) -> None:
    """A consortium of one site is today's stage cut into rounds: the same weights, step for step."""
    cfg = make_config(train={"epochs": 3, "batch_size": 8, "steps_per_epoch": 2})
    reference = run_stage(config=cfg, modality="ct", train_data=ct_data, run_id="r")
    rcfg = round_config(cfg, rounds=3, local_steps=2, local_epochs=1)
    weights = initial_weights(rcfg, None)
    state = None
    for r in (1, 2, 3):
        result = train_round(
            config=rcfg,
            modality="ct",
            train_data=ct_data,
            incoming=None,
            global_weights=weights,
            round_index=r,
            epochs_per_round=1,
            run_id="r",
            device=torch.device("cpu"),
            optimizer_state=state,
        )
        weights, state = result.weights, result.optimizer_state
        assert result.num_examples == len(ct_data)
    for key, value in reference.artifact.weights.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-6, msg=key)


def test_a_planted_copy_of_the_second_sites_image_is_blocked_by_that_site_only(ct_data: TensorImages) -> None:
    cfg = make_config(inversion={"iterations": 2, "iterations_per_batch": 2}, replay={"strategy": "inversion"})
    weights = initial_weights(cfg, None)
    site_a = TensorImages(structured_images(12, (1, 16, 16, 16), seed=7, kind="blobs"))
    site_b = TensorImages(structured_images(12, (1, 16, 16, 16), seed=8, kind="stripes"))
    stats = pool_sufficient_stats(
        [site_sufficient_stats(cfg, "ct", d, weights, torch.device("cpu")) for d in (site_a, site_b)]
    )
    candidates, _ = synthesize_candidates(
        config=cfg, modality="ct", weights=weights, stats=stats, num_images=4, stage_index=1, device=torch.device("cpu")
    )
    planted = torch.cat([candidates, site_b[5].unsqueeze(0).half()])  # inversion ran at A; the copy is B's
    verdicts = {
        name: gate_verdicts(
            config=cfg, modality="ct", weights=weights, candidates=planted, real_data=data, device=torch.device("cpu")
        )
        for name, data in (("A", site_a), ("B", site_b))
    }
    assert verdicts["A"].passed[-1] is True  # A never saw it: its own gate cannot catch it
    assert verdicts["B"].passed[-1] is False
    passed = [a and b for a, b in zip(verdicts["A"].passed, verdicts["B"].passed)]
    files = consortium_artifact(
        config=cfg,
        modality="ct",
        weights=weights,
        pooled_stats=stats,
        incoming=None,
        candidates=planted,
        passed=passed,
        blocked_by_site={"A": verdicts["A"].blocked, "B": verdicts["B"].blocked},
        run_id="r",
        stage_index=1,
        site="A",
        real_data=site_a,
        device=torch.device("cpu"),
        signer=None,
    )
    artifact = decode_artifact(files)
    released = artifact.synthetic["ct"]
    assert released.shape[0] == sum(passed) and sum(passed) <= 4
    for image in released:
        assert not torch.equal(image, site_b[5].half())
    assert artifact.manifest.privacy_gate is not None
    assert artifact.manifest.privacy_gate.blocked == 5 - sum(passed)
    assert artifact.manifest.metrics["gate_blocked_by_B"] >= 1
