"""Coordinator process pieces: readiness checks, site registration, the SuperLink command and app folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomllib

from server.coordinator import CoordinatorError, check_ready, register_sites
from server.pki import create_certificates
from server.state import StateLayout
from server.superlink import SuperLinkProcess, write_app_dir, write_flower_config
from tests.server.conftest import federation_config


class FakeControl:
    def __init__(self) -> None:
        self.registered: list[str] = []
        self.unregistered: list[int] = []

    def register(self, site: str, public_key: Path) -> int | None:
        self.registered.append(site)
        return 100 + len(self.registered)

    def unregister(self, node_id: int) -> None:
        self.unregistered.append(node_id)


def test_start_is_refused_without_certificates_or_enrollment(tmp_path: Path, enrolled: StateLayout) -> None:
    config = federation_config(tmp_path, stages=3)
    with pytest.raises(CoordinatorError, match="invcoss-server certs"):
        check_ready(config, enrolled)
    create_certificates(config.superlink.certs_dir)
    check_ready(config, enrolled)
    enrolled.enrolled_key("C").unlink()
    with pytest.raises(CoordinatorError, match="sites C of the plan are not enrolled"):
        check_ready(config, enrolled)


def test_registration_is_idempotent_and_rekeying_replaces_the_old_node(enrolled: StateLayout, keys) -> None:
    from invcoss_core.common.signing import generate_private_key, public_key_openssh
    from server.handoff import enroll_key

    enrolled.database.parent.mkdir(parents=True, exist_ok=True)
    enrolled.database.write_bytes(b"")
    flwr = FakeControl()
    first = register_sites(flwr, enrolled)  # type: ignore[arg-type]
    assert sorted(flwr.registered) == ["A", "B", "C"]
    register_sites(flwr, enrolled)  # type: ignore[arg-type]
    assert len(flwr.registered) == 3  # nothing new to register
    enroll_key(enrolled, "B", public_key_openssh(generate_private_key()), "B2.pub")
    register_sites(flwr, enrolled)  # type: ignore[arg-type]
    assert flwr.unregistered == [first["B"]["node_id"]]
    assert flwr.registered.count("B") == 2
    assert json.loads(enrolled.registered.read_text())["B"]["node_id"] != first["B"]["node_id"]


def test_superlink_runs_with_tls_auth_durable_state_and_no_dependency_installation(
    tmp_path: Path, enrolled: StateLayout
) -> None:
    config = federation_config(tmp_path)
    cmd = SuperLinkProcess(config, enrolled).command()
    for flag in ("--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation"):  # fmt: skip
        assert flag in cmd
    assert "--insecure" not in cmd
    assert cmd[cmd.index("--database") + 1] == str(enrolled.database)


def test_app_folder_holds_only_a_pyproject_naming_the_installed_apps(tmp_path: Path, enrolled: StateLayout) -> None:
    app = write_app_dir(enrolled, "1.2.3")
    assert [p.name for p in app.iterdir()] == ["pyproject.toml"]
    meta = tomllib.loads((app / "pyproject.toml").read_text())
    assert meta["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "server.app:app",
        "clientapp": "site_client.app:app",
    }
    assert meta["project"]["dependencies"] == []
    flwr_config = tomllib.loads(write_flower_config(enrolled, federation_config(tmp_path)).read_text())
    connection = flwr_config["superlink"]["invcoss"]
    assert connection["address"] == "127.0.0.1:9093" and connection["root-certificates"].endswith("ca.crt")
    assert enrolled.flwr_home != app and app not in enrolled.flwr_home.parents


def test_a_second_coordinator_on_the_same_state_folder_is_refused(tmp_path: Path) -> None:
    from invcoss_core.common.processes import InstanceLock
    from server.coordinator import Coordinator

    config = federation_config(tmp_path, stages=3)
    said: list[str] = []
    first = InstanceLock(config.state_dir / "coordinator.lock").acquire("an invcoss-server")
    try:
        with pytest.raises(CoordinatorError, match=r"an invcoss-server is already running on .*state"):
            Coordinator(config, say=said.append).serve()
        assert not (config.state_dir / "run.json").exists()  # nothing was prepared, no SuperLink started
    finally:
        first.release()
