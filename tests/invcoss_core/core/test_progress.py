"""Progress output: bars on a terminal, plain whole lines when the output is piped to a log file."""

from __future__ import annotations

import io

from rich.console import Console

from invcoss_core.common.events import ProgressEvent
from invcoss_core.common.progress import rich_progress

MODALITY = "ct_" + "with_a_long_name_" * 6  # the line is over 80 columns


def test_piped_progress_prints_one_whole_line_per_epoch_and_finished_phase() -> None:
    piped = Console(file=io.StringIO(), soft_wrap=True)
    with rich_progress(piped) as sink:
        for step in range(1, 11):
            sink(ProgressEvent("train", MODALITY, step, 10, 1 + (step - 1) // 5, {"loss": 0.5}))
            if step % 5 == 0:
                sink(ProgressEvent("train", MODALITY, step, 10, step // 5, {"epoch_loss": 0.25}))
        sink(ProgressEvent("inversion", MODALITY, 4, 8, None, {"l_task": 0.3}))
        sink(ProgressEvent("inversion", MODALITY, 8, 8, None, {"l_task": 0.2}))
    lines = piped.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert lines == [
        f"train {MODALITY} 5/10 epoch 1 epoch_loss=0.25",
        f"train {MODALITY} 10/10 epoch 2 epoch_loss=0.25",
        f"inversion {MODALITY} 8/8 l_task=0.2",
    ]


def test_progress_on_a_terminal_draws_bars() -> None:
    terminal = Console(file=io.StringIO(), force_terminal=True, width=120, color_system=None)
    with rich_progress(terminal) as sink:
        sink(ProgressEvent("train", "ct", 10, 10, 2, {"loss": 0.5}))
    assert "10/10" in terminal.file.getvalue()  # type: ignore[attr-defined]
