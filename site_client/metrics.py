"""Site metrics: the ClientApp writes events to `events.jsonl`; `invcoss-client` tails them into Prometheus.

A ClientApp process lives for one message, so it cannot serve `/metrics`. It appends JSON lines (`SiteEvents`:
stage start/finish, training progress, inversion progress, privacy gate, bytes in/out), throttling per-step
progress; the long-lived `invcoss-client` follows the file (`invcoss_core.common.eventlog.EventTailer`) and serves
`SiteMetrics`. Events carry counts, seconds, losses and hashes only — never patient data or file names.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from invcoss_core.common.eventlog import emit_event
from invcoss_core.common.events import ProgressEvent
from invcoss_core.common.processes import bind_or_explain


class SiteEvents:
    """Writes the site's event lines; progress events are throttled to one per phase every `min_interval_s`."""

    def __init__(self, path: Path, min_interval_s: float = 0.5) -> None:
        self.path = Path(path)
        self.min_interval_s = min_interval_s
        self._last: dict[str, float] = {}

    def emit(self, kind: str, /, durable: bool = True, **fields: Any) -> None:
        """Append one event; `durable` events are fsync'd."""
        emit_event(self.path, kind, durable=durable, **fields)

    def progress(self, event: ProgressEvent) -> None:
        """EventSink for `run_stage`: forwards progress, at most one line per phase per interval."""
        now = time.monotonic()
        final = event.step >= event.total or "epoch_loss" in event.metrics
        if not final and now - self._last.get(event.phase, 0.0) < self.min_interval_s:
            return
        self._last[event.phase] = now
        self.emit(
            "progress",
            durable=False,
            phase=event.phase,
            modality=event.modality,
            step=event.step,
            total=event.total,
            epoch=event.epoch,
            metrics={k: float(v) for k, v in event.metrics.items()},
        )


class SiteMetrics:
    """The site's Prometheus metrics."""

    def __init__(self, site: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.info = Gauge("invcoss_site_info", "Site identity", ["site"], registry=r)
        self.info.labels(site).set(1)
        self.stage = Gauge("invcoss_site_stage_index", "Stage being (or last) run", registry=r)
        self.running = Gauge("invcoss_site_stage_running", "1 while a stage runs", registry=r)
        self.epoch = Gauge("invcoss_site_epoch", "Training epoch of the running stage", registry=r)
        self.train_progress = Gauge("invcoss_site_train_progress", "Training steps done / total", registry=r)
        self.loss = Gauge("invcoss_site_loss", "Latest MAE loss on this site's data", registry=r)
        self.images_per_second = Gauge("invcoss_site_images_per_second", "Training throughput", registry=r)
        self.inversion_progress = Gauge(
            "invcoss_site_inversion_progress", "Inversion / replay steps done / total", registry=r
        )
        self.gate_checked = Counter("invcoss_site_gate_checked", "Synthetic images checked by the gate", registry=r)
        self.gate_blocked = Counter("invcoss_site_gate_blocked", "Synthetic images blocked by the gate", registry=r)
        self.bytes_out = Counter("invcoss_site_bytes_out", "Bytes of arrays sent", registry=r)
        self.bytes_in = Counter("invcoss_site_bytes_in", "Bytes of arrays received", registry=r)
        self.messages_out = Counter("invcoss_site_messages_out", "Messages sent (all in the audit log)", registry=r)
        self.stages = Counter("invcoss_site_stages", "Stages finished", ["outcome"], registry=r)
        self.stage_seconds = Histogram(
            "invcoss_site_stage_seconds",
            "Stage duration on this site",
            buckets=(5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400),
            registry=r,
        )
        self.resumed = Counter("invcoss_site_stage_resumed", "Stages resumed from an epoch checkpoint", registry=r)
        self.supernode_restarts = Counter("invcoss_site_supernode_restarts", "SuperNode restarts", registry=r)

    def apply(self, event: dict[str, Any]) -> None:
        """Update the metrics from one ClientApp event."""
        kind = event.get("kind")
        if kind == "stage_started":
            self.stage.set(float(event.get("stage", 0)))
            self.running.set(1)
            self.epoch.set(0)
            self.train_progress.set(0)
            self.inversion_progress.set(0)
        elif kind == "message_in":
            self.bytes_in.inc(float(event.get("bytes", 0)))
        elif kind == "message_out":
            self.bytes_out.inc(float(event.get("bytes", 0)))
            self.messages_out.inc()
        elif kind == "progress":
            self._progress(event)
        elif kind == "stage_resumed":
            self.resumed.inc()
        elif kind == "gate":
            self.gate_checked.inc(float(event.get("checked", 0)))
            self.gate_blocked.inc(float(event.get("blocked", 0)))
        elif kind == "stage_abandoned":  # its supervisor died: the stage stopped, unfinished
            self.running.set(0)
            self.stages.labels("abandoned").inc()
        elif kind == "stage_finished":
            self.running.set(0)
            self.stages.labels(str(event.get("outcome", "ok"))).inc()
            if event.get("outcome") == "ok" and not event.get("reused"):
                self.stage_seconds.observe(float(event.get("seconds", 0.0)))

    def _progress(self, event: dict[str, Any]) -> None:
        metrics = event.get("metrics", {})
        fraction = float(event.get("step", 0)) / max(1.0, float(event.get("total", 1)))
        if event.get("phase") == "train":
            if event.get("epoch") is not None:
                self.epoch.set(float(event["epoch"]))
            self.train_progress.set(fraction)
            loss = metrics.get("epoch_loss", metrics.get("loss"))
            if loss is not None:
                self.loss.set(float(loss))
            if "images_per_second" in metrics:
                self.images_per_second.set(float(metrics["images_per_second"]))
        elif event.get("phase") in ("inversion", "replay", "gate"):
            self.inversion_progress.set(fraction)


def serve_metrics(registry: CollectorRegistry, host: str, port: int, config_file: Path | str) -> int:
    """Serve `registry` on http://HOST:PORT/metrics from a daemon thread; returns the bound port.

    Raises:
        PortUnavailableError: when HOST:PORT cannot be bound (the message names [metrics] in `config_file`).
    """
    start = lambda: start_http_server(port, addr=host, registry=registry)  # noqa: E731
    server, _thread = bind_or_explain(start, host, port, "[metrics] port (0 picks a free one)", config_file)
    return int(server.server_port)
