"""Start, watch and stop the Flower SuperLink, and drive its Control API (register sites, start and stop runs).

The SuperLink always runs with TLS, node authentication (unless disabled in the config), a durable `--database`
in the state folder, no runtime dependency installation and telemetry off. `FLWR_HOME` is the state folder's
`flwr-home/`, never the app folder (app bundles are capped at 10 MB). The app submitted to the SuperLink is a
generated folder holding only a `pyproject.toml` that names the installed `server.app:app` / `site_client.app:app`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import tomli_w
from cryptography.hazmat.primitives import serialization
from flwr.cli.build import build_fab_from_disk
from flwr.cli.config_utils import load_and_validate
from flwr.cli.flower_config import read_superlink_connection
from flwr.cli.utils import flwr_cli_exc_handler, init_http_client_from_connection
from flwr.common.config import parse_config_args
from flwr.common.serde import fab_to_proto, user_config_to_proto
from flwr.proto.control_pb2 import (
    ListRunsRequest,
    RegisterNodeRequest,
    StartRunRequest,
    StopRunRequest,
    UnregisterNodeRequest,
)
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.fab import Fab
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from invcoss_core.common.processes import child_env, die_with_parent, executable, terminate_tree
from server.config import FederationConfig
from server.pki import CertificatePaths
from server.state import StateLayout, atomic_write

logger = logging.getLogger(__name__)

CONNECTION = "invcoss"
APP_NAME = "invcoss-federation"


class SuperLinkError(RuntimeError):
    """The SuperLink or a `flwr` command failed; the message says what happened and where the log is."""


def flower_env(layout: StateLayout) -> dict[str, str]:
    """Environment for Flower processes: FLWR_HOME in the state folder, telemetry and update checks off."""
    return child_env(
        {"FLWR_HOME": str(layout.flwr_home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    )


@dataclass
class SuperLinkProcess:
    """One supervised `flower-superlink` process."""

    config: FederationConfig
    layout: StateLayout
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_file(self) -> Path:
        return self.layout.logs / "superlink.log"

    def command(self) -> list[str]:
        """The `flower-superlink` command line."""
        sl = self.config.superlink
        certs = CertificatePaths.in_dir(sl.certs_dir)
        cmd = [
            executable("flower-superlink"),
            "--host",
            sl.host,
            "--port",
            str(sl.port),
            "--ssl-ca-certfile",
            str(certs.ca_cert),
            "--ssl-certfile",
            str(certs.server_cert),
            "--ssl-keyfile",
            str(certs.server_key),
            "--database",
            str(self.layout.database),
            "--disable-runtime-dependency-installation",
            "--isolation",
            "subprocess",
        ]
        if sl.node_auth:
            cmd.append("--enable-supernode-auth")
        return cmd

    def start(self) -> None:
        """Start the SuperLink and wait until its HTTPS health endpoint answers.

        The SuperLink gets SIGTERM if this process dies; call from the main thread (see `die_with_parent`).

        Raises:
            SuperLinkError: when it exits or does not become healthy in time (the message names its log).
        """
        self.layout.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child, closed with it
        try:
            self.process = subprocess.Popen(
                die_with_parent(self.command()),  # a hard-killed coordinator must not leave its SuperLink running
                stdout=log,
                stderr=subprocess.STDOUT,
                env=flower_env(self.layout),
                cwd=self.layout.root,
            )
        finally:
            log.close()
        self.wait_healthy(self.config.superlink.startup_timeout_s)

    def wait_healthy(self, timeout_s: float) -> None:
        """Block until the SuperLink answers `/health` over TLS.

        Raises:
            SuperLinkError: on exit or timeout.
        """
        certs = CertificatePaths.in_dir(self.config.superlink.certs_dir)
        context = ssl.create_default_context(cafile=str(certs.ca_cert))
        url = f"https://{self.config.superlink.dial_address}/health"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise SuperLinkError(f"the SuperLink exited with code {self.exit_code()}; see {self.log_file}")
            try:
                with urllib.request.urlopen(url, context=context, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError, ssl.SSLError):
                pass
            time.sleep(0.3)
        raise SuperLinkError(f"the SuperLink did not become healthy within {timeout_s:.0f} s; see {self.log_file}")

    def alive(self) -> bool:
        """True while the process runs."""
        return self.process is not None and self.process.poll() is None

    def exit_code(self) -> int | None:
        """The exit status once it has exited."""
        return None if self.process is None else self.process.poll()

    def stop(self) -> None:
        """Stop the SuperLink and everything it started."""
        if self.process is not None:
            terminate_tree(self.process)
            self.process = None


class ControlApi:
    """The SuperLink's Control API (register sites, start/stop runs), called in-process with Flower's own client.

    This is what the `flwr` CLI does, without starting a `flwr` process per call (each costs seconds of imports on
    a small machine). It reads the coordinator's connection from `$FLWR_HOME/config.toml`, so it sets FLWR_HOME for
    this process: create it only in the coordinator's CLI process.
    """

    def __init__(self, layout: StateLayout) -> None:
        self.layout = layout
        self._client: ControlHttpClient | None = None
        self._federation = ""

    def _connect(self) -> ControlHttpClient:
        if self._client is None:
            os.environ.update({k: v for k, v in flower_env(self.layout).items() if k.startswith("FLWR_")})
            connection = read_superlink_connection(CONNECTION)
            self._federation = connection.federation or ""
            with _flower_errors("connecting to the SuperLink's Control API"):
                self._client = init_http_client_from_connection(connection)
        return self._client

    def close(self) -> None:
        """Close the HTTP client."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def register(self, site: str, public_key: Path) -> int | None:
        """Register `site`'s key as a SuperNode named `site`; returns the node id, None if already registered.

        Raises:
            SuperLinkError: for any other failure.
        """
        key = serialization.load_ssh_public_key(public_key.read_bytes())
        request = RegisterNodeRequest(public_key=public_key_to_bytes(key), name=site)  # type: ignore[arg-type]
        try:
            with _flower_errors(f"registering site {site}"):
                return int(self._connect().RegisterNode(request=request).node_id)
        except SuperLinkError as err:
            if "already in use" in str(err):
                return None
            raise

    def unregister(self, node_id: int) -> None:
        """Remove a SuperNode registration (its key can no longer connect)."""
        with _flower_errors(f"unregistering node {node_id}"):
            self._connect().UnregisterNode(request=UnregisterNodeRequest(node_id=node_id))

    def submit(self, app_dir: Path, state_dir: Path) -> int:
        """Build the app bundle of `app_dir` and start a Flower run of it; returns the Flower run id."""
        client = self._connect()
        config, _warnings = load_and_validate(app_dir / "pyproject.toml")
        if config is None:
            raise SuperLinkError(f"{app_dir / 'pyproject.toml'} is not a valid Flower app")
        fab_bytes = build_fab_from_disk(app_dir)
        fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
        request = StartRunRequest(
            fab=fab_to_proto(fab),
            override_config=user_config_to_proto(parse_config_args([f'state-dir="{state_dir}"'])),
            federation=self._federation,
        )
        with _flower_errors("starting the stage-plan run"):
            response = client.StartRun(request)
        if not response.HasField("run_id"):
            raise SuperLinkError("the SuperLink did not start the run")
        return int(response.run_id)

    def stop_run(self, run_id: int) -> bool:
        """Ask the SuperLink to stop a Flower run; False when it was not running."""
        try:
            with _flower_errors(f"stopping run {run_id}"):
                return bool(self._connect().StopRun(request=StopRunRequest(run_id=run_id)).success)
        except SuperLinkError:
            return False

    def run_status(self, run_id: int) -> str:
        """Flower's status of a run, e.g. `running` or `finished:failed` (`unknown` if it is not listed)."""
        with _flower_errors(f"reading the status of run {run_id}"):
            runs = self._connect().ListRuns(ListRunsRequest(run_id=run_id)).run_dict
        run = runs.get(run_id)
        if run is None:
            return "unknown"
        return f"{run.status.status}:{run.status.sub_status}" if run.status.sub_status else run.status.status


@contextlib.contextmanager
def _flower_errors(what: str) -> Iterator[None]:
    """Turn Flower's Control API errors into SuperLinkError naming what was attempted."""
    try:
        with flwr_cli_exc_handler():
            yield
    except click.ClickException as err:
        raise SuperLinkError(f"{what} failed: {err.format_message()}") from None


def write_flower_config(layout: StateLayout, config: FederationConfig) -> Path:
    """`$FLWR_HOME/config.toml` with the coordinator's own TLS connection to its SuperLink."""
    certs = CertificatePaths.in_dir(config.superlink.certs_dir)
    data = {
        "superlink": {
            "default": CONNECTION,
            CONNECTION: {"address": config.superlink.dial_address, "root-certificates": str(certs.ca_cert)},
        }
    }
    path = layout.flwr_home / "config.toml"
    atomic_write(path, tomli_w.dumps(data).encode())
    return path


def write_app_dir(layout: StateLayout, version: str) -> Path:
    """A minimal Flower app folder: only a pyproject.toml naming the installed ServerApp and ClientApp."""
    data = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": APP_NAME,
            "version": version,
            "description": "InvCoSS stage plan (code comes from the installed invcoss package)",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "invcoss",
                    "components": {"serverapp": "server.app:app", "clientapp": "site_client.app:app"},
                    "config": {"state-dir": ""},
                }
            }
        },
    }
    path = layout.app_dir / "pyproject.toml"
    atomic_write(path, tomli_w.dumps(data).encode())
    return layout.app_dir
