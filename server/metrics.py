"""Coordinator metrics: the ServerApp writes events to `events.jsonl`; `invcoss-server` tails them into Prometheus.

The ServerApp is a short-lived process started by the SuperLink, so it cannot serve `/metrics` itself. It appends
one JSON line per event (`invcoss_core.common.eventlog.emit_event`); the long-lived `invcoss-server` process follows the
file (`invcoss_core.common.eventlog.EventTailer`) and updates its registry (`CoordinatorMetrics`), served by
`serve_metrics`. Event fields are counts, seconds, bytes, site names and hashes — never patient data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from invcoss_core.common.processes import bind_or_explain


class CoordinatorMetrics:
    """The coordinator's Prometheus metrics, updated from ServerApp events and the supervisor."""

    def __init__(self, plan_stages: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.stages_planned = Gauge("invcoss_coordinator_stages_planned", "Stages in the plan", registry=r)
        self.stages_done = Gauge("invcoss_coordinator_stages_done", "Stages finished and verified", registry=r)
        self.current_stage = Gauge("invcoss_coordinator_current_stage", "Index of the stage in flight", registry=r)
        self.run_status = Gauge(
            "invcoss_coordinator_run_status", "1 for the current run status", ["status"], registry=r
        )
        self.attempts = Counter("invcoss_coordinator_stage_attempts", "Stage messages sent", ["site"], registry=r)
        self.retries = Counter("invcoss_coordinator_stage_retries", "Stage retries", ["site"], registry=r)
        self.failures = Counter(
            "invcoss_coordinator_stage_failed_attempts", "Failed stage attempts", ["site"], registry=r
        )
        self.verified = Counter(
            "invcoss_coordinator_artifacts_verified", "Artifacts whose signature and lineage verified", registry=r
        )
        self.refused = Counter("invcoss_coordinator_artifacts_refused", "Artifacts refused", ["site"], registry=r)
        self.bytes_out = Counter("invcoss_coordinator_bytes_out", "Artifact bytes sent to sites", ["site"], registry=r)
        self.bytes_in = Counter(
            "invcoss_coordinator_bytes_in", "Artifact bytes received from sites", ["site"], registry=r
        )
        self.stage_seconds = Histogram(
            "invcoss_coordinator_stage_seconds",
            "Stage duration, send to verified",
            buckets=(5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400),
            registry=r,
        )
        self.rounds_done = Counter(
            "invcoss_coordinator_rounds_done", "FedAvg rounds averaged (consortium stages)", ["stage"], registry=r
        )
        self.round_samples = Gauge(
            "invcoss_coordinator_round_samples",
            "Training samples a site contributed to its last averaged round",
            ["stage", "site"],
            registry=r,
        )
        self.round_loss = Gauge(
            "invcoss_coordinator_round_loss", "A site's mean MAE loss in its last round", ["stage", "site"], registry=r
        )
        self.round_missing = Counter(
            "invcoss_coordinator_round_missing_sites",
            "Sites left out of a round (dropped, offline)",
            ["site"],
            registry=r,
        )
        self.gate_blocked = Gauge(
            "invcoss_coordinator_gate_blocked",
            "Candidate images a site's gate blocked (consortium stages)",
            ["stage", "site"],
            registry=r,
        )
        self.step_bytes_out = Counter(
            "invcoss_coordinator_step_bytes_out", "Consortium step bytes sent to sites", ["site", "step"], registry=r
        )
        self.superlink_restarts = Counter(
            "invcoss_coordinator_superlink_restarts", "SuperLink restarts by the supervisor", registry=r
        )
        self.serverapp_restarts = Counter(
            "invcoss_coordinator_serverapp_restarts", "ServerApp resubmissions by the supervisor", registry=r
        )
        self.stages_planned.set(plan_stages)
        self.set_status("pending")

    def set_status(self, status: str) -> None:
        """Mark `status` as the current run status."""
        for name in ("pending", "running", "done", "failed"):
            self.run_status.labels(name).set(1.0 if name == status else 0.0)

    def apply(self, event: dict[str, Any]) -> None:
        """Update the metrics from one ServerApp event."""
        kind = event.get("kind")
        site = str(event.get("site", ""))
        if kind == "run_started":
            self.set_status("running")
            self.stages_done.set(float(event.get("done", 0)))
        elif kind == "stage_sent":
            self.current_stage.set(float(event["stage"]))
            self.attempts.labels(site).inc()
        elif kind == "stage_retry":
            self.retries.labels(site).inc()
        elif kind == "stage_failed_attempt":
            self.failures.labels(site).inc()
        elif kind == "artifact_verified":
            self.verified.inc()
        elif kind == "artifact_refused":
            self.refused.labels(site).inc()
        elif kind == "stage_done":
            self.stages_done.inc()
            self.bytes_out.labels(site).inc(float(event.get("bytes_out", 0)))
            self.bytes_in.labels(site).inc(float(event.get("bytes_in", 0)))
            self.stage_seconds.observe(float(event.get("seconds", 0.0)))
        elif kind == "round_done":
            stage = str(event.get("stage", ""))
            self.rounds_done.labels(stage).inc()
            for name, contribution in dict(event.get("sites", {})).items():
                self.round_samples.labels(stage, name).set(float(contribution.get("num_examples", 0)))
                self.round_loss.labels(stage, name).set(float(contribution.get("loss", 0.0)))
            for name in event.get("missing", []):
                self.round_missing.labels(str(name)).inc()
        elif kind in ("gate_verdicts", "candidates"):
            self.gate_blocked.labels(str(event.get("stage", "")), site).set(float(event.get("blocked", 0)))
        elif kind == "step_sent":
            self.step_bytes_out.labels(site, str(event.get("step", ""))).inc(float(event.get("bytes", 0)))
        elif kind == "run_done":
            self.set_status("done")
        elif kind == "run_failed":
            self.set_status("failed")


def serve_metrics(registry: CollectorRegistry, host: str, port: int, config_file: Path | str) -> int:
    """Serve `registry` on http://HOST:PORT/metrics from a daemon thread; returns the bound port.

    Raises:
        PortUnavailableError: when HOST:PORT cannot be bound (the message names [metrics] in `config_file`).
    """
    start = lambda: start_http_server(port, addr=host, registry=registry)  # noqa: E731
    server, _thread = bind_or_explain(start, host, port, "[metrics] port (0 picks a free one)", config_file)
    return int(server.server_port)
