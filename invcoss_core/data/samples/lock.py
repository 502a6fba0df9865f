"""Where a sample build keeps its lock file and partial folders, and the build lock: one build of a folder at a time."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from invcoss_core.data.errors import SampleFetchError

logger = logging.getLogger(__name__)

INSIDE_PREFIX = ".invcoss-fetch"  # lock file and partial folders of a build made inside DEST
FILLING_MARKER = f"{INSIDE_PREFIX}.filling"  # DEST is being filled in place (see fetch._fill_in_place)


@dataclass(frozen=True)
class WorkArea:
    """Where a build keeps its lock file and partial folders: ``folder/prefix.lock``, ``folder/prefix.partial-*``."""

    folder: Path
    prefix: str
    inside_dest: bool  # DEST's parent is not ours (a container volume mounted at /samples): build inside DEST


def work_area(dest: Path) -> WorkArea:
    """Next to DEST when its parent is writable (then DEST is swapped in whole), else inside DEST if it is ours.

    Raises:
        SampleFetchError: neither DEST's parent nor DEST is writable by this user.
    """
    if os.access(dest.parent, os.W_OK | os.X_OK):
        return WorkArea(dest.parent, f".{dest.name}", inside_dest=False)
    if dest.is_dir() and os.access(dest, os.W_OK | os.X_OK):
        return WorkArea(dest, INSIDE_PREFIX, inside_dest=True)
    raise SampleFetchError(
        f"cannot write sample data to {dest}: this user may write neither {dest.parent} nor {dest}; choose a --dest "
        f"in a folder you own, or create {dest} and give it to this user"
    )


def user_entries(dest: Path) -> list[Path]:
    """DEST's entries other than a build's own lock file and partial folders."""
    return [p for p in dest.iterdir() if not p.name.startswith(INSIDE_PREFIX)]


@contextmanager
def build_lock(area: WorkArea) -> Iterator[None]:
    """One build of DEST at a time (two commands started together fetch into the same default folder).

    An advisory lock on ``.DEST.lock`` next to DEST (inside DEST when its parent is not writable); the kernel drops
    it when the holder dies, so a killed fetch never blocks the next one. Without POSIX locks (Windows) builds are
    not serialised, but the atomic rename still keeps DEST whole.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(area.folder / f"{area.prefix}.lock", "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another `invcoss samples fetch` is building there; waiting for it to finish")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
