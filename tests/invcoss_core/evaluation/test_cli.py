"""The `bench` command line: help text and early refusal of bad arguments."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from invcoss_core.evaluation.cli import app


def test_help_names_the_options_and_methods() -> None:
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for word in ("--profile", "--methods", "--seeds", "--out", "invcoss_no_rep", "pixel_inversion"):
        assert word in result.output


def test_unknown_method_is_refused_before_any_work(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--out", str(tmp_path), "--methods", "finetune,magic", "--no-progress"])
    assert result.exit_code != 0
    assert "magic" in result.output
    assert not any(tmp_path.iterdir())


def test_unknown_profile_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--out", str(tmp_path), "--profile", "huge", "--no-progress"])
    assert result.exit_code == 2
