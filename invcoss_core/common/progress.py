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
    """A sink that draws one bar per (phase, modality) with the latest metrics; a no-op when disabled."""
    if not enabled:
        yield lambda _event: None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console or Console(stderr=True),
        transient=False,
    )
    tasks: dict[tuple[str, str], TaskID] = {}

    def sink(event: ProgressEvent) -> None:
        key = (event.phase, event.modality)
        if key not in tasks:
            tasks[key] = progress.add_task(f"{event.phase} {event.modality}", total=event.total, info="")
        info = " ".join(f"{k}={v:.4g}" for k, v in event.metrics.items())
        epoch = f"epoch {event.epoch} " if event.epoch is not None else ""
        progress.update(tasks[key], completed=event.step, total=event.total, info=epoch + info)

    with progress:
        yield sink
