"""Coordinator metrics: events written by the ServerApp reach the Prometheus registry through the tailer."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from prometheus_client import generate_latest

from invcoss_core.common.eventlog import EventTailer, emit_event
from server.metrics import CoordinatorMetrics, serve_metrics


def test_tailer_dispatches_complete_lines_once(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    seen: list[str] = []
    tailer = EventTailer(path, lambda e: seen.append(e["kind"]), from_start=True)
    emit_event(path, "a")
    emit_event(path, "b")
    with open(path, "a") as fh:
        fh.write('{"kind": "torn"')
    assert tailer.poll() == 2
    assert tailer.poll() == 0
    with open(path, "a") as fh:
        fh.write("}\n")
    assert tailer.poll() == 1
    assert seen == ["a", "b", "torn"]


def test_events_update_the_coordinator_metrics(tmp_path: Path) -> None:
    metrics = CoordinatorMetrics(plan_stages=3)
    for event in (
        {"kind": "run_started", "done": 0},
        {"kind": "stage_sent", "stage": 1, "site": "A", "attempt": 1, "bytes": 0},
        {"kind": "stage_failed_attempt", "stage": 1, "site": "A", "error": "x"},
        {"kind": "stage_retry", "stage": 1, "site": "A", "attempt": 2, "wait_s": 1},
        {"kind": "artifact_verified", "stage": 1, "site": "A"},
        {"kind": "stage_done", "stage": 1, "site": "A", "seconds": 12.0, "bytes_in": 1000, "bytes_out": 0},
    ):
        metrics.apply(event)
    text = generate_latest(metrics.registry).decode()
    assert "invcoss_coordinator_stages_done 1.0" in text
    assert "invcoss_coordinator_current_stage 1.0" in text
    assert 'invcoss_coordinator_stage_retries_total{site="A"} 1.0' in text
    assert 'invcoss_coordinator_bytes_in_total{site="A"} 1000.0' in text
    assert 'invcoss_coordinator_run_status{status="running"} 1.0' in text
    port = serve_metrics(metrics.registry, "127.0.0.1", 0, "federation.toml")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert b"invcoss_coordinator_stage_seconds_bucket" in response.read()


def test_consortium_events_show_rounds_contributions_and_gate_verdicts() -> None:
    metrics = CoordinatorMetrics(plan_stages=2)
    for event in (
        {"kind": "step_sent", "stage": 1, "step": "round", "round": 1, "site": "A1", "bytes": 500},
        {
            "kind": "round_done",
            "stage": 1,
            "round": 1,
            "rounds": 2,
            "sites": {"A1": {"num_examples": 40, "loss": 0.5}, "A2": {"num_examples": 20, "loss": 0.25}},
            "missing": [],
        },
        {
            "kind": "round_done",
            "stage": 1,
            "round": 2,
            "rounds": 2,
            "sites": {"A1": {"num_examples": 40, "loss": 0.4}},
            "missing": ["A2"],
        },
        {"kind": "gate_verdicts", "stage": 1, "site": "A2", "checked": 8, "blocked": 3},
    ):
        metrics.apply(event)
    text = generate_latest(metrics.registry).decode()
    assert 'invcoss_coordinator_rounds_done_total{stage="1"} 2.0' in text
    assert 'invcoss_coordinator_round_samples{site="A2",stage="1"} 20.0' in text
    assert 'invcoss_coordinator_round_loss{site="A1",stage="1"} 0.4' in text
    assert 'invcoss_coordinator_round_missing_sites_total{site="A2"} 1.0' in text
    assert 'invcoss_coordinator_gate_blocked{site="A2",stage="1"} 3.0' in text
    assert 'invcoss_coordinator_step_bytes_out_total{site="A1",step="round"} 500.0' in text
