"""Append-only JSONL event files: a durable one-line append and a thread that follows the file.

Short-lived app processes (the coordinator's ServerApp, a site's ClientApp) cannot serve metrics themselves, so
they append one JSON line per event; the long-lived CLI process of the same side follows the file with
`EventTailer` and updates its metrics. Both sides of the federation write and read events with this module, so
the file format has one writer and one reader. Events carry counts, seconds, bytes, names and hashes — never
patient data.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["EventHandler", "EventTailer", "append_jsonl", "emit_event"]

logger = logging.getLogger(__name__)

EventHandler = Callable[[dict[str, Any]], None]


def append_jsonl(path: Path, record: Mapping[str, Any], durable: bool = True) -> None:
    """Append one JSON line (keys sorted) to `path`, creating its folder.

    Args:
        path: the JSONL file (journal, events file).
        record: a JSON-serialisable mapping.
        durable: fsync the line before returning (throttled progress lines skip it).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(dict(record), sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def emit_event(path: Path, kind: str, /, durable: bool = True, **fields: Any) -> None:
    """Append one event line (`time`, `kind`, `pid` and `fields`) to an events file.

    Args:
        path: the events file.
        kind: the event's name, e.g. `stage_started`.
        durable: fsync the line (see `append_jsonl`).
        fields: JSON-serialisable event fields.
    """
    append_jsonl(path, {"time": time.time(), "kind": kind, "pid": os.getpid(), **fields}, durable=durable)


class EventTailer:
    """Follows an append-only JSONL file from a background thread and hands each new event to a handler.

    Only complete lines are dispatched (a torn last line waits for its newline); lines that are not JSON objects
    are skipped, and an exception raised by the handler is logged, never raised, so one bad event cannot stop the
    thread. A file that shrinks (truncated or replaced) is read again from its start.

    Args:
        path: the JSONL file; it may not exist yet.
        handler: called with each event, in file order.
        interval_s: seconds between reads while started.
        from_start: dispatch the lines already in the file too (default: only lines appended from now on).
    """

    def __init__(self, path: Path, handler: EventHandler, interval_s: float = 0.5, from_start: bool = False) -> None:
        self.path = Path(path)
        self.handler = handler
        self.interval_s = interval_s
        self._offset = 0 if from_start or not self.path.exists() else self.path.stat().st_size
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tail-{self.path.name}", daemon=True)

    def start(self) -> EventTailer:
        """Start following; returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop following after a last read."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()

    def poll(self) -> int:
        """Read and dispatch complete lines written since the last call; returns how many events were handled."""
        if not self.path.exists():
            return 0
        size = self.path.stat().st_size
        if size < self._offset:  # truncated or replaced: start over
            self._offset = 0
        if size == self._offset:
            return 0
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read(size - self._offset)
        end = chunk.rfind(b"\n")
        if end < 0:
            return 0
        self._offset += end + 1
        handled = 0
        for line in chunk[: end + 1].splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            try:
                self.handler(event)
                handled += 1
            except Exception:  # a bad event must not stop the metrics thread
                logger.exception("cannot apply event %s from %s", event.get("kind"), self.path.name)
        return handled

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()
