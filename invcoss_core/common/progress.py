"""Terminal progress for long work: turns ProgressEvents into rich progress bars (used by CLIs only)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from invcoss_core.common.events import EventSink, ProgressEvent


@contextmanager
def rich_progress(console: Console | None = None, enabled: bool = True) -> Iterator[EventSink]:
    """A sink that draws one bar per (phase, modality) with the latest metrics; a no-op when disabled.

    When the console is no terminal (a log file), bars would be one 80-column frame with the counts cut off; the
    sink prints plain lines instead: one per training epoch and one when any other phase completes.
    """
    if not enabled:
        yield lambda _event: None
        return
    console = console or Console(stderr=True)
    if not console.is_terminal:
        yield plain_progress_lines(console)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    )
    tasks: dict[tuple[str, str], TaskID] = {}

    def sink(event: ProgressEvent) -> None:
        key = (event.phase, event.modality)
        if key not in tasks:
            tasks[key] = progress.add_task(f"{event.phase} {event.modality}", total=event.total, info="")
        progress.update(tasks[key], completed=event.step, total=event.total, info=_describe(event))

    with progress:
        yield sink


def _describe(event: ProgressEvent) -> str:
    info = " ".join(f"{k}={v:.4g}" for k, v in event.metrics.items())
    epoch = f"epoch {event.epoch} " if event.epoch is not None else ""
    return epoch + info


def plain_progress_lines(console: Console) -> EventSink:
    """A sink that prints `PHASE MODALITY STEP/TOTAL [epoch E] metrics`: at each epoch's end (the event that carries
    `epoch_loss`) and once when another phase reaches its total."""
    done: set[tuple[str, str]] = set()

    def sink(event: ProgressEvent) -> None:
        key = (event.phase, event.modality)
        epoch_end = "epoch_loss" in event.metrics
        finished = event.phase != "train" and event.total > 0 and event.step >= event.total and key not in done
        if epoch_end or finished:
            done.add(key)
            line = f"{event.phase} {event.modality} {event.step}/{event.total} {_describe(event)}".rstrip()
            console.file.write(line + "\n")

    return sink
