"""A whole federation on one machine over 127.0.0.1: certificates, keys, enrollment, coordinator, sites.

Used by `invcoss demo` and by the integration tests. Every process is started through the real command lines
(`invcoss-server`, `invcoss-client`) in its own process group, with its output in `ROOT/logs/`, and `close()`
stops every group it started (SIGTERM, then SIGKILL). Nothing here imports `site_client`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from invcoss_core.common.processes import executable
from invcoss_core.common.signing import generate_private_key, private_key_openssh, public_key_openssh
from server.config import load_federation_config
from server.handoff import enroll_key
from server.pki import DEFAULT_SANS, create_certificates
from server.state import StateLayout


class FederationError(RuntimeError):
    """A local federation cannot go on; the message says what happened and where the logs are."""


class FederationTimeoutError(FederationError, TimeoutError):
    """A local federation did not reach the expected state in time (or its coordinator exited first)."""


class ProcessExitedError(FederationError):
    """A site's `invcoss-client` exited while the run still needed it."""


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def log_tail(path: Path, lines: int = 12) -> str:
    """The last `lines` lines of a log file, indented, or a line saying it is missing."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"  ({path} not written)"
    text = ANSI_ESCAPE.sub("", text)  # Flower colours its log lines
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(f"  | {line}" for line in tail) or f"  ({path} is empty)"


EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_issued: set[int] = set()  # ports handed out by this process: never twice, though each is free until bound


def _ephemeral_low() -> int:
    """First port of the kernel's ephemeral range (32768 where it cannot be read)."""
    try:
        return int(EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now, not handed out before by this process, below the ephemeral range.

    A federation picks all its ports first and its processes bind them seconds later. A port from the kernel's
    ephemeral range (what binding port 0 gives) can be taken in between by any process's outgoing connection or
    port-0 listener: then a SuperNode or metrics server cannot bind it and a site never comes online. Ports below
    that range are only ever taken by explicit binds.
    """
    low = _ephemeral_low()
    candidates = range(max(1024, low - 12288), low) if low > 2048 else range(0)
    for port in random.sample(candidates, min(256, len(candidates))):
        if port not in _issued and _bindable(port):
            _issued.add(port)
            return port
    for _ in range(64):  # no free port below the ephemeral range: let the kernel pick one
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _issued:
            _issued.add(port)
            return port
    raise OSError("no free TCP port on 127.0.0.1")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class LocalSite:
    """One simulated hospital site."""

    name: str
    modality: str
    data_dir: Path
    stage_overrides: Mapping[str, Any] = field(default_factory=dict)  # site.toml [stage]


@dataclass
class LocalFederation:
    """Coordinator and sites as subprocesses on loopback; see the module docstring."""

    root: Path
    sites: list[LocalSite]
    profile: str = "tiny"
    defaults: Mapping[str, Any] = field(default_factory=dict)  # StageConfig overrides for every stage
    retry: Mapping[str, Any] = field(default_factory=dict)  # federation.toml [retry]
    superlink: Mapping[str, Any] = field(default_factory=dict)  # federation.toml [superlink] beyond host/port/certs
    activation_wait_s: float = 120.0
    metrics: bool = True
    stages: list[dict[str, Any]] | None = None  # federation.toml [[stages]]; None: one stage per site, in order
    # Every site's operator releases a hand-off that its privacy audit would hold (site.toml [stage.privacy]
    # release_above_max, recorded in the signed manifest as "released_by_operator").
    release_held: bool = False
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    # -- layout -----------------------------------------------------------------------------------------------
    @property
    def federation_toml(self) -> Path:
        return self.root / "coordinator" / "federation.toml"

    @property
    def layout(self) -> StateLayout:
        return StateLayout(self.root / "coordinator" / "state")

    @property
    def certs_dir(self) -> Path:
        return self.root / "coordinator" / "certs"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def site_dir(self, name: str) -> Path:
        return self.root / "sites" / name

    def site_toml(self, name: str) -> Path:
        return self.site_dir(name) / "site.toml"

    def site_work(self, name: str) -> Path:
        return self.site_dir(name) / "work"

    def site_key(self, name: str) -> Path:
        return self.site_dir(name) / "keys" / f"{name}.key"

    # -- set-up -----------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Ports, federation.toml, certificates, site keys, site.toml files and enrollment."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.ports["superlink"] = free_port()
        self.ports["coordinator_metrics"] = free_port()
        federation = {
            "run_name": "demo",
            "state_dir": "state",
            "profile": self.profile,
            "defaults": dict(self.defaults),
            "superlink": {
                "host": "127.0.0.1",
                "port": self.ports["superlink"],
                "certs_dir": "certs",
                **dict(self.superlink),
            },
            "retry": {"backoff_s": 2.0, "node_wait_s": 180.0, "poll_interval_s": 1.0, **dict(self.retry)},
            "metrics": {"enabled": self.metrics, "host": "127.0.0.1", "port": self.ports["coordinator_metrics"]},
            "stages": self.stages or [{"site": s.name, "modality": s.modality} for s in self.sites],
        }
        self.federation_toml.parent.mkdir(parents=True, exist_ok=True)
        self.federation_toml.write_text(tomli_w.dumps(federation))
        config = load_federation_config(self.federation_toml)
        # In-process equivalents of `invcoss-server certs`, `invcoss-client keygen` and `invcoss-server enroll`
        # (the same library calls; starting three CLIs per site would cost seconds of imports each).
        create_certificates(config.superlink.certs_dir, list(DEFAULT_SANS), overwrite=True)
        for site in self.sites:
            key = generate_private_key()
            key_file = self.site_key(site.name)
            key_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(private_key_openssh(key))
            key_file.with_suffix(".pub").write_bytes(public_key_openssh(key) + b"\n")
            enroll_key(self.layout, site.name, public_key_openssh(key), str(key_file.with_suffix(".pub")))
            self.ports[f"{site.name}_clientappio"] = free_port()
            self.ports[f"{site.name}_metrics"] = free_port()
            site_toml = {
                "site": site.name,
                "modality": site.modality,
                "data_dir": str(site.data_dir),
                "work_dir": "work",
                "private_key": f"keys/{site.name}.key",
                "device": "cpu",
                "superlink": {
                    "address": f"127.0.0.1:{self.ports['superlink']}",
                    "root_certificates": str(self.certs_dir / "ca.crt"),
                },
                "supernode": {
                    "clientappio_port": self.ports[f"{site.name}_clientappio"],
                    "activation_wait_s": self.activation_wait_s,
                },
                "metrics": {"enabled": self.metrics, "host": "127.0.0.1", "port": self.ports[f"{site.name}_metrics"]},
                "stage": _with_release(site.stage_overrides) if self.release_held else dict(site.stage_overrides),
            }
            self.site_toml(site.name).write_text(tomli_w.dumps(site_toml))

    # -- processes --------------------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=_env(), cwd=self.root
            )
        self.processes[name] = process
        return process

    def start_coordinator(self, *extra: str) -> subprocess.Popen[bytes]:
        """Start `invcoss-server --config federation.toml` (own process group)."""
        return self._spawn("coordinator", [executable("invcoss-server"), "--config", str(self.federation_toml), *extra])

    def start_site(self, name: str) -> subprocess.Popen[bytes]:
        """Start `invcoss-client --site NAME --config site.toml` (own process group)."""
        return self._spawn(
            f"site-{name}", [executable("invcoss-client"), "--site", name, "--config", str(self.site_toml(name))]
        )

    def start_all(self) -> None:
        """Coordinator first, then every site."""
        self.start_coordinator()
        for site in self.sites:
            self.start_site(site.name)

    def signal_group(self, name: str, sig: int) -> None:
        """Send `sig` to the process group of a started process."""
        process = self.processes.get(name)
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, sig)

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int | None:
        """Signal a process group and wait for its leader; SIGKILL the group when it does not exit in time."""
        process = self.processes.get(name)
        if process is None:
            return None
        self.signal_group(name, sig)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.signal_group(name, signal.SIGKILL)
            process.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # stragglers of the group
        return process.returncode

    def stop_many(self, names: list[str], sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> None:
        """Stop several process groups at once (signal all, then wait for each)."""
        for name in names:
            self.signal_group(name, sig)
        for name in names:
            with contextlib.suppress(Exception):
                self.stop(name, sig, timeout_s)

    def close(self) -> None:
        """Stop every process this federation started: sites first, then the coordinator."""
        self.stop_many([n for n in self.processes if n != "coordinator"])
        if "coordinator" in self.processes:
            with contextlib.suppress(Exception):
                self.stop("coordinator")

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- observation ------------------------------------------------------------------------------------------
    def site_logs(self, name: str) -> list[Path]:
        """The logs that say why a site did what it did: its client's output and its SuperNode's log."""
        return [self.logs / f"site-{name}.log", self.site_work(name) / "logs" / "supernode.log"]

    def explain(self, names: list[str], lines: int = 12) -> str:
        """The last lines of the coordinator's log (name 'coordinator') and of the named sites' logs."""
        files: list[Path] = []
        for name in names:
            files += [self.logs / "coordinator.log"] if name == "coordinator" else self.site_logs(name)
        return "\n".join(f"last lines of {path}:\n{log_tail(path, lines)}" for path in files)

    def check_sites_running(self) -> None:
        """Raise when a site's client exited: a run that needs it would otherwise wait out every attempt.

        Raises:
            ProcessExitedError: naming the site, its exit code and the last lines of its logs.
        """
        for site in self.sites:
            process = self.processes.get(f"site-{site.name}")
            if process is not None and process.poll() is not None:
                raise ProcessExitedError(
                    f"site {site.name}'s invcoss-client exited (code {process.returncode}) before the end of the "
                    f"run\n{self.explain([site.name])}"
                )

    def state(self) -> dict[str, Any]:
        """run.json of the coordinator ({} before the first start)."""
        try:
            return dict(json.loads(self.layout.run_file.read_text()))
        except (OSError, ValueError):
            return {}

    def wait_until(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout_s: float,
        what: str,
        tick: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll run.json until `predicate(state)` holds.

        Raises:
            FederationTimeoutError: after `timeout_s`, or when the coordinator exited first.
            ProcessExitedError: when `tick` raises it (see `check_sites_running`).
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.state()
            if state and predicate(state):
                return state
            if tick is not None:
                tick(state)
            coordinator = self.processes.get("coordinator")
            if coordinator is not None and coordinator.poll() is not None and not (state and predicate(state)):
                raise FederationTimeoutError(
                    f"the coordinator exited (code {coordinator.returncode}) before {what}\n"
                    + self.explain(["coordinator"])
                )
            time.sleep(0.5)
        raise FederationTimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")

    def stage_status(self, index: int) -> str:
        """Status of stage `index` in run.json."""
        stages = self.state().get("stages", [])
        return str(stages[index - 1]["status"]) if len(stages) >= index else "pending"

    def site_events(self, name: str) -> list[dict[str, Any]]:
        """Every event a site's ClientApps wrote."""
        return _read_events(self.site_work(name) / "events.jsonl")

    def audit(self, name: str) -> dict[str, Any]:
        """`invcoss-client audit --json` of a site: its real-data digests against every site's outbound log.

        Every site's audit log is included, so an image of site A forwarded by site B would be found too.

        Raises:
            FederationError: when the audit command fails (not when it finds real data: that is in the result).
        """
        others = [
            arg
            for site in self.sites
            if site.name != name
            for arg in ("--also-audit-log", str(self.site_work(site.name) / "audit.jsonl"))
        ]
        cmd = [executable("invcoss-client"), "audit", "--site", name, "--config", str(self.site_toml(name)), "--json"]
        done = subprocess.run([*cmd, *others], capture_output=True, timeout=900, check=False, env=_env())
        if done.returncode not in (0, 1) or not done.stdout.strip():
            tail = done.stderr.decode(errors="replace")[-800:]
            raise FederationError(f"audit of site {name} failed (code {done.returncode}): {tail}")
        return dict(json.loads(done.stdout))

    def audit_all(self) -> dict[str, dict[str, Any]]:
        """`audit` of every site, run in parallel."""
        with ThreadPoolExecutor(max_workers=len(self.sites)) as pool:
            results = pool.map(self.audit, [s.name for s in self.sites])
            return dict(zip([s.name for s in self.sites], results))


def _with_release(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A site's [stage] overrides with `privacy.release_above_max = true` added."""
    privacy = dict(overrides.get("privacy", {}))
    privacy["release_above_max"] = True
    return {**dict(overrides), "privacy": privacy}


def split_by_subject(folder: Path, parts: int, dest: Path, modality: str) -> list[Path]:
    """Share one modality folder's images among `parts` site folders, whole subjects to one site each.

    Each site folder `dest/<i>/<modality>/` links the top-level entries (files, DICOM series folders) of its
    subjects; subjects go round-robin in sorted order, so the split is reproducible.

    Returns:
        The `parts` site data folders (each holding `<modality>/`).
    Raises:
        FederationError: when the folder has fewer subjects than `parts`.
    """
    from invcoss_core.data import discover_images

    sources = discover_images(folder, group_dicom_series=True).sources
    subject_of: dict[str, str] = {}
    for source in sources:
        subject_of.setdefault(source.name.split("/", 1)[0].split("#", 1)[0], source.subject)
    subjects = sorted(set(subject_of.values()))
    if len(subjects) < parts:
        raise FederationError(
            f"{folder} holds {len(subjects)} subject(s) of {modality}; it cannot give {parts} sites distinct subjects"
        )
    owner = {subject: i % parts for i, subject in enumerate(subjects)}
    roots = [dest / f"{modality}-{i + 1}" for i in range(parts)]
    for root in roots:
        (root / modality).mkdir(parents=True, exist_ok=True)
    for top, subject in sorted(subject_of.items()):
        link = roots[owner[subject]] / modality / top
        if not link.exists():
            link.symlink_to((folder / top).resolve())
    return roots


def _read_events(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
