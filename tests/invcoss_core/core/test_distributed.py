"""Data-parallel stages: 2 gloo processes on loopback follow the one-process run; a SIGKILLed rank resumes."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset, SequentialSampler

from invcoss_core.common.events import ProgressEvent
from invcoss_core.config import ConfigError, StageConfig
from invcoss_core.data import TensorImages
from invcoss_core.training import StageError, StageResult, run_stage
from invcoss_core.training.distributed import DistributedError, RankInfo, env_rank_info, rank_batches, shard
from tests.helpers import make_config, structured_images

# Tolerance of the 2-process loss curve against one process at the same global batch: the ranks compute the same
# samples with the same masks, so only the summation order (per-rank matmul blocks, the gradient all-reduce) differs;
# measured (tiny profile, 3 epochs): 3e-8 relative on the epoch losses, 2.2e-7 on any weight; the bound is 1e-4.
LOSS_RTOL = 1e-4


def _config(devices: int) -> StageConfig:
    return make_config(devices=devices, train={"epochs": 3, "batch_size": 8})


@pytest.fixture(scope="module")
def data() -> TensorImages:
    return TensorImages(structured_images(40, (1, 16, 16, 16), seed=1, kind="blobs"))


@pytest.fixture(scope="module")
def one_process(data: TensorImages) -> StageResult:
    return run_stage(config=_config(1), modality="ct", train_data=data, run_id="r")


@pytest.fixture(scope="module")
def rank0_events() -> list[ProgressEvent]:
    return []


@pytest.fixture(scope="module")
def two_processes(data: TensorImages, rank0_events: list[ProgressEvent]) -> StageResult:
    return run_stage(config=_config(2), modality="ct", train_data=data, run_id="r", events=rank0_events.append)


def test_two_gloo_processes_follow_the_one_process_loss_curve(
    one_process: StageResult, two_processes: StageResult
) -> None:
    assert len(two_processes.epoch_losses) == 3
    assert two_processes.epoch_losses == pytest.approx(one_process.epoch_losses, rel=LOSS_RTOL)
    assert two_processes.epoch_losses[-1] < two_processes.epoch_losses[0]  # it trained
    for key, value in one_process.artifact.weights.items():
        torch.testing.assert_close(two_processes.artifact.weights[key], value, rtol=1e-3, atol=1e-5, msg=key)


def test_rank_0_progress_reaches_the_callers_sink(
    two_processes: StageResult, rank0_events: list[ProgressEvent]
) -> None:
    epoch_ends = [e for e in rank0_events if "epoch_loss" in e.metrics]
    assert [e.epoch for e in epoch_ends] == [1, 2, 3]  # once each: rank 1's events are not relayed
    assert [e.metrics["epoch_loss"] for e in epoch_ends] == pytest.approx(two_processes.epoch_losses)


def test_two_processes_hand_off_the_one_process_artifact_format(
    one_process: StageResult, two_processes: StageResult
) -> None:
    one, two = one_process.artifact, two_processes.artifact
    assert sorted(two_processes.files) == sorted(one_process.files)
    assert set(json.loads(two_processes.files["manifest.json"])) == set(json.loads(one_process.files["manifest.json"]))
    assert two.manifest.architecture == one.manifest.architecture
    for mine, theirs in ((two.weights, one.weights), (two.stats, one.stats)):
        assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}
    assert all(bool(torch.isfinite(v).all()) for v in two.stats.values())  # recorded once, by rank 0
    assert two_processes.metrics["images_per_second"] > 0


class _KillRankOnce(Dataset[torch.Tensor]):
    """The training data; rank 1 SIGKILLs itself at its first read after rank 0 wrote a checkpoint (once)."""

    def __init__(self, data: TensorImages, checkpoint: Path, marker: Path) -> None:
        self.data, self.checkpoint, self.marker = data, checkpoint, marker

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> torch.Tensor:
        if os.environ.get("RANK") == "1" and (self.checkpoint / "meta.json").exists() and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return self.data[index]


def test_a_sigkilled_rank_stops_the_stage_and_a_rerun_resumes_from_the_checkpoint(
    tmp_path: Path, data: TensorImages, two_processes: StageResult
) -> None:
    cfg = _config(2)
    marker = tmp_path / "killed"
    doomed = _KillRankOnce(data, tmp_path / "checkpoint", marker)
    with pytest.raises(StageError, match=r"rank 1 was killed by SIGKILL.*rerun the stage to resume"):
        run_stage(config=cfg, modality="ct", train_data=doomed, run_id="r", work_dir=tmp_path)
    assert marker.exists()
    assert (tmp_path / "checkpoint" / "meta.json").exists()

    resumed = run_stage(config=cfg, modality="ct", train_data=data, run_id="r", work_dir=tmp_path)
    assert resumed.resumed_from_epoch >= 1
    assert resumed.epoch_losses == pytest.approx(two_processes.epoch_losses, rel=LOSS_RTOL)
    for key, value in two_processes.artifact.weights.items():
        torch.testing.assert_close(resumed.artifact.weights[key], value, rtol=1e-3, atol=1e-5, msg=key)
    assert not (tmp_path / "checkpoint").exists()


def test_a_global_batch_that_does_not_divide_by_the_devices_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_size 6 .* multiple of devices"):
        make_config(devices=4, train={"batch_size": 6})


def test_ranks_read_disjoint_slices_that_make_up_each_global_batch() -> None:
    sampler = SequentialSampler(range(24))
    whole = list(rank_batches(sampler, 8, None))
    parts = [list(rank_batches(sampler, 8, RankInfo(rank=r, world_size=2, local_rank=r))) for r in range(2)]
    assert [a + b for a, b in zip(*parts)] == whole
    noise = torch.arange(16.0).view(8, 2)
    assert torch.equal(torch.cat([shard(noise, RankInfo(r, 2, r)) for r in range(2)]), noise)


def test_launcher_variables_are_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert env_rank_info() == RankInfo(rank=1, world_size=2, local_rank=0)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(DistributedError, match="RANK 2 is outside"):
        env_rank_info()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert env_rank_info() is None


def test_stage_command_trains_on_nproc_processes_and_refuses_a_batch_that_does_not_divide(
    sample_data: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from invcoss_core import cli
    from invcoss_core.artifact import read_artifact_dir

    args = ["stage", "--site-data", str(sample_data), "--modality", "ct", "--profile", "tiny", "--epochs", "1"]
    args += ["--device", "cpu", "--quiet"]
    done = CliRunner().invoke(cli.app, [*args, "--nproc", "2", "--out", str(tmp_path / "two")])
    assert done.exit_code == 0, done.output
    assert read_artifact_dir(tmp_path / "two").manifest.stage_index == 1
    refused = CliRunner().invoke(cli.app, [*args, "--nproc", "3", "--out", str(tmp_path / "three")])
    assert refused.exit_code != 0
    assert "multiple of devices" in refused.output
    assert not (tmp_path / "three").exists()
