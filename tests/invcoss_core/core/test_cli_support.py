"""Operator output: printed verbatim whatever brackets a path holds, and piped output keeps every line whole."""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

import pytest
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text

from invcoss_core.common import cli_support
from invcoss_core.common.cli_support import fail, print_table, timestamped

TRICKY = "see [/tmp/run/logs] and [code: 2004] [bold]not bold[/bold]"


def test_timestamped_lines_print_brackets_verbatim(capsys: pytest.CaptureFixture[str]) -> None:
    timestamped("[green]site A[/]")(TRICKY)
    printed = " ".join(capsys.readouterr().err.split())
    assert "site A " + TRICKY in printed and "[green]" not in printed


def test_fail_prints_the_message_verbatim_and_returns_the_exit(capsys: pytest.CaptureFixture[str]) -> None:
    exit_ = fail(TRICKY, code=3)
    assert isinstance(exit_, typer.Exit) and exit_.exit_code == 3
    assert "error: " + TRICKY in " ".join(capsys.readouterr().err.split())


LONG_NAME = "patient_0042_" + "thorax_ct_with_contrast_" * 6 + "series.nii.gz"  # far over 80 columns


def _piped_console(tmp_path: Path) -> tuple[Console, Path]:
    path = tmp_path / "out.log"
    return Console(file=path.open("w"), soft_wrap=True), path


def test_print_table_piped_keeps_every_cell_on_one_line(tmp_path: Path) -> None:
    target, path = _piped_console(tmp_path)
    assert not target.is_terminal
    status = Text.assemble(("rejected:", "red"), " truncated [gzip] stream")
    print_table("ct: /site/ct", ("file", "status"), [(LONG_NAME, status), ("b.png", "ok")], target=target)
    target.file.close()
    lines = path.read_text().splitlines()
    assert lines == ["ct: /site/ct", "file\tstatus", f"{LONG_NAME}\trejected: truncated [gzip] stream", "b.png\tok"]


def test_print_table_on_a_terminal_draws_a_table_that_folds_instead_of_cutting(tmp_path: Path) -> None:
    target = Console(file=io.StringIO(), force_terminal=True, width=60, color_system=None)
    print_table("t", ("file", "status"), [(LONG_NAME, "ok")], target=target)
    drawn = target.file.getvalue()  # type: ignore[attr-defined]
    body = [line.split("│") for line in drawn.splitlines() if line.count("│") == 3]  # rows: │ file │ status │
    assert "".join(cells[1].strip() for cells in body) == LONG_NAME  # folded over lines, never cut


def test_piped_log_records_are_single_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_support, "console", Console(file=io.StringIO(), soft_wrap=True))
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    handler = cli_support.log_handler()
    assert isinstance(handler, logging.StreamHandler) and not isinstance(handler, RichHandler)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "read %s", (LONG_NAME,), None)
    handler.handle(record)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].endswith(f"INFO read {LONG_NAME}")
