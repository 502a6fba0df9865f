"""Feature statistics: recorded values are the exact per-channel moments and survive the artifact."""

from __future__ import annotations

import pytest
import torch

from invcoss_core.artifact import decode_artifact, encode_artifact
from invcoss_core.config import build_config
from invcoss_core.models import build_model
from invcoss_core.stats import FeatureStatsRecorder, capture_block_inputs, merge_stats, modality_stats, stat_key


def test_recorder_matches_direct_moments() -> None:
    cfg = build_config("tiny").model
    model = build_model(cfg).eval()
    x = torch.rand(6, 1, 16, 16, 16)
    noise = torch.rand(6, 64)
    recorder = FeatureStatsRecorder(model, "ct")
    with torch.no_grad():
        with recorder.recording():
            model.forward_encoder(x[:3], "ct", noise=noise[:3])
        with recorder.recording():
            model.forward_encoder(x[3:], "ct", noise=noise[3:])
        with capture_block_inputs(model) as captured:
            model.forward_encoder(x, "ct", noise=noise)
    stats = recorder.result()
    assert recorder.count == 6 * 16  # 16 visible tokens of 64 per sample
    for block, tokens in enumerate(captured):
        flat = tokens.reshape(-1, tokens.shape[-1]).double()
        torch.testing.assert_close(stats[stat_key("ct", block, "mean")], flat.mean(0).float(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            stats[stat_key("ct", block, "var")], flat.var(0, unbiased=False).float(), atol=1e-5, rtol=1e-4
        )
    mean, var = modality_stats(stats, "ct", depth=cfg.num_layers)
    assert mean.shape == var.shape == (cfg.num_layers, cfg.hidden_size)


def test_empty_recorder_refuses_to_report() -> None:
    with pytest.raises(RuntimeError, match="no feature statistics"):
        FeatureStatsRecorder(build_model(build_config("tiny").model), "ct").result()


def test_stats_round_trip_through_artifact() -> None:
    cfg = build_config("tiny").model
    model = build_model(cfg)
    recorder = FeatureStatsRecorder(model, "pathology")
    with torch.no_grad(), recorder.recording():
        model.forward_encoder(torch.rand(4, 3, 16, 16), "pathology")
    stats = recorder.result()
    files = encode_artifact(
        run_id="r",
        stage_index=1,
        site="A",
        modalities=["pathology"],
        profile="tiny",
        replay="none",
        parent_sha256=None,
        architecture=cfg,
        weights=model.state_dict(),
        stats=stats,
        synthetic={},
    )
    back = decode_artifact(files).stats
    assert set(back) == set(stats) and all(torch.equal(back[k], v) for k, v in stats.items())


def test_merge_keeps_earlier_modalities_and_replaces_revisited() -> None:
    old = {"ct.block0.mean": torch.zeros(2), "mri.block0.mean": torch.zeros(2)}
    new = {"mri.block0.mean": torch.ones(2)}
    merged = merge_stats(old, new)
    assert torch.equal(merged["ct.block0.mean"], torch.zeros(2)) and torch.equal(
        merged["mri.block0.mean"], torch.ones(2)
    )


def test_missing_modality_stats_raise_key_error() -> None:
    with pytest.raises(KeyError, match="mri"):
        modality_stats({}, "mri", depth=2)
