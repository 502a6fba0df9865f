"""Supervised children: they die with a hard-killed supervisor, one supervisor per folder, the supervisor watch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from invcoss_core.common.processes import (
    GROUP_GRACE_S,
    SUPERVISOR_ENV,
    InstanceLock,
    InstanceRunningError,
    PortUnavailableError,
    bind_or_explain,
    descendants,
    die_with_parent,
    pid_alive,
    supervisor_env,
    terminate_tree,
    watch_supervisor,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
# A command that starts a process of its own and does not watch it (as Flower's SuperExec does with a ClientApp),
# writes that process's pid to argv[1], then sleeps or exits with 7 (argv[2] == "exit").
FORKER = [
    sys.executable,
    "-c",
    "import pathlib, subprocess, sys, time; "
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
    "pathlib.Path(sys.argv[1]).write_text(str(child.pid)); "
    "sys.exit(7) if sys.argv[2] == 'exit' else time.sleep(60)",
]

# A supervisor that starts one child through die_with_parent and one plainly, prints both pids, and waits.
SUPERVISOR = """
import json, subprocess, sys, time
from invcoss_core.common.processes import die_with_parent
sleeper = json.loads(sys.argv[1])
guarded = subprocess.Popen(die_with_parent(sleeper, group=sys.argv[2] == "group"))
# The control child writes its own pid file: with one file the two children's writes race, and the test could read
# the plain child's grandchild as the guarded one's.
plain = subprocess.Popen([a + ".plain" if a.endswith(".pid") else a for a in sleeper])
print(json.dumps([guarded.pid, plain.pid]), flush=True)
time.sleep(60)
"""


def _wait(condition: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_child_started_with_die_with_parent_stops_when_its_supervisor_is_killed() -> None:
    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, json.dumps(SLEEPER), "plain"], stdout=subprocess.PIPE, cwd=Path.cwd()
    )
    assert supervisor.stdout is not None
    guarded, plain = json.loads(supervisor.stdout.readline())
    try:
        # the wrapper has exec'd the command (so the kernel setting is in place) once its command line is the sleeper's
        assert _wait(lambda: "invcoss_core.common.processes" not in _cmdline(guarded) and _cmdline(guarded), 10)
        supervisor.kill()  # SIGKILL: the supervisor cannot clean up
        supervisor.wait()
        assert _wait(lambda: not pid_alive(guarded), 5), "the guarded child outlived its supervisor"
        assert pid_alive(plain), "control: a plainly started child is orphaned, not stopped"
    finally:
        for pid in (guarded, plain):
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def _grandchild(pid_file: Path) -> int:
    assert _wait(lambda: pid_file.exists() and pid_file.read_text().isdigit(), 20), "the command started no child"
    return int(pid_file.read_text())


def _group_tree(leader: int, grandchild: int) -> list[int]:
    """`leader`'s descendants once its child `grandchild` and the reaper show in /proc (a new process can show a
    moment late: seen once in CI)."""
    found: list[int] = []

    def complete() -> bool:
        found[:] = descendants(leader)
        return grandchild in found and len(found) >= 2  # the command's child and the reaper

    assert _wait(complete, 10), (grandchild, found)
    return found


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_group_child_takes_what_it_started_with_it_when_its_supervisor_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    command = [*FORKER, str(pid_file), "sleep"]
    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, json.dumps(command), "group"], stdout=subprocess.PIPE, cwd=Path.cwd()
    )
    assert supervisor.stdout is not None
    guarded, plain = json.loads(supervisor.stdout.readline())
    tree: list[int] = [guarded, plain]
    try:
        grandchild = _grandchild(pid_file)
        tree = [guarded, plain, *_group_tree(guarded, grandchild)]
        supervisor.kill()  # SIGKILL: the supervisor cannot clean up
        supervisor.wait()
        gone = [guarded, *descendants(guarded)]
        assert _wait(lambda: not any(pid_alive(p) for p in gone), GROUP_GRACE_S + 10), [
            _cmdline(p) for p in gone if pid_alive(p)
        ]
        assert pid_alive(plain), "control: a plainly started child is orphaned, not stopped"
    finally:
        _kill_all(tree)


def test_a_group_child_that_exits_by_itself_returns_at_once_and_leaves_nothing_behind(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    started = time.monotonic()
    child = subprocess.Popen(die_with_parent([*FORKER, str(pid_file), "exit"], group=True))
    grandchild = 0
    try:
        assert child.wait(timeout=30) == 7  # the command's own exit code, not held up by the reaper's grace
        assert time.monotonic() - started < 20
        grandchild = _grandchild(pid_file)
        assert _wait(lambda: not pid_alive(grandchild), GROUP_GRACE_S + 10), "the command's child outlived it"
    finally:
        _kill_all([grandchild] if grandchild else [])


def test_stopping_a_group_child_in_order_stops_its_tree_and_its_reaper(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    child = subprocess.Popen(die_with_parent([*FORKER, str(pid_file), "sleep"], group=True))
    tree = [child.pid]
    try:
        tree = [child.pid, *_group_tree(child.pid, _grandchild(pid_file))]
        started = time.monotonic()
        terminate_tree(child, timeout_s=10)
        assert time.monotonic() - started < 5
        assert not any(pid_alive(p) for p in tree), [_cmdline(p) for p in tree if pid_alive(p)]
    finally:
        _kill_all(tree)


def test_the_wrapper_refuses_to_start_a_child_of_a_supervisor_that_is_already_gone() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "invcoss_core.common.processes", "--die-with", "1", "--", *SLEEPER],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 75
    assert b"supervisor 1 is gone" in done.stderr


def test_instance_lock_refuses_a_second_holder_and_is_freed_when_the_holder_dies(tmp_path: Path) -> None:
    path = tmp_path / "state" / "client.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from invcoss_core.common.processes import InstanceLock; "
            "InstanceLock(Path(sys.argv[1])).acquire('a test holder'); print('held', flush=True); time.sleep(60)",
            str(path),
        ],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(
            InstanceRunningError, match=rf"an invcoss-client of site A is already running .*pid {holder.pid}"
        ):
            InstanceLock(path).acquire("an invcoss-client of site A")
    finally:
        holder.kill()
        holder.wait()
    lock = InstanceLock(path).acquire("an invcoss-client of site A")  # the kernel dropped the dead holder's lock
    assert path.read_text() == str(os.getpid())
    lock.release()
    InstanceLock(path).acquire("again").release()


def test_watch_supervisor_calls_back_once_the_named_supervisor_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SUPERVISOR_ENV, raising=False)
    with watch_supervisor(lambda pid: None) as watching:
        assert not watching  # not started by a supervisor: nothing to watch

    supervisor = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import json, time; from invcoss_core.common.processes import supervisor_env; "
            "print(json.dumps(supervisor_env()), flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    assert supervisor.stdout is not None
    env = json.loads(supervisor.stdout.readline())
    assert env[SUPERVISOR_ENV].startswith(f"{supervisor.pid}:")
    monkeypatch.setenv(SUPERVISOR_ENV, env[SUPERVISOR_ENV])
    gone: list[int] = []
    called = threading.Event()
    try:
        with watch_supervisor(lambda pid: (gone.append(pid), called.set()), interval_s=0.05) as watching:
            assert watching
            time.sleep(0.3)
            assert not called.is_set()  # alive: no call
            supervisor.kill()
            assert called.wait(5)
    finally:
        supervisor.kill()
        supervisor.wait()
    assert gone == [supervisor.pid]


def test_watch_supervisor_takes_a_reused_pid_for_a_gone_supervisor(monkeypatch: pytest.MonkeyPatch) -> None:
    mine = supervisor_env()[SUPERVISOR_ENV]
    monkeypatch.setenv(SUPERVISOR_ENV, mine)
    called = threading.Event()
    with watch_supervisor(lambda pid: called.set(), interval_s=0.05):
        assert not called.wait(0.3)  # this very process: alive, same start time
    pid, _, started = mine.partition(":")
    monkeypatch.setenv(SUPERVISOR_ENV, f"{pid}:{int(started) + 1}")  # same pid, another process's start time
    with watch_supervisor(lambda pid: called.set(), interval_s=0.05):
        assert called.wait(5)


def test_a_port_that_cannot_be_bound_is_explained_with_its_setting() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        def start() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                raise
            return sock

        with pytest.raises(PortUnavailableError) as err:
            bind_or_explain(start, "127.0.0.1", port, "[metrics] port", "/etc/invcoss/site.toml")
    assert str(err.value).startswith(f"cannot listen on 127.0.0.1:{port} (")
    assert str(err.value).endswith("change [metrics] port in /etc/invcoss/site.toml")
    assert bind_or_explain(lambda: 7, "127.0.0.1", port, "[metrics] port", "site.toml") == 7
