"""Site supervision: SuperNode command, crashed-stage detection (zombies count as dead), metrics from events."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from invcoss_core.common.eventlog import EventTailer
from invcoss_core.common.events import ProgressEvent
from server.pki import create_certificates
from site_client.config import SiteConfig
from site_client.metrics import SiteEvents, SiteMetrics
from site_client.supernode import SiteClientError, StageWatch, SuperNodeProcess, supervise


def test_supernode_command_uses_tls_root_key_and_node_config(site_config: SiteConfig) -> None:
    cmd = SuperNodeProcess(site_config, site_config.work_dir.parent / "site.toml").command()
    assert cmd[cmd.index("--root-certificates") + 1] == str(site_config.superlink.root_certificates)
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(site_config.private_key)
    node_config = cmd[cmd.index("--node-config") + 1]
    assert node_config.startswith('site="A" config="') and "--insecure" not in cmd


def test_stage_watch_reports_a_stage_process_that_died_unfinished() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    watch = StageWatch()
    watch.apply({"kind": "stage_started", "pid": child.pid, "stage": 3})
    assert watch.crashed() == []
    child.kill()
    time.sleep(0.2)  # not reaped yet: a zombie must count as dead
    assert watch.crashed() == [3]
    assert watch.crashed() == []
    child.wait()
    finished = StageWatch()
    finished.apply({"kind": "stage_started", "pid": child.pid, "stage": 4})
    finished.apply({"kind": "stage_finished", "pid": child.pid, "stage": 4})
    assert finished.crashed() == []


def test_stage_watch_leaves_stages_of_an_earlier_supervisor_and_abandoned_stages_alone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a dead stage process
    watch = StageWatch(since=1000.0)
    watch.apply({"kind": "stage_started", "pid": child.pid, "stage": 2, "time": 999.0})  # before this supervisor
    assert watch.crashed() == []
    watch.apply({"kind": "stage_started", "pid": child.pid, "stage": 2, "time": 1001.0})
    watch.apply({"kind": "stage_abandoned", "pid": child.pid, "stage": 2, "time": 1002.0})
    assert watch.crashed() == []  # it stopped itself (its supervisor was gone): nothing to restart for
    watch.apply({"kind": "stage_started", "pid": child.pid, "stage": 3, "time": 1003.0})
    assert watch.crashed() == [3]
    metrics = SiteMetrics("A")
    metrics.apply({"kind": "stage_started", "stage": 2})
    metrics.apply({"kind": "stage_abandoned", "stage": 2})
    text = generate_latest(metrics.registry).decode()
    assert "invcoss_site_stage_running 0.0" in text
    assert 'invcoss_site_stages_total{outcome="abandoned"} 1.0' in text


def test_site_events_reach_the_metrics(tmp_path: Path) -> None:
    events = SiteEvents(tmp_path / "events.jsonl", min_interval_s=60)
    metrics = SiteMetrics("A")
    tailer = EventTailer(tmp_path / "events.jsonl", metrics.apply)
    events.emit("stage_started", stage=2)
    events.emit("message_in", bytes=1000)
    events.progress(ProgressEvent("train", "ct", 1, 10, 1, {"loss": 0.9}))
    events.progress(ProgressEvent("train", "ct", 2, 10, 1, {"loss": 0.8}))  # throttled
    events.progress(ProgressEvent("train", "ct", 5, 10, 1, {"epoch_loss": 0.7, "images_per_second": 42.0}))
    events.progress(ProgressEvent("inversion", "ct", 3, 4, None, {}))
    events.emit("gate", checked=8, blocked=1)
    tailer.poll()
    text = generate_latest(metrics.registry).decode()
    for line in (
        "invcoss_site_stage_index 2.0",
        "invcoss_site_stage_running 1.0",
        "invcoss_site_loss 0.7",
        "invcoss_site_images_per_second 42.0",
        "invcoss_site_inversion_progress 0.75",
        "invcoss_site_gate_blocked_total 1.0",
        "invcoss_site_bytes_in_total 1000.0",
        "invcoss_site_epoch 1.0",
    ):
        assert line in text, line
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) == 6
    events.emit("stage_finished", outcome="ok", seconds=12.0, reused=False)
    tailer.poll()
    assert "invcoss_site_stage_running 0.0" in generate_latest(metrics.registry).decode()


def test_a_second_client_of_the_same_site_is_refused_and_the_first_keeps_its_lock(
    tmp_path: Path, site_images: Path, site_key: object
) -> None:
    from typer.testing import CliRunner

    from invcoss_core.common.processes import InstanceLock
    from site_client.cli import app
    from tests.site_client.conftest import write_site_toml

    config = write_site_toml(
        tmp_path,
        site_images / "pathology",
        superlink={"address": "127.0.0.1:9", "root_certificates": "ca.crt"},
        metrics={"enabled": False},
    )
    (tmp_path / "ca.crt").write_text("not read before the lock\n")
    first = InstanceLock(tmp_path / "work" / "client.lock").acquire("an invcoss-client of site A")
    try:
        done = CliRunner().invoke(app, ["--site", "A", "--config", str(config)])
        assert done.exit_code == 3, done.output
        assert "an invcoss-client of site A is already running" in " ".join(done.output.split())
        assert not (tmp_path / "work" / "logs" / "supernode.log").exists()  # no second SuperNode was started
    finally:
        first.release()


def test_a_supernode_port_in_use_is_named_with_its_setting(site_config: SiteConfig, tmp_path: Path) -> None:
    """The real flower-supernode exits at once when its port is taken; the site says which port and which key."""
    ca = create_certificates(tmp_path / "certs").ca_cert  # the SuperNode checks its CA file before anything else
    site_config = site_config.model_copy(
        update={"superlink": site_config.superlink.model_copy(update={"root_certificates": ca})}
    )
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        supernode = site_config.supernode.model_copy(update={"clientappio_port": port, "restart_limit": 0})
        cfg = site_config.model_copy(update={"supernode": supernode})
        said: list[str] = []
        with pytest.raises(SiteClientError) as err:
            supervise(SuperNodeProcess(cfg, cfg.work_dir.parent / "site.toml"), threading.Event(), said.append)
    message = str(err.value)
    assert f"127.0.0.1:{port} is in use" in message and "clientappio_port in " + str(cfg.work_dir.parent) in message
