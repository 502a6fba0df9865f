"""`invcoss-server` and `invcoss-client` commands that need no running federation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w
from typer.testing import CliRunner

from server.cli import app as server_app
from site_client.cli import app as client_app

runner = CliRunner()


@pytest.mark.parametrize(("app", "words"), [(server_app, "SuperLink"), (client_app, "SuperNode")])
def test_help_explains_the_command(app, words: str) -> None:  # type: ignore[no-untyped-def]
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and words in result.output


def test_keygen_certs_enroll_status(tmp_path: Path) -> None:
    config = tmp_path / "federation.toml"
    config.write_text(tomli_w.dumps({"stages": [{"site": "A", "modality": "ct"}]}))
    assert runner.invoke(client_app, ["keygen", "--site", "A", "--out", str(tmp_path / "keys")]).exit_code == 0
    again = runner.invoke(client_app, ["keygen", "--site", "A", "--out", str(tmp_path / "keys")])
    assert again.exit_code == 2 and "--force" in again.output
    result = runner.invoke(server_app, ["certs", "--config", str(config), "--san", "coordinator.example"])
    assert result.exit_code == 0 and "coordinator.example" in result.output
    pub = tmp_path / "keys" / "A.pub"
    assert (
        runner.invoke(
            server_app, ["enroll", "--config", str(config), "--site", "A", "--public-key", str(pub)]
        ).exit_code
        == 0
    )
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key")
    result = runner.invoke(server_app, ["enroll", "--config", str(config), "--site", "B", "--public-key", str(bad)])
    assert result.exit_code == 2 and "not an OpenSSH or PEM public key" in result.output
    status = runner.invoke(server_app, ["status", "--config", str(config)])
    assert status.exit_code == 1 and "no run yet" in status.output


def test_status_prints_the_run_state(tmp_path: Path) -> None:
    from server.config import load_federation_config
    from server.state import StateLayout, init_state

    config = tmp_path / "federation.toml"
    config.write_text(tomli_w.dumps({"stages": [{"site": "A"}, {"site": "B"}]}))
    state = init_state(StateLayout(tmp_path / "state"), load_federation_config(config))
    result = runner.invoke(server_app, ["status", "--config", str(config), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["run_id"] == state.run_id


def test_bad_config_names_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "federation.toml"
    config.write_text(tomli_w.dumps({"stages": [{"site": "A"}], "retries": {}}))
    result = runner.invoke(server_app, ["--config", str(config)])
    assert result.exit_code == 2
    assert "federation.toml" in result.output and "retries" in result.output


def test_status_piped_prints_one_tab_separated_line_per_stage(tmp_path: Path) -> None:
    from server.config import load_federation_config
    from server.state import StateLayout, init_state

    config = tmp_path / "federation.toml"
    site = "hospital_" + "with_a_long_site_name_" * 2 + "A" * 10  # 63 characters: the row is over 80 columns
    config.write_text(tomli_w.dumps({"stages": [{"site": site, "modality": "ct"}, {"site": "B"}]}))
    state = init_state(StateLayout(tmp_path / "state"), load_federation_config(config))
    result = runner.invoke(server_app, ["status", "--config", str(config)])  # CliRunner's stdout is no terminal
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"run {state.run_id}: {state.status}"
    assert lines[1].split("\t") == ["stage", "site", "modality", "status", "rounds", "attempts", "seconds", "artifact"]
    assert [line.split("\t")[:3] for line in lines[2:4]] == [["1", site, "ct"], ["2", "B", "-"]]
