"""The one-machine federation's own safeguards: ports that stay free, and a dead site said at once with its log."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from invcoss.localfed import LocalFederation, LocalSite, ProcessExitedError, _ephemeral_low, free_port, log_tail


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    ports = [free_port() for _ in range(40)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= port < _ephemeral_low() for port in ports)
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


def test_log_tail_keeps_the_last_lines_and_names_a_missing_log(tmp_path: Path) -> None:
    log = tmp_path / "site-A.log"
    log.write_text("".join(f"line {i}\n" for i in range(30)) + "\x1b[92mINFO \x1b[0m:      done\n\n")
    assert log_tail(log, 3).splitlines() == ["  | line 28", "  | line 29", "  | INFO :      done"]
    assert "not written" in log_tail(tmp_path / "absent.log")


def test_a_site_that_exits_is_reported_at_once_with_its_code_and_log(tmp_path: Path) -> None:
    """A real `invcoss-client` whose /metrics port is taken exits; the federation says so instead of waiting."""
    fed = LocalFederation(tmp_path / "fed", [LocalSite("A", "ct", tmp_path / "ct")])
    with fed, socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        fed.setup()
        busy.bind(("127.0.0.1", fed.ports["A_metrics"]))
        busy.listen()
        fed.start_site("A")
        with pytest.raises(ProcessExitedError) as err:
            fed.wait_until(lambda _state: False, 60, "the end of the run", lambda _state: fed.check_sites_running())
    message = str(err.value)
    assert "site A's invcoss-client exited (code 3)" in message, message
    assert f"cannot listen on 127.0.0.1:{fed.ports['A_metrics']}" in message and "[metrics] port" in message
