"""`data check` and `samples fetch` through the Typer apps: tables, piped output, JSON and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


LONG = "patient_0042_" + "thorax_ct_with_contrast_" * 5 + "series"  # the file name alone is over 80 columns


def test_check_output_in_a_log_file_keeps_every_name_whole(site: Path, tmp_path: Path) -> None:
    (site / "ct" / "p1.nii.gz").rename(site / "ct" / f"{LONG}.nii.gz")
    (site / "ct" / f"{LONG}_junk.nii.gz").write_bytes(b"junk")
    log = tmp_path / "check.log"
    with log.open("w") as out:  # a real pipe to a file: no terminal, no COLUMNS
        code = "from invcoss_core.data.cli import app; app()"
        args = ["data", "check", "--site-data", str(site), "--modality", "ct"]
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        done = subprocess.run(
            [sys.executable, "-c", code, *args], stdout=out, stderr=subprocess.PIPE, env=env, timeout=300
        )
    assert done.returncode == 0, done.stderr
    lines = log.read_text().splitlines()
    rows = {line.split("\t")[0]: line.split("\t") for line in lines[2:] if "\t" in line}
    assert rows[f"{LONG}.nii.gz"][-1] == "ok" and rows[f"{LONG}_junk.nii.gz"][-1].startswith("rejected:")
    assert rows["p3"][2] == "dicom-series" and lines[1].split("\t")[0] == "file"
    assert any(line.startswith("3 usable images of 3 subjects, 1 rejected") for line in lines)


def test_check_json_lists_every_file_with_its_verdict(site: Path) -> None:
    (site / "ct" / f"{LONG}.nii.gz").write_bytes(b"junk")
    result = runner.invoke(cli.app, ["data", "check", "--site-data", str(site), "--modality", "ct", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    verdicts = {f["name"]: f["usable"] for f in report["files"]}
    assert verdicts == {"p1.nii.gz": True, "p2.nrrd": True, "p3": True, f"{LONG}.nii.gz": False}
    assert report["usable"] == 3 and report["rejected"] == 1 and report["modality"] == "ct"
