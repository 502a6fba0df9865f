"""The docker-compose federation, built and run for real: three stages, verified artifacts, audits, gateway, metrics.

Runs the README's compose commands through deploy/scripts/compose-demo.sh (build, up, wait, report, clean) on
the offline path unless INVCOSS_COMPOSE_OFFLINE says otherwise: a debootstrapped base image, wheels from this
machine's pip configuration, host networking with every service on its own 127.0.28.x loopback address (no
bridge network, dockerd with --bridge=none --iptables=false). Installs Docker, docker-compose, debootstrap and
promtool from Debian when they are absent (needs root), starts dockerd when none runs and stops what it started.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from server.handoff import load_checkpoint_artifact
from server.state import StateLayout, load_state

pytestmark = pytest.mark.compose

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "scripts" / "compose-demo.sh"
OFFLINE_FILE = ROOT / "deploy" / "offline" / "compose.generated.yml"
DEBIAN_PACKAGES = {"dockerd": "docker.io", "docker-compose": "docker-compose", "debootstrap": "debootstrap"}
PROMTOOL_PACKAGE = "prometheus"
# the offline stack's addresses (deploy/offline/compose.yml) and the metrics ports of its configs
GATEWAY = ("127.0.28.11", 9093)
COORDINATOR = ("127.0.28.10", 9093)
PROMETHEUS = "http://127.0.28.30:9090"
METRICS = {
    "coordinator:9400": "127.0.28.10:9400",
    **{f"site-{s}:9401": f"127.0.28.2{i}:9401" for i, s in enumerate("abc", start=1)},
}
BUILD_TIMEOUT_S = 2400
RUN_TIMEOUT_S = 2400


@dataclass
class Stack:
    """The running stack: how to call compose and where the test keeps what it copied out."""

    env: dict[str, str]
    out: Path
    offline: bool

    def script(self, step: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """Run one step of compose-demo.sh (the README's commands); its output is kept for the failure message."""
        return subprocess.run(
            [str(SCRIPT), step], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        files = ["-f", str(OFFLINE_FILE)] if self.offline else []
        binary = ["docker", "compose"] if _has_compose_plugin() else ["docker-compose"]
        return subprocess.run(
            [*binary, "-p", "invcoss", *files, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def _has_compose_plugin() -> bool:
    done = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False, timeout=30)
    return done.returncode == 0


def _install_from_debian(packages: list[str]) -> None:
    if not packages:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(f"the compose test needs {', '.join(packages)} (Debian packages); install them or run as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    if subprocess.run(command, env=env, capture_output=True, timeout=900, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600, check=False)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
        assert done.returncode == 0, f"apt-get install {' '.join(packages)} failed: {done.stderr[-2000:]}"


def _docker_ready() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60, check=False).returncode == 0


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A Docker engine: the one running, or one this test starts without a bridge or iptables rules (and stops)."""
    missing = [pkg for tool, pkg in DEBIAN_PACKAGES.items() if shutil.which(tool) is None]
    if shutil.which("promtool") is None:
        missing.append(PROMTOOL_PACKAGE)
    _install_from_debian(missing)
    if _docker_ready():
        yield
        return
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with open(log, "wb") as fh:
        process = subprocess.Popen(
            ["dockerd", "--bridge=none", "--iptables=false", "--ip6tables=false"], stdout=fh, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while not _docker_ready():
            assert process.poll() is None, f"dockerd exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"dockerd not ready in 60 s: {log.read_text()[-2000:]}"
            time.sleep(1)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def stack(dockerd: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Build, start with fresh volumes and run the plan to its end; always torn down (volumes removed)."""
    out = tmp_path_factory.mktemp("compose-out")
    offline = os.environ.get("INVCOSS_COMPOSE_OFFLINE", "1") != "0"
    venv_bin = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"
    env = {
        **os.environ,
        "INVCOSS_COMPOSE_OFFLINE": "1" if offline else "0",
        "INVCOSS_COMPOSE_TIMEOUT": str(RUN_TIMEOUT_S),
        "COMPOSE_OUT": str(out),
        "PYTHON": str(venv_bin / "python"),
        "INVCOSS": str(venv_bin / "invcoss"),
    }
    stack = Stack(env=env, out=out, offline=offline)
    build = stack.script("build", timeout=BUILD_TIMEOUT_S)
    assert build.returncode == 0, f"build failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
    stack.script("clean", timeout=300)
    try:
        up = stack.script("up", timeout=900)
        assert up.returncode == 0, f"up failed:\n{up.stderr[-3000:]}"
        wait = stack.script("wait", timeout=RUN_TIMEOUT_S + 120)
        logs = "" if wait.returncode == 0 else stack.compose("logs", "--tail", "60").stdout[-8000:]
        assert wait.returncode == 0, f"the run did not finish:\n{wait.stdout}\n{wait.stderr[-2000:]}\n{logs}"
        yield stack
    finally:
        stack.script("clean", timeout=600)


def _status(stack: Stack) -> dict[str, Any]:
    done = stack.compose(
        "exec", "-T", "coordinator", "invcoss-server", "status", "--config", "/etc/invcoss/federation.toml", "--json"
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_three_stages_are_done_and_their_artifacts_verify(stack: Stack, tmp_path: Path) -> None:
    status = _status(stack)
    assert status["status"] == "done"
    assert [(s["site"], s["modality"], s["status"]) for s in status["stages"]] == [
        ("A", "ct", "done"),
        ("B", "mri", "done"),
        ("C", "pathology", "done"),
    ]
    coordinator = stack.compose("ps", "-q", "coordinator").stdout.strip()
    copy = subprocess.run(
        ["docker", "cp", f"{coordinator}:/var/lib/invcoss/state", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert copy.returncode == 0, copy.stderr
    layout = StateLayout(tmp_path / "state")
    state = load_state(layout)
    assert state is not None and state.status == "done"
    parent = None
    for record in state.stages:  # each checkpoint re-verified here: signature, hashes, the parent chain
        artifact, _files = load_checkpoint_artifact(layout, record.index, record.site, record.artifact_sha256)
        assert artifact.manifest.stage_index == record.index and artifact.manifest.parent_sha256 == parent
        parent = artifact.sha256
    final = json.loads((layout.final / "model" / "manifest.json").read_text())
    assert final["modalities"] == ["ct", "mri", "pathology"]
    assert (tmp_path / "state" / "report.json").is_file()


def test_the_sites_audits_find_no_real_image_tensor_out(stack: Stack) -> None:
    report = stack.script("report", timeout=900)
    assert report.returncode == 0, f"{report.stdout[-3000:]}\n{report.stderr[-3000:]}"
    for site in "ABC":
        audit = json.loads((stack.out / f"audit-{site}.json").read_text())
        assert audit["site"] == site and audit["outbound_messages"] > 0 and audit["real_samples"] > 0
        assert audit["real_image_tensors_out"] == 0
    assert "audit: no real image tensor left any site" in report.stdout
    assert (stack.out / "final" / "model" / "manifest.json").is_file() and (stack.out / "report.json").is_file()


def _https(address: tuple[str, int], path: str, ca: Path) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False  # the chain is verified; the test dials an IP that is not among the SANs
    connection = http.client.HTTPSConnection(*address, context=context, timeout=30)
    try:
        connection.request("POST", path, body=b"", headers={"Content-Type": "application/protobuf"})
        return connection.getresponse().status
    finally:
        connection.close()


def test_the_gateway_forwards_only_the_fleet_api(stack: Stack, tmp_path: Path) -> None:
    coordinator = stack.compose("ps", "-q", "coordinator").stdout.strip()
    ca = tmp_path / "ca.crt"
    subprocess.run(["docker", "cp", f"{coordinator}:/certs/ca.crt", str(ca)], check=True, timeout=120)
    for path in ("/v1/fleet/get-run", "/v1/fleet/pull-messages"):
        direct, through = _https(COORDINATOR, path, ca), _https(GATEWAY, path, ca)
        assert through == direct and through != 403, (path, direct, through)  # the SuperLink's own answer
    for path in ("/v1/control/list-runs", "/v1/control/start-run", "/v1/runtime/create-task", "/health"):
        direct = _https(COORDINATOR, path, ca)
        assert direct not in (403, 404), (path, direct)  # the SuperLink serves it ...
        assert _https(GATEWAY, path, ca) == 403, path  # ... and the gateway refuses it


def _prometheus(query: str) -> list[dict[str, Any]]:
    url = f"{PROMETHEUS}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    with urllib.request.urlopen(url, timeout=30) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def test_prometheus_scrapes_the_coordinator_and_every_site(stack: Stack) -> None:
    deadline = time.monotonic() + 60  # one scrape interval (15 s) after the targets came up at the latest
    while True:
        up = {r["metric"]["instance"]: r["value"][1] for r in _prometheus("up")}
        if (set(up) == set(METRICS) and all(v == "1" for v in up.values())) or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert up == dict.fromkeys(METRICS, "1")
    stages = _prometheus('invcoss_coordinator_stages_done{instance="coordinator:9400"}')
    assert [r["value"][1] for r in stages] == ["3"]
    for site in "abc":
        series = _prometheus(f'invcoss_site_stages_total{{instance="site-{site}:9401",outcome="ok"}}')
        assert [r["value"][1] for r in series] == ["1"], site


def test_promtool_accepts_every_metrics_endpoint(stack: Stack) -> None:
    for target, address in METRICS.items():
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as response:
            text = response.read()
        assert b"invcoss_" in text, target
        check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
        assert check.returncode == 0, f"{target}: {check.stdout.decode()} {check.stderr.decode()}"
