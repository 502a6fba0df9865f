"""Replay strategies: k-means buffer size, EWC penalty, two consecutive stages with every strategy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from invcoss_core.artifact import read_artifact_dir
from invcoss_core.data import TensorImages
from invcoss_core.replay import ReplayError, build_replay, replay_class
from invcoss_core.replay.kmeans import kmeans
from invcoss_core.replay.real_buffer import select_buffer
from invcoss_core.training import run_stage
from tests.helpers import make_config, structured_images


def test_kmeans_separates_obvious_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(50, 4, generator=g) + 10, torch.randn(50, 4, generator=g) - 10])
    result = kmeans(points, 2, iters=20, generator=torch.Generator().manual_seed(1))
    assert len(set(result.labels[:50].tolist())) == 1 and len(set(result.labels[50:].tolist())) == 1
    assert result.labels[0] != result.labels[-1]


def test_kmeans_rejects_bad_k() -> None:
    with pytest.raises(ValueError, match="1 <= k <= N"):
        kmeans(torch.randn(3, 2), 4, iters=5, generator=torch.Generator())


@pytest.mark.parametrize("n", [200, 1000, 1234])
def test_buffer_holds_five_percent_with_one_percent_clusters(n: int) -> None:
    feats = torch.randn(n, 8, generator=torch.Generator().manual_seed(n))
    size, clusters = round(0.05 * n), round(0.01 * n)
    idx = select_buffer(feats, size, clusters, iters=10, generator=torch.Generator().manual_seed(0))
    assert idx.numel() == size and idx.unique().numel() == size


def test_real_buffer_stage_keeps_five_percent(tmp_path: Path) -> None:
    data = TensorImages(structured_images(200, (1, 16, 16, 16), seed=0))
    cfg = make_config(replay={"strategy": "real_buffer"}, train={"epochs": 1, "batch_size": 16, "steps_per_epoch": 2})
    result = run_stage(config=cfg, modality="ct", train_data=data, out_dir=tmp_path / "s1")
    pool = result.artifact.extras["real_buffer"]["ct"]
    assert pool.shape[0] == 10  # 5 % of 200
    assert result.artifact.manifest.contains_real_data
    # The buffer holds real samples, bit-for-bit (as float16).
    real = data.images.to(torch.float16).reshape(200, -1)
    assert all((real == img.reshape(1, -1)).all(1).any() for img in pool)


def test_ewc_penalty_is_zero_at_anchor_and_grows_away(tmp_path: Path, ct_data: TensorImages) -> None:
    cfg = make_config(replay={"strategy": "ewc"}, train={"epochs": 1, "batch_size": 8})
    first = run_stage(config=cfg, modality="ct", train_data=ct_data)
    fisher = first.artifact.extras["ewc"]
    assert fisher and all(torch.isfinite(v).all() and (v >= 0).all() for v in fisher.values())
    assert any(float(v.sum()) > 0 for v in fisher.values())
    from invcoss_core.replay import ReplayContext
    from invcoss_core.training import prepare_models

    student, teacher = prepare_models(cfg, first.artifact, torch.device("cpu"))
    strategy = build_replay(cfg)
    strategy.begin_stage(ReplayContext(cfg, "mri", student, teacher, first.artifact, torch.device("cpu")))
    at_anchor = strategy.penalty(student)
    assert at_anchor is not None and float(at_anchor.detach()) == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        for p in student.encoder.blocks.parameters():
            p.add_(0.05)
    moved = strategy.penalty(student)
    assert moved is not None and float(moved.detach()) > 0


@pytest.mark.parametrize("strategy", ["none", "real_buffer", "ewc"])
def test_two_consecutive_stages_write_artifacts(
    strategy: str, tmp_path: Path, ct_data: TensorImages, pathology_data: TensorImages
) -> None:
    cfg = make_config(replay={"strategy": strategy}, train={"epochs": 1, "batch_size": 8})
    first = run_stage(config=cfg, modality="ct", train_data=ct_data, out_dir=tmp_path / "s1", run_id="r")
    second = run_stage(
        config=cfg,
        modality="pathology",
        train_data=pathology_data,
        incoming=read_artifact_dir(tmp_path / "s1"),
        out_dir=tmp_path / "s2",
        run_id="r",
    )
    art = read_artifact_dir(tmp_path / "s2")
    assert art.manifest.modalities == ["ct", "pathology"] and art.manifest.stage_index == 2
    assert art.manifest.parent_sha256 == first.artifact.sha256
    assert art.manifest.replay == strategy
    assert {k.split(".")[0] for k in art.stats if not k.endswith("tokens")} == {"ct", "pathology"}
    if strategy == "real_buffer":
        assert set(art.extras["real_buffer"]) == {"ct", "pathology"}
        assert second.replay_losses and all(v >= 0 for v in second.replay_losses)
    if strategy == "ewc":
        assert "ewc" in art.extras
    if strategy == "none":
        assert not second.replay_losses and art.extras == {}


def test_pool_replay_refuses_an_artifact_without_pools(tmp_path: Path, ct_data: TensorImages) -> None:
    first = run_stage(config=make_config(train={"epochs": 1}), modality="ct", train_data=ct_data)
    cfg = make_config(replay={"strategy": "real_buffer"}, train={"epochs": 1})
    with pytest.raises(ReplayError, match="same replay strategy"):
        run_stage(config=cfg, modality="mri", train_data=ct_data, incoming=first.artifact)


def test_unknown_strategy_name_is_refused() -> None:
    with pytest.raises(ReplayError, match="unknown replay strategy"):
        replay_class("magic")
