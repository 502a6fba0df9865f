"""Operator output: lines and errors are printed verbatim, whatever brackets a path or a peer's log holds."""

from __future__ import annotations

import pytest
import typer

from invcoss_core.common.cli_support import fail, timestamped

TRICKY = "see [/tmp/run/logs] and [code: 2004] [bold]not bold[/bold]"


def test_timestamped_lines_print_brackets_verbatim(capsys: pytest.CaptureFixture[str]) -> None:
    timestamped("[green]site A[/]")(TRICKY)
    printed = " ".join(capsys.readouterr().err.split())
    assert "site A " + TRICKY in printed and "[green]" not in printed


def test_fail_prints_the_message_verbatim_and_returns_the_exit(capsys: pytest.CaptureFixture[str]) -> None:
    exit_ = fail(TRICKY, code=3)
    assert isinstance(exit_, typer.Exit) and exit_.exit_code == 3
    assert "error: " + TRICKY in " ".join(capsys.readouterr().err.split())
