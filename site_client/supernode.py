"""Start, watch and stop the site's Flower SuperNode (TLS to the coordinator, node authentication by site key).

The SuperNode gets the federation CA certificate, the site's EC P-384 key and the node config
``site="<name>" config="<site.toml>"`` that the ClientApp reads. Flower's SuperNode exits with code 305 when the
SuperLink refuses to activate it: either the key is not enrolled, or the SuperLink still counts an earlier,
hard-killed session of this site as online (it stops doing so after two missed 30 s heartbeats). The supervisor
therefore keeps retrying a refused activation for `supernode.activation_wait_s` before it gives up with an
explanation, and restarts a crashed SuperNode up to `supernode.restart_limit` times.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from invcoss_core.common.processes import (
    child_env,
    die_with_parent,
    executable,
    pid_alive,
    supervisor_env,
    terminate_tree,
)
from site_client.config import SiteConfig

logger = logging.getLogger(__name__)

ACTIVATION_REFUSED_MARKERS = ("Exit Code: 305", "[code: 2004]")
CONNECTED_MARKER = "SuperNode ID:"
PORT_IN_USE_MARKER = "address already in use"
RETRY_WAIT_S = 5.0


class SiteClientError(RuntimeError):
    """The site cannot connect or keep its SuperNode running; the message says what to do."""


def flower_env(cfg: SiteConfig) -> dict[str, str]:
    """Environment for the SuperNode: FLWR_HOME in the work dir, telemetry and update checks off, this supervisor."""
    return child_env(
        {
            "FLWR_HOME": str(cfg.work_dir / "flwr-home"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            **supervisor_env(),  # the stage process stops itself when this supervisor is gone
        }
    )


class SuperNodeProcess:
    """One `flower-supernode` process and its log."""

    def __init__(self, cfg: SiteConfig, config_path: Path) -> None:
        self.cfg = cfg
        self.config_path = Path(config_path).resolve()
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def log_file(self) -> Path:
        return self.cfg.work_dir / "logs" / "supernode.log"

    def command(self) -> list[str]:
        """The `flower-supernode` command line."""
        node_config = f'site="{self.cfg.site}" config="{self.config_path}"'
        return [
            executable("flower-supernode"),
            "--superlink",
            self.cfg.superlink.address,
            "--root-certificates",
            str(self.cfg.superlink.root_certificates),
            "--auth-supernode-private-key",
            str(self.cfg.private_key),
            "--node-config",
            node_config,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.cfg.supernode.clientappio_port),
        ]

    def start(self) -> None:
        """Start the SuperNode (its output goes to work_dir/logs/supernode.log); it gets SIGTERM if this process dies.

        Call from the main thread (see `die_with_parent`).
        """
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                # a hard-killed supervisor must leave neither a SuperNode connected nor a ClientApp process behind
                die_with_parent(self.command(), group=True),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=flower_env(self.cfg),
                cwd=self.cfg.work_dir,
            )

    def alive(self) -> bool:
        """True while the SuperNode runs."""
        return self.process is not None and self.process.poll() is None

    def log_since_start(self) -> str:
        """What this SuperNode wrote to its log since `start`."""
        if not self.log_file.exists():
            return ""
        with open(self.log_file, "rb") as fh:
            fh.seek(self._log_offset)
            return fh.read().decode(errors="replace")

    def connected(self) -> bool:
        """True once the SuperNode has been activated by the SuperLink."""
        return CONNECTED_MARKER in self.log_since_start()

    def activation_refused(self) -> bool:
        """True when the last exit was a refused activation (not enrolled, or an earlier session still online)."""
        text = self.log_since_start()
        return any(marker in text for marker in ACTIVATION_REFUSED_MARKERS)

    def exit_reason(self) -> str:
        """Why the last SuperNode exited, in operator terms, when its log says ('' otherwise)."""
        if PORT_IN_USE_MARKER in self.log_since_start().lower():
            return (
                f"its port 127.0.0.1:{self.cfg.supernode.clientappio_port} is in use by another process (change "
                f"[supernode] clientappio_port in {self.config_path})"
            )
        return ""

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the SuperNode (it deactivates itself) and its ClientApp processes; SIGKILL what remains."""
        if self.process is None:
            return
        terminate_tree(self.process, timeout_s)
        self.process = None


class StageWatch:
    """Tracks the ClientApp processes that started a stage and have not finished it (from the events file).

    A stage process that dies without finishing (OOM killer, kill -9) leaves the SuperNode waiting for a reply
    that never comes, until Flower notices the missing task heartbeat (about a minute). The supervisor instead
    restarts the SuperNode at once: the coordinator sees the site re-activate and retries the stage, which
    resumes from the last epoch checkpoint.
    """

    def __init__(self, since: float = 0.0) -> None:
        self._running: dict[int, int] = {}  # pid -> stage index
        self._lock = threading.Lock()
        self.since = since  # stages started before (under an earlier supervisor) are not this one's to watch

    def apply(self, event: dict[str, object]) -> None:
        """Feed one site event."""
        pid = event.get("pid")
        if not isinstance(pid, int):
            return
        with self._lock:
            if event.get("kind") == "stage_started" and float(str(event.get("time", 0.0))) >= self.since:
                self._running[pid] = int(str(event.get("stage", 0)))
            elif event.get("kind") in ("stage_finished", "stage_abandoned"):
                self._running.pop(pid, None)

    def crashed(self) -> list[int]:
        """Stage indices whose process died without finishing (each reported once)."""
        with self._lock:
            dead = [pid for pid in self._running if not pid_alive(pid)]
            return [self._running.pop(pid) for pid in dead]


def supervise(
    node: SuperNodeProcess,
    stop: threading.Event,
    say: Callable[[str], None],
    on_restart: Callable[[], None] = lambda: None,
    watch: StageWatch | None = None,
) -> None:
    """Keep the SuperNode running until `stop` is set.

    Raises:
        SiteClientError: when activation stays refused for `activation_wait_s` or the SuperNode keeps crashing.
    """
    settings = node.cfg.supernode
    restarts = 0
    refused_since: float | None = None
    while not stop.is_set():
        node.start()
        announced = False
        crashed: list[int] = []
        while node.alive() and not stop.is_set():
            if not announced and node.connected():
                say(f"connected to the coordinator at {node.cfg.superlink.address} as site {node.cfg.site}")
                announced, refused_since = True, None
            if watch is not None and (crashed := watch.crashed()):
                break
            stop.wait(0.5)
        if stop.is_set():
            break
        if crashed:
            say(
                f"the process of stage {crashed[0]} died before finishing; restarting the SuperNode so the "
                "coordinator retries the stage now (it resumes from the last epoch checkpoint)"
            )
            on_restart()
            node.stop()
            continue
        if node.activation_refused():
            now = time.monotonic()
            refused_since = refused_since or now
            if now - refused_since >= settings.activation_wait_s:
                raise SiteClientError(
                    f"the SuperLink at {node.cfg.superlink.address} refused to activate site {node.cfg.site} for "
                    f"{settings.activation_wait_s:.0f} s. Either this site's key is not enrolled — send "
                    f"{node.cfg.private_key.with_suffix('.pub')} to the coordinator for `invcoss-server enroll "
                    f"--site {node.cfg.site} --public-key ...` — or an earlier session of this site was killed "
                    "hard and is still counted online (wait a minute). See " + str(node.log_file)
                )
            say(
                f"activation refused by the SuperLink (not enrolled yet, or an earlier session still counts as "
                f"online); retrying in {RETRY_WAIT_S:.0f} s"
            )
        else:
            restarts += 1
            on_restart()
            reason = node.exit_reason()
            because = f": {reason}" if reason else ""
            if restarts > settings.restart_limit:
                raise SiteClientError(f"the SuperNode exited {restarts} times{because}; see {node.log_file}")
            say(f"the SuperNode exited unexpectedly{because}; restarting it ({restarts}/{settings.restart_limit})")
        stop.wait(RETRY_WAIT_S)
    node.stop()
