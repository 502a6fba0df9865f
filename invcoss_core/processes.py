"""Child-process helpers for supervisors: console scripts of this venv, a child's environment, process trees.

The coordinator supervises its SuperLink and each site its SuperNode (Flower processes that start children of
their own); both sides find and stop their processes with these functions. Linux `/proc` is read to find
descendants and zombies; where it is absent, only the direct process is handled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

__all__ = ["child_env", "descendants", "executable", "pid_alive", "terminate_tree"]


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
