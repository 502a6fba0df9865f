"""The `bench` command line: help text and early refusal of bad arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from invcoss_core.evaluation import cli
from invcoss_core.evaluation.bench import BenchError
from invcoss_core.evaluation.cli import app
from invcoss_core.evaluation.settings import BenchSettings


def test_help_names_the_options_and_methods() -> None:
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for word in ("--profile", "--methods", "--seeds", "--out", "--stage-steps", "invcoss_no_rep", "pixel_inversion"):
        assert word in result.output


def test_unknown_method_is_refused_before_any_work(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--out", str(tmp_path), "--methods", "finetune,magic", "--no-progress"])
    assert result.exit_code != 0
    assert "magic" in result.output
    assert not any(tmp_path.iterdir())


def test_unknown_profile_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--out", str(tmp_path), "--profile", "huge", "--no-progress"])
    assert result.exit_code == 2


def test_stage_and_joint_steps_reach_the_bench_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_run_bench(*, settings: BenchSettings, **_: Any) -> None:
        seen["settings"] = settings
        raise BenchError("stop here")

    monkeypatch.setattr(cli, "load_bench_data", lambda *args, **kwargs: None)
    monkeypatch.setattr(cli, "run_bench", fake_run_bench)
    args = ["--out", str(tmp_path), "--data", str(tmp_path), "--profile", "small", "--no-progress"]
    options = ["--stage-steps", "3000,1500,3000", "--epochs-per-stage", "3", "--joint-steps", "2000"]
    result = CliRunner().invoke(app, [*args, *options])
    assert result.exit_code == 2 and "stop here" in result.output
    assert seen["settings"].stage_steps == (3000, 1500, 3000)
    assert seen["settings"].epochs_per_stage == 3
    assert seen["settings"].joint_steps == 2000
    assert seen["settings"].config_for("joint", 0, 0).train.steps_per_epoch == 2000 // 3
    assert seen["settings"].first_stage_config(0).train.steps_per_epoch == 1000


def test_bad_stage_steps_are_refused_with_what_to_write(tmp_path: Path) -> None:
    args = ["--out", str(tmp_path), "--data", str(tmp_path), "--no-progress"]
    wrong_count = CliRunner().invoke(app, [*args, "--stage-steps", "100,100"], env={"COLUMNS": "200"})
    assert wrong_count.exit_code == 2
    assert "one entry per stage" in wrong_count.output
    not_numbers = CliRunner().invoke(app, [*args, "--stage-steps", "100,lots,100"], env={"COLUMNS": "200"})
    assert not_numbers.exit_code == 2
    assert "whole numbers" in not_numbers.output
    assert not any(tmp_path.iterdir())
