"""The stage loop: deterministic resume, schedule, non-finite losses, architecture checks."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from invcoss_core.common.events import ProgressEvent
from invcoss_core.config import StageConfig
from invcoss_core.data import TensorImages
from invcoss_core.training import NonFiniteLossError, StageError, run_stage
from invcoss_core.training.checkpoint import CheckpointError
from invcoss_core.training.schedule import lr_at
from tests.helpers import make_config


class InterruptError(Exception):
    pass


def test_schedule_warms_up_then_decays_to_min() -> None:
    lrs = [lr_at(s, 100, 10, 1e-3, 1e-5) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-5, rel=0.05)
    assert lr_at(200, 100, 10, 1e-3, 1e-5) == pytest.approx(1e-5)


def _interrupt_after_epoch(cfg: StageConfig, data: TensorImages, work_dir: Path, epoch: int) -> None:
    """Run stage "r" in `work_dir` and stop it right after `epoch` (its checkpoint written), as a crash would."""

    def stop(event: ProgressEvent) -> None:
        if event.epoch == epoch and "epoch_loss" in event.metrics:
            raise InterruptError

    with pytest.raises(InterruptError):
        run_stage(config=cfg, modality="ct", train_data=data, run_id="r", work_dir=work_dir, events=stop)


def test_interrupted_stage_resumes_to_identical_weights(tmp_path: Path, ct_data: TensorImages) -> None:
    cfg = make_config(train={"epochs": 3, "batch_size": 8})
    reference = run_stage(config=cfg, modality="ct", train_data=ct_data, run_id="r")

    _interrupt_after_epoch(cfg, ct_data, tmp_path, 1)
    assert (tmp_path / "checkpoint" / "meta.json").exists()
    resumed = run_stage(config=cfg, modality="ct", train_data=ct_data, run_id="r", work_dir=tmp_path)
    assert resumed.resumed_from_epoch == 1
    # Tolerance: exact equality on CPU (same seeds, same data order, same optimizer state).
    for key, value in reference.artifact.weights.items():
        assert torch.equal(resumed.artifact.weights[key], value), key
    assert resumed.epoch_losses == reference.epoch_losses
    assert not (tmp_path / "checkpoint").exists()  # cleaned up once the artifact exists


def test_a_crash_between_the_checkpoint_renames_resumes_from_the_previous_checkpoint(
    tmp_path: Path, ct_data: TensorImages
) -> None:
    cfg = make_config(train={"epochs": 3, "batch_size": 8})
    reference = run_stage(config=cfg, modality="ct", train_data=ct_data, run_id="r")

    _interrupt_after_epoch(cfg, ct_data, tmp_path, 2)
    # save_checkpoint moves the previous checkpoint aside before it moves the new one in: die in between
    (tmp_path / "checkpoint").rename(tmp_path / ".checkpoint.old")
    resumed = run_stage(config=cfg, modality="ct", train_data=ct_data, run_id="r", work_dir=tmp_path)
    assert resumed.resumed_from_epoch == 2  # not 0: the moved-aside checkpoint was whole
    for key, value in reference.artifact.weights.items():
        assert torch.equal(resumed.artifact.weights[key], value), key
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / ".checkpoint.old").exists()


def test_checkpoint_of_another_stage_is_ignored(tmp_path: Path, ct_data: TensorImages) -> None:
    cfg = make_config(train={"epochs": 2})

    def stop(event: ProgressEvent) -> None:
        if "epoch_loss" in event.metrics:
            raise InterruptError

    with pytest.raises(InterruptError):
        run_stage(config=cfg, modality="ct", train_data=ct_data, run_id="r", work_dir=tmp_path, events=stop)
    other = run_stage(config=cfg, modality="ct", train_data=ct_data, run_id="other-run", work_dir=tmp_path)
    assert other.resumed_from_epoch == 0


def test_corrupt_checkpoint_is_reported(tmp_path: Path, ct_data: TensorImages) -> None:
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="delete"):
        run_stage(config=make_config(train={"epochs": 1}), modality="ct", train_data=ct_data, work_dir=tmp_path)


def test_nan_input_stops_with_clear_error(ct_data: TensorImages) -> None:
    bad = TensorImages(ct_data.images.clone())
    bad.images[:] = float("nan")
    with pytest.raises(NonFiniteLossError, match="MAE loss became nan"):
        run_stage(config=make_config(train={"epochs": 1}), modality="ct", train_data=bad)


def test_losses_read_back_in_windows_train_the_same_and_still_stop_on_nan(ct_data: TensorImages) -> None:
    # What a GPU stage does (default_check_every): the losses stay on the device and are read every few steps.
    cfg = make_config(train={"epochs": 2, "batch_size": 8})
    every_step: list[ProgressEvent] = []
    windowed: list[ProgressEvent] = []
    reference = run_stage(config=cfg, modality="ct", train_data=ct_data, events=every_step.append)
    result = run_stage(config=cfg, modality="ct", train_data=ct_data, events=windowed.append, check_every=3)
    for key, value in reference.artifact.weights.items():
        assert torch.equal(result.artifact.weights[key], value), key
    assert result.epoch_losses == pytest.approx(reference.epoch_losses, rel=1e-12)
    per_step = [e.step for e in every_step if "loss" in e.metrics]
    per_window = [e.step for e in windowed if "loss" in e.metrics]
    steps_per_epoch = len(per_step) // 2
    assert per_step == list(range(1, 2 * steps_per_epoch + 1))
    expected = [
        epoch * steps_per_epoch + s
        for epoch in range(2)
        for s in range(1, steps_per_epoch + 1)
        if s % 3 == 0 or s == steps_per_epoch
    ]
    assert per_window == expected
    bad = TensorImages(ct_data.images.clone())
    bad.images[:] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"MAE loss became nan at epoch 1, one of steps 0-2"):
        run_stage(config=make_config(train={"epochs": 1}), modality="ct", train_data=bad, check_every=3)


def test_diverging_learning_rate_stops_instead_of_handing_on(ct_data: TensorImages) -> None:
    cfg = make_config(train={"epochs": 3, "lr": 1e6, "min_lr": 1e6, "grad_clip": None, "warmup_fraction": 0.0})
    with pytest.raises(NonFiniteLossError):
        run_stage(config=cfg, modality="ct", train_data=ct_data)


def test_architecture_mismatch_names_the_profile(ct_data: TensorImages) -> None:
    first = run_stage(config=make_config(train={"epochs": 1}), modality="ct", train_data=ct_data)
    other = make_config(model={"hidden_size": 64, "num_heads": 2}, train={"epochs": 1})
    with pytest.raises(StageError, match="--profile tiny"):
        run_stage(config=other, modality="mri", train_data=ct_data, incoming=first.artifact)


def test_empty_dataset_is_refused() -> None:
    with pytest.raises(StageError, match="no training samples"):
        run_stage(config=make_config(), modality="ct", train_data=TensorImages(torch.zeros(0, 1, 16, 16, 16)))


def test_decoder_is_reinitialised_and_encoder_carried(ct_data: TensorImages, mri_data: TensorImages) -> None:
    cfg = make_config(train={"epochs": 1})
    first = run_stage(config=cfg, modality="ct", train_data=ct_data)
    from invcoss_core.training import prepare_models

    student, teacher = prepare_models(cfg, first.artifact, torch.device("cpu"))
    assert teacher is not None and not any(p.requires_grad for p in teacher.parameters())
    w = first.artifact.weights
    assert torch.equal(student.encoder.blocks[0].attn.qkv.weight, w["encoder.blocks.0.attn.qkv.weight"])
    assert not torch.equal(student.decoder.embed.weight, w["decoder.embed.weight"])


def test_training_lowers_the_loss_and_reports_progress(ct_data: TensorImages) -> None:
    events: list[ProgressEvent] = []
    result = run_stage(config=make_config(train={"epochs": 4}), modality="ct", train_data=ct_data, events=events.append)
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    steps = [e.step for e in events if e.phase == "train"]
    assert steps[-1] == events[-1].total and result.images_per_second > 0
