"""Child-process helpers for supervisors: console scripts of this venv, a child's environment, process trees,
children that die with their supervisor, and one supervisor per state folder.

The coordinator supervises its SuperLink and each site its SuperNode (Flower processes that start children of
their own); both sides find and stop their processes with these functions. Linux `/proc` is read to find
descendants and zombies; where it is absent, only the direct process is handled.

A supervisor killed hard (SIGKILL, the OOM killer) cannot stop its children. Without help its SuperNode or
SuperLink would live on as an orphan: still connected, still holding its ports and its stage, so that the restarted
supervisor could not start a new one. `die_with_parent` asks the kernel to SIGTERM the child when its supervisor
dies (Linux `PR_SET_PDEATHSIG`). Flower's own processes mostly stop when their Flower parent does; for the one
that does not always (a ClientApp process, seen outliving a hard-killed site), `die_with_parent(..., group=True)`
runs the command in a process group of its own with a small reaper that kills what is left of the group once the
command or its supervisor is gone.
`InstanceLock` refuses a second supervisor on the same state folder. Work that runs further down (a site's
stage, below SuperNode, SuperExec and ClientApp processes) finds its supervisor in `SUPERVISOR_ENV` and stops
itself with `watch_supervisor` once that supervisor is gone, rather than train on for an hour with nobody to
send the result to.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, ClassVar, NoReturn, TypeVar

__all__ = [
    "GROUP_GRACE_S",
    "SUPERVISOR_ENV",
    "InstanceLock",
    "InstanceRunningError",
    "PortUnavailableError",
    "bind_or_explain",
    "child_env",
    "descendants",
    "die_with_parent",
    "executable",
    "pid_alive",
    "start_supervisor_watch",
    "supervisor_env",
    "terminate_tree",
    "watch_supervisor",
]

SUPERVISOR_ENV = "INVCOSS_SUPERVISOR"  # "<pid>:<start time>" of the supervisor, inherited by its process tree

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

T = TypeVar("T")


def executable(name: str) -> str:
    """Path of a console script installed next to this Python (the venv), else the bare name (PATH lookup)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """Environment for a supervised child: this one, with this venv's scripts first on PATH and unbuffered output.

    Args:
        extra: variables set on top (they win over the inherited ones), e.g. the child's home folder.
    Returns:
        a new environment mapping for `subprocess.Popen(env=...)`.
    """
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _stat_fields(stat: str) -> list[str]:
    """The fields of a `/proc/<pid>/stat` line after the command name (state first, then the parent pid)."""
    return stat[stat.rfind(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (children first, level by level), read from /proc; empty where it is absent."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        children.setdefault(int(_stat_fields(stat)[1]), []).append(int(entry.name))
    found: list[int] = []
    frontier = [pid]
    while frontier:
        frontier = [child for parent in frontier for child in children.get(parent, [])]
        found.extend(frontier)
    return found


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie — exited, not yet reaped by its parent — counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return _stat_fields(stat)[0] not in ("Z", "X")


def terminate_tree(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM a process and every descendant (also those in other sessions), then SIGKILL what is left.

    Args:
        process: the child this process started (it is reaped here).
        timeout_s: how long the tree gets to exit after SIGTERM before the SIGKILL.
    """
    tree = [process.pid, *descendants(process.pid)]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        process.poll()
        if process.returncode is not None and not any(pid_alive(p) for p in tree[1:]):
            return
        time.sleep(0.1)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def die_with_parent(command: Sequence[str], group: bool = False) -> list[str]:
    """`command`, wrapped so that the kernel sends it SIGTERM when this process dies (Linux; elsewhere unchanged).

    The wrapper (this module run with `python -m`) sets `PR_SET_PDEATHSIG`, checks that this process is still its
    parent, then execs `command`, which keeps the setting (and its pid: the `Popen` object is the command's). The
    signal follows the *thread* that started the child: start it from a thread that lives as long as the supervisor
    (the main thread).

    Args:
        command: the child's command line.
        group: also take down every process the command starts: the command leads a process group of its own, and
            a reaper process in that group SIGKILLs the group `GROUP_GRACE_S` after the command or its supervisor is
            gone (for commands whose children do not all stop with them). The command then no longer gets the
            terminal's Ctrl-C directly: its supervisor must stop it.
    Returns:
        the command line to give `subprocess.Popen`.
    """
    if not sys.platform.startswith("linux"):
        return list(command)
    mode = "--die-with-group" if group else "--die-with"
    return [sys.executable, "-m", "invcoss_core.common.processes", mode, str(os.getpid()), "--", *command]


GROUP_GRACE_S = 3.0  # what is left of a group gets this long to stop by itself once its leader or supervisor is gone


def _exec_dying_with(parent: int, command: list[str], group: bool = False) -> NoReturn:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    if os.getppid() != parent:  # the supervisor died before the setting took hold
        sys.stderr.write(f"supervisor {parent} is gone; not starting {command[0]}\n")
        sys.exit(75)
    if group:
        os.setpgid(0, 0)
        leader = os.getpid()
        if os.fork() == 0:  # the reaper: a child of the command once this process has exec'd it
            _reap_group_when_gone(leader, parent)
    os.execvp(command[0], command)


def _reap_group_when_gone(leader: int, supervisor: int) -> NoReturn:
    """Wait until `leader` (this process's parent) or `supervisor` is gone, then SIGKILL `leader`'s process group.

    Flower's SuperExec starts a ClientApp process per task; one that is still fetching its task or blocked in a call
    does not react to its parent monitor, and outlived a hard-killed site by more than 20 s. The group is given
    `GROUP_GRACE_S` to stop by itself first. A SIGTERM (a supervisor stopping the tree in order) ends the reaper.
    """
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # hold no pipe of the command's open
            os.dup2(devnull, fd)
        while os.getppid() == leader and pid_alive(supervisor):
            time.sleep(0.2)
        time.sleep(GROUP_GRACE_S)
        os.killpg(leader, signal.SIGKILL)  # this reaper included
    finally:
        os._exit(0)


class PortUnavailableError(OSError):
    """A listening port could not be bound; the message names the setting to change."""


def bind_or_explain(start: Callable[[], T], host: str, port: int, setting: str, config_file: Path | str) -> T:
    """Run `start()`, which binds HOST:PORT; its OSError (port in use, address not of this machine) is explained.

    Raises:
        PortUnavailableError: naming the address, the reason and `setting` (e.g. "[metrics] port") in `config_file`.
    """
    try:
        return start()
    except OSError as err:
        raise PortUnavailableError(
            f"cannot listen on {host}:{port} ({err.strerror or err}): change {setting} in {config_file}"
        ) from None


class InstanceRunningError(RuntimeError):
    """Another supervisor holds the instance lock of this state folder."""


class InstanceLock:
    """One supervisor per state folder: an exclusive `flock` on `path`, held until `release` or process death.

    The kernel drops the lock when the holder dies, however it dies, so a stale lock file never blocks a restart.
    The file holds the holder's pid, for the error message only. A held lock stays held even when its
    `InstanceLock` object is dropped (the open file is kept here until `release`).
    """

    _held: ClassVar[set[IO[bytes]]] = set()  # open lock files: closing one (garbage collection) drops its lock

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fh: IO[bytes] | None = None

    def acquire(self, what: str) -> InstanceLock:
        """Take the lock.

        Args:
            what: how the error names the holder, e.g. "an invcoss-client of site A".
        Raises:
            InstanceRunningError: when another process holds it (the message names its pid and the file).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+b")  # noqa: SIM115 - kept open while the lock is held
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().decode(errors="replace").strip() or "unknown"
            fh.close()
            raise InstanceRunningError(
                f"{what} is already running on {self.path.parent} (pid {holder}, lock {self.path}); stop it first, "
                "or give this one another state folder"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()).encode())
        fh.flush()
        self._fh = fh
        InstanceLock._held.add(fh)
        return self

    def release(self) -> None:
        """Drop the lock (the file stays; it is harmless unlocked)."""
        if self._fh is not None:
            InstanceLock._held.discard(self._fh)
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def _start_time(pid: int) -> str:
    """The kernel's start time of `pid` (field 22 of /proc/<pid>/stat): with the pid, it names one process."""
    try:
        return _stat_fields(Path(f"/proc/{pid}/stat").read_text())[19]
    except (OSError, IndexError):
        return ""


def supervisor_env() -> dict[str, str]:
    """`{SUPERVISOR_ENV: ...}` naming this process, for a supervised child's environment (see `watch_supervisor`)."""
    pid = os.getpid()
    return {SUPERVISOR_ENV: f"{pid}:{_start_time(pid)}"}


def _supervisor_gone(pid: int, started: str) -> bool:
    return not pid_alive(pid) or (bool(started) and _start_time(pid) not in ("", started))


def start_supervisor_watch(on_gone: Callable[[int], None], interval_s: float = 1.0) -> Callable[[], None] | None:
    """Call `on_gone(pid)` (from a daemon thread, once) if the supervisor dies, until the returned stop is called.

    The supervisor is the one named in `SUPERVISOR_ENV`; a pid now held by another process (a different start
    time) counts as gone. A process that never stops the watch is watched for the rest of its life.

    Returns:
        the function that stops the watch; None when there is no supervisor to watch (no variable).
    """
    pid_text, _, started = os.environ.get(SUPERVISOR_ENV, "").partition(":")
    if not pid_text.isdigit():
        return None
    pid = int(pid_text)
    done = threading.Event()

    def watch() -> None:
        while not done.wait(interval_s):
            if _supervisor_gone(pid, started):
                on_gone(pid)
                return

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()
    return done.set


@contextlib.contextmanager
def watch_supervisor(on_gone: Callable[[int], None], interval_s: float = 1.0) -> Iterator[bool]:
    """`start_supervisor_watch` for the duration of a block.

    Yields:
        True when a supervisor is being watched.
    """
    stop = start_supervisor_watch(on_gone, interval_s)
    try:
        yield stop is not None
    finally:
        if stop is not None:
            stop()


# The die_with_parent wrapper: python -m invcoss_core.common.processes --die-with PID -- CMD...
if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) < 4 or args[0] not in ("--die-with", "--die-with-group") or args[2] != "--":
        sys.exit("usage: python -m invcoss_core.common.processes --die-with[-group] PARENT_PID -- COMMAND [ARGS...]")
    _exec_dying_with(int(args[1]), args[3:], group=args[0] == "--die-with-group")
