"""The build lock: one build of a sample folder at a time, whoever starts it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)


@contextmanager
def build_lock(dest: Path) -> Iterator[None]:
    """One build of DEST at a time (two commands started together fetch into the same default folder).

    An advisory lock on ``.DEST.lock`` next to DEST; the kernel drops it when the holder dies, so a killed fetch
    never blocks the next one. Without POSIX locks (Windows) builds are not serialised, but the atomic rename still
    keeps DEST whole.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(dest.parent / f".{dest.name}.lock", "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another `invcoss samples fetch` is building %s; waiting for it to finish", dest)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
