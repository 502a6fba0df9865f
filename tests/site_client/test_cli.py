"""The site supervisor's operator lines: one per stage-level event, none for step-level progress."""

from __future__ import annotations

from site_client.cli import describe_event


def test_stage_level_events_get_one_line_and_step_progress_none() -> None:
    events = [
        {"kind": "stage_started", "stage": 2, "run_id": "r1", "attempt": 1},
        {"kind": "progress", "phase": "train", "modality": "ct", "epoch": 1, "step": 3, "total": 8, "metrics": {}},
        {
            "kind": "progress",
            "phase": "train",
            "modality": "ct",
            "epoch": 1,
            "total": 2,
            "metrics": {"epoch_loss": 1.5},
        },
        {"kind": "progress", "phase": "inversion", "modality": "ct", "step": 4, "total": 10, "metrics": {}},
        {"kind": "progress", "phase": "inversion", "modality": "ct", "step": 10, "total": 10, "metrics": {}},
        {"kind": "gate", "stage": 2, "checked": 12, "blocked": 1},
        {"kind": "message_out", "bytes": 2_500_000},
        {"kind": "message_in", "bytes": 10},
        {"kind": "stage_finished", "stage": 2, "outcome": "ok", "seconds": 41.2},
    ]
    assert [describe_event(e) for e in events] == [
        "stage 2 started (run r1, attempt 1)",
        None,
        "ct epoch 1/2: loss 1.5000",
        None,
        "inversion ct: 10 steps done",
        "privacy gate: 12 synthetic images checked, 1 blocked",
        "message out: 2.5 MB (in the audit log)",
        None,
        "stage 2 finished: ok in 41 s",
    ]
