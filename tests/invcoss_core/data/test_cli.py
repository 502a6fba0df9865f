"""`data check` and `samples fetch` through the Typer apps: tables and exit codes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from invcoss_core.data import cli
from invcoss_core.data.errors import SampleFetchError

runner = CliRunner()


def test_check_prints_the_table_and_exits_zero(site: Path) -> None:
    result = runner.invoke(
        cli.app, ["data", "check", "--site-data", str(site), "--modality", "ct"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "p1.nii.gz" in result.output and "dicom-series" in result.output and "3 usable images" in result.output


def test_check_exits_one_when_nothing_is_usable(tmp_path: Path) -> None:
    (tmp_path / "xray").mkdir()
    (tmp_path / "xray" / "a.png").write_bytes(b"")
    result = runner.invoke(
        cli.app, ["data", "check", "--site-data", str(tmp_path), "--modality", "xray"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 1
    assert "empty file" in result.output


def test_check_strict_exits_one_on_any_reject(site: Path) -> None:
    (site / "ct" / "junk.nii.gz").write_bytes(b"junk")
    args = ["data", "check", "--site-data", str(site), "--modality", "ct"]
    assert runner.invoke(cli.app, args).exit_code == 0
    assert runner.invoke(cli.app, [*args, "--strict"]).exit_code == 1


def test_check_exits_two_for_a_missing_folder_or_modality(tmp_path: Path, site: Path) -> None:
    missing = ["data", "check", "--site-data", str(tmp_path / "x"), "--modality", "ct"]
    assert runner.invoke(cli.app, missing).exit_code == 2
    assert runner.invoke(cli.app, ["data", "check", "--site-data", str(site), "--modality", "pet"]).exit_code == 2


def test_fetch_failure_exits_one_with_the_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def fail(*args: Any, **kwargs: Any) -> Path:
        raise SampleFetchError("no sample data for ct; retry `invcoss samples fetch`")

    monkeypatch.setattr(cli, "fetch_samples", fail)
    result = runner.invoke(cli.app, ["samples", "fetch", "--dest", str(tmp_path / "d"), "--quiet"])
    assert result.exit_code == 1 and "retry" in result.output
