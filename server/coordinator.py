"""The long-lived coordinator process: SuperLink supervision, site registration, run submission, metrics.

`Coordinator.serve` is what `invcoss-server --config federation.toml` runs: it starts the SuperLink, registers
the enrolled site keys, submits the stage-plan ServerApp, and then watches three things until the plan is done
or failed — the SuperLink (restarted on a crash, up to `superlink.restart_limit`), the ServerApp (resubmitted
if it dies mid-plan, up to `retry.serverapp_restarts`) and the durable run state (progress and the end).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from invcoss_core.common.eventlog import EventTailer
from invcoss_core.common.processes import InstanceLock, InstanceRunningError, PortUnavailableError, pid_alive
from server.config import FederationConfig
from server.handoff import EnrollmentError
from server.metrics import CoordinatorMetrics, serve_metrics
from server.pki import CertificatePaths
from server.state import (
    RunState,
    StateLayout,
    atomic_write,
    init_state,
    journal,
    load_state,
    update_state,
)
from server.superlink import (
    ControlApi,
    SuperLinkError,
    SuperLinkProcess,
    write_app_dir,
    write_flower_config,
)

logger = logging.getLogger(__name__)

SERVERAPP_START_GRACE_S = 90.0


class CoordinatorError(RuntimeError):
    """The coordinator cannot start or cannot go on; the message says what to do."""


def package_version() -> str:
    """The installed invcoss version (0.0.0 when running from a source tree without metadata)."""
    try:
        return version("invcoss")
    except PackageNotFoundError:
        return "0.0.0"


@dataclass
class _ServerAppWatch:
    """What the event stream told us about the ServerApp of the current submission."""

    flower_run_id: int | None = None
    pid: int | None = None
    finished: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


def check_ready(config: FederationConfig, layout: StateLayout) -> None:
    """Refuse to start without certificates or with a plan site that is not enrolled.

    Raises:
        CoordinatorError: naming the command that fixes it.
    """
    certs = CertificatePaths.in_dir(config.superlink.certs_dir)
    if not certs.complete():
        raise CoordinatorError(
            f"TLS certificates missing in {config.superlink.certs_dir}; create them with "
            "`invcoss-server certs --config federation.toml`"
        )
    missing = sorted({n for s in config.stages for n in s.site_names if not layout.enrolled_key(n).is_file()})
    if missing and config.superlink.node_auth:
        raise CoordinatorError(
            f"sites {', '.join(missing)} of the plan are not enrolled; for each run "
            "`invcoss-server enroll --config federation.toml --site NAME --public-key NAME.pub`"
        )


def register_sites(control: ControlApi, layout: StateLayout) -> dict[str, Any]:
    """Register every enrolled key with the SuperLink under its site name (idempotent, re-keying aware).

    A key already registered in this SuperLink database is skipped; a site whose key changed has its old node
    unregistered first, so exactly one SuperNode carries each site name.
    """
    registered: dict[str, Any] = {}
    if layout.registered.is_file():
        registered = json.loads(layout.registered.read_text())
    database_id = _database_id(layout)

    def register(key_file: Path) -> tuple[str, dict[str, Any]] | None:
        site = key_file.stem
        key_sha = hashlib.sha256(key_file.read_bytes()).hexdigest()
        previous = registered.get(site, {})
        if previous.get("key") == key_sha and previous.get("database") == database_id:
            return None
        if previous.get("node_id") and previous.get("key") != key_sha:
            try:
                control.unregister(int(previous["node_id"]))
            except SuperLinkError as err:
                logger.warning("could not unregister the old node of site %s: %s", site, err)
        node_id = control.register(site, key_file)
        if node_id is None and previous.get("key") == key_sha:
            node_id = previous.get("node_id")
        logger.info("site %s registered with the SuperLink", site)
        return site, {"node_id": node_id, "key": key_sha, "database": database_id}

    for key_file in sorted(layout.enrolled.glob("*.pub")):
        done = register(key_file)
        if done is not None:
            registered[done[0]] = done[1]
    atomic_write(layout.registered, json.dumps(registered, indent=2).encode())
    return registered


def _database_id(layout: StateLayout) -> str:
    try:
        stat = layout.database.stat()
    except OSError:
        return "none"
    return f"{stat.st_dev}:{stat.st_ino}"


class Coordinator:
    """Supervises the SuperLink and the stage-plan ServerApp of one federation config."""

    def __init__(self, config: FederationConfig, say: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.layout = StateLayout(config.state_dir)
        self.say = say or (lambda line: logger.info("%s", line))
        self.metrics = CoordinatorMetrics(len(config.stages))
        self.watch = _ServerAppWatch()
        self.superlink = SuperLinkProcess(config, self.layout)
        self.control = ControlApi(self.layout)
        self.metrics_port: int | None = None
        self._stop = threading.Event()

    def request_stop(self) -> None:
        """Ask `serve` to return (signal handlers call this)."""
        self._stop.set()

    # -- event stream -----------------------------------------------------------------------------------------
    def _on_event(self, event: dict[str, Any]) -> None:
        self.metrics.apply(event)
        kind = event.get("kind")
        if kind == "serverapp_started":
            with self.watch.lock:
                if event.get("flower_run_id") == self.watch.flower_run_id:
                    self.watch.pid = int(event["serverapp_pid"])
        elif kind == "serverapp_finished":
            with self.watch.lock:
                self.watch.finished = True
        line = _describe(event, len(self.config.stages))
        if line:
            self.say(line)

    # -- lifecycle --------------------------------------------------------------------------------------------
    def prepare(self, new_run: bool = False) -> RunState:
        """Validate readiness, create or load the run state and write plan.json, the app folder, FLWR_HOME."""
        check_ready(self.config, self.layout)
        state = init_state(self.layout, self.config, new_run=new_run)
        atomic_write(self.layout.plan_file, self.config.model_dump_json(indent=2).encode())
        write_flower_config(self.layout, self.config)
        write_app_dir(self.layout, package_version())
        return state

    def serve(self, new_run: bool = False, stay: bool = False) -> RunState:
        """Run the federation until the plan is done or failed (then keep serving when `stay`).

        Raises:
            CoordinatorError: when another coordinator runs on this state folder, or the SuperLink or the
                ServerApp cannot be kept running.
        """
        self.layout.root.mkdir(parents=True, exist_ok=True)
        try:
            lock = InstanceLock(self.layout.root / "coordinator.lock").acquire("an invcoss-server")
        except InstanceRunningError as err:
            raise CoordinatorError(str(err)) from None
        try:
            return self._serve(new_run, stay)
        finally:
            lock.release()

    def _serve(self, new_run: bool, stay: bool) -> RunState:
        state = self.prepare(new_run)
        atomic_write(self.layout.pid_file, str(os.getpid()).encode())
        if self.config.metrics.enabled:
            host, port = self.config.metrics.host, self.config.metrics.port
            try:
                self.metrics_port = serve_metrics(self.metrics.registry, host, port, "federation.toml")
            except PortUnavailableError as err:
                raise CoordinatorError(str(err)) from None
            self.say(f"metrics on http://{host}:{self.metrics_port}/metrics")
        tailer = EventTailer(self.layout.events, self._on_event, from_start=False).start()
        self.metrics.stages_done.set(sum(s.status == "done" for s in state.stages))
        self.metrics.set_status(state.status)
        try:
            self._start_superlink()
            if state.status == "done":
                self.say(f"run {state.run_id} is already complete; final model in {self.layout.root / 'final'}")
            else:
                state = self._supervise(state)
            if stay:
                self.say("plan finished; still serving (SuperLink and /metrics) until stopped")
                self._serve_until_stopped()
            return state
        finally:
            tailer.stop()
            self.control.close()
            self.superlink.stop()
            self.layout.pid_file.unlink(missing_ok=True)

    def _start_superlink(self) -> None:
        self.say(
            f"starting the SuperLink on {self.config.superlink.host}:{self.config.superlink.port} "
            f"(TLS, node auth {'on' if self.config.superlink.node_auth else 'OFF'})"
        )
        try:
            self.superlink.start()
            if self.config.superlink.node_auth:
                register_sites(self.control, self.layout)
        except (SuperLinkError, EnrollmentError) as err:
            self.superlink.stop()
            raise CoordinatorError(str(err)) from None

    def _submit(self) -> None:
        state = load_state(self.layout)
        for old in (state.flower_run_ids if state else [])[-3:]:
            self.control.stop_run(old)
        try:
            run_id = self.control.submit(self.layout.app_dir, self.layout.root)
        except SuperLinkError as err:
            raise CoordinatorError(f"cannot submit the stage plan: {err}") from None
        with self.watch.lock:
            self.watch.flower_run_id, self.watch.pid, self.watch.finished = run_id, None, False
        update_state(self.layout, lambda s: s.model_copy(update={"flower_run_ids": [*s.flower_run_ids, run_id]}))
        journal(self.layout, "flower_run_submitted", flower_run_id=run_id)
        self.say(f"submitted the stage plan as Flower run {run_id}")

    def _supervise(self, state: RunState) -> RunState:
        superlink_restarts = serverapp_restarts = 0
        self._submit()
        submitted_at = time.monotonic()
        last_progress = time.monotonic()
        while not self._stop.is_set():
            current = load_state(self.layout) or state
            if current.status in ("done", "failed"):
                return current
            if not self.superlink.alive():
                superlink_restarts += 1
                self.metrics.superlink_restarts.inc()
                if superlink_restarts > self.config.superlink.restart_limit:
                    raise CoordinatorError(
                        f"the SuperLink exited {superlink_restarts} times; see {self.superlink.log_file}"
                    )
                self.say(f"the SuperLink exited (code {self.superlink.exit_code()}); restarting it")
                self.superlink.stop()
                self._start_superlink()
                self._submit()
                submitted_at = time.monotonic()
            elif self._serverapp_dead(submitted_at):
                serverapp_restarts += 1
                self.metrics.serverapp_restarts.inc()
                if serverapp_restarts > self.config.retry.serverapp_restarts:
                    raise CoordinatorError(
                        "the stage-plan ServerApp stopped before the plan finished "
                        f"{serverapp_restarts} times; see {self.layout.logs / 'serverapp.log'}"
                    )
                self.say("the ServerApp stopped before the plan finished; resubmitting it")
                self._submit()
                submitted_at = time.monotonic()
            if time.monotonic() - last_progress >= 30:
                self.say(_progress_line(current))
                last_progress = time.monotonic()
            self._stop.wait(1.0)
        return load_state(self.layout) or state

    def _serverapp_dead(self, submitted_at: float) -> bool:
        with self.watch.lock:
            pid, finished = self.watch.pid, self.watch.finished
        if pid is not None:
            return finished or not pid_alive(pid)
        if time.monotonic() - submitted_at < SERVERAPP_START_GRACE_S:
            return False
        status = self.control.run_status(self.watch.flower_run_id or 0)
        return status.startswith("finished")

    def _serve_until_stopped(self) -> None:
        while not self._stop.wait(1.0):
            if not self.superlink.alive():
                self.say("the SuperLink exited; restarting it")
                self.superlink.stop()
                self._start_superlink()


def _progress_line(state: RunState) -> str:
    done = sum(s.status == "done" for s in state.stages)
    current = state.next_stage()
    if current is None:
        return f"{done}/{len(state.stages)} stages done"
    if current.sites:
        rounds = f", {len(current.rounds)} round(s) done" + (f", {current.phase}" if current.phase else "")
        return (
            f"{done}/{len(state.stages)} stages done; stage {current.index} at sites {', '.join(current.sites)}: "
            f"{current.status}{rounds}"
        )
    return (
        f"{done}/{len(state.stages)} stages done; stage {current.index} at site {current.site}: {current.status} "
        f"(attempt {max(current.attempts, 1)})"
    )


def _describe(event: dict[str, Any], total: int) -> str | None:
    kind = event.get("kind")
    if kind == "stage_sent":
        return (
            f"stage {event['stage']}/{total} sent to site {event['site']} "
            f"(attempt {event['attempt']}, {event['bytes']} bytes)"
        )
    if kind == "stage_done":
        return (
            f"stage {event['stage']}/{total} done at site {event['site']} in {event['seconds']:.1f} s "
            f"({event['bytes_in']} bytes back{', reused' if event.get('reused') else ''})"
        )
    if kind == "round_done":
        sites = ", ".join(f"{k} n={v['num_examples']} loss={v['loss']:.4f}" for k, v in event["sites"].items())
        missing = f"; missing {', '.join(event['missing'])}" if event.get("missing") else ""
        return f"stage {event['stage']}/{total} round {event['round']}/{event['rounds']} averaged: {sites}{missing}"
    if kind == "stats_pooled":
        return f"stage {event['stage']}/{total}: feature statistics pooled from {', '.join(event['sites'])}"
    if kind == "candidates":
        return (
            f"stage {event['stage']}/{total}: {event['images']} candidate images from site {event['site']} "
            f"({event['blocked']} blocked by its own gate)"
        )
    if kind == "gate_verdicts":
        return f"stage {event['stage']}/{total}: site {event['site']} blocked {event['blocked']} of {event['checked']}"
    if kind == "step_refused":
        return f"stage {event['stage']} {event['step']}: site {event['site']} did not count: {event['error']}"
    if kind == "stage_failed_attempt":
        return f"stage {event['stage']} attempt failed: {event['error']}"
    if kind == "stage_retry" and "step" in event:
        return (
            f"retrying stage {event['stage']} {event['step']} in {event['wait_s']:.0f} s (attempt {event['attempt']})"
        )
    if kind == "stage_retry":
        return f"retrying stage {event['stage']} in {event['wait_s']:.0f} s (attempt {event['attempt']})"
    if kind == "artifact_refused":
        return f"REFUSED the artifact of stage {event['stage']} from site {event['site']}: {event['error']}"
    if kind == "site_waiting":
        return f"waiting for site {event['site']} to come online"
    if kind == "run_done":
        return f"run {event['run_id']} complete"
    if kind == "run_failed":
        return f"run FAILED: {event['error']}"
    return None
