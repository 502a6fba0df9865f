"""Durable run state: atomic writes, the journal, plan mismatch, locking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.state import StateError, StateLayout, atomic_write, init_state, journal, load_state, read_journal
from tests.server.conftest import federation_config


def test_new_run_state_lists_every_stage_pending(tmp_path: Path) -> None:
    cfg = federation_config(tmp_path, stages=3)
    layout = StateLayout(tmp_path / "state")
    state = init_state(layout, cfg)
    assert [s.site for s in state.stages] == ["A", "B", "C"]
    assert {s.status for s in state.stages} == {"pending"}
    assert state.run_id.startswith("invcoss-")
    assert load_state(layout) == state
    assert read_journal(layout)[0]["event"] == "run_created"


def test_restart_loads_the_same_run_and_refuses_another_plan(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path / "state")
    first = init_state(layout, federation_config(tmp_path, stages=2))
    assert init_state(layout, federation_config(tmp_path, stages=2)).run_id == first.run_id
    with pytest.raises(StateError, match=r"another plan.*--new-run"):
        init_state(layout, federation_config(tmp_path, stages=3))
    fresh = init_state(layout, federation_config(tmp_path, stages=3), new_run=True)
    assert fresh.run_id != first.run_id
    assert (layout.root / f"run-{first.run_id}.json").is_file()


def test_atomic_write_replaces_whole_files(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    atomic_write(path, b'{"a": 1}')
    atomic_write(path, b'{"a": 2}')
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_corrupt_state_is_reported_not_overwritten(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path / "state")
    layout.root.mkdir()
    layout.run_file.write_text("{not json")
    with pytest.raises(StateError, match="unreadable"):
        load_state(layout)
    assert layout.run_file.read_text() == "{not json"


def test_journal_skips_a_torn_last_line(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path / "state")
    journal(layout, "stage_done", stage=1)
    with open(layout.journal, "a") as fh:
        fh.write('{"event": "stage_do')
    assert [e["event"] for e in read_journal(layout)] == ["stage_done"]
