"""The offline compose file is docker-compose.yml on host networking: same services, images, commands and volumes."""

from __future__ import annotations

import importlib.util
import ipaddress
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from server.config import load_federation_config
from site_client.config import load_site_config

ROOT = Path(__file__).resolve().parents[2]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("offline_compose", ROOT / "deploy" / "scripts" / "offline-compose.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _merged() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    offline = yaml.safe_load((ROOT / "deploy" / "offline" / "compose.yml").read_text())
    return base, offline, _generator().merge(base, offline)


def test_the_offline_file_keeps_every_service_and_uses_only_host_networking() -> None:
    base, offline, merged = _merged()
    assert "networks" not in merged and set(merged["services"]) == set(base["services"])
    hosts = offline["x-offline"]["hosts"]
    assert len(set(hosts.values())) == len(hosts)
    assert all(ipaddress.ip_address(a) in ipaddress.ip_network("127.0.0.0/8") for a in hosts.values())
    for name, service in merged["services"].items():
        original = base["services"][name]
        assert service["network_mode"] == "host" and "networks" not in service and "ports" not in service
        assert (
            service["image"] == original["image"] and service["build"]["dockerfile"] == original["build"]["dockerfile"]
        )
        assert service["build"]["args"]["BASE_IMAGE"] == "invcoss-base:bookworm"
        if name != "prometheus":  # its command differs only in the listen address
            assert service.get("command") == original.get("command"), name
        targets = {v.split(":")[1] for v in service["volumes"]}
        assert {v.split(":")[1] for v in original.get("volumes", [])} <= targets, name
        assert set(service["extra_hosts"]) == {f"{h}:{a}" for h, a in hosts.items()}


def test_the_offline_configs_differ_from_the_real_ones_only_in_addresses() -> None:
    _base, offline, _merged_doc = _merged()
    hosts = offline["x-offline"]["hosts"]
    real = load_federation_config(ROOT / "deploy" / "config" / "federation.toml")
    local = load_federation_config(ROOT / "deploy" / "offline" / "config" / "federation.toml")
    assert local.superlink.host == hosts["coordinator"] and local.metrics.host == hosts["coordinator"]
    assert local.stages == real.stages and local.profile == real.profile and local.defaults == real.defaults
    ports = set()
    for name in "abc":
        real_site = load_site_config(ROOT / "deploy" / "config" / f"site-{name}.toml")
        site = load_site_config(ROOT / "deploy" / "offline" / "config" / f"site-{name}.toml")
        assert site.metrics.host == hosts[f"site-{name}"] and site.metrics.port == real_site.metrics.port
        assert site.superlink == real_site.superlink and site.modality == real_site.modality
        ports.add(site.supernode.clientappio_port)
    assert len(ports) == 3  # the sites share the host's loopback
    gateway = (ROOT / "deploy" / "offline" / "fleet-gateway.conf").read_text()
    assert f"listen {hosts['fleet-gateway']}:9093 ssl;" in gateway
    assert "include /etc/nginx/invcoss/fleet-rules.conf;" in gateway
    assert (
        "include /etc/nginx/invcoss/fleet-rules.conf;" in (ROOT / "deploy" / "nginx" / "fleet-gateway.conf").read_text()
    )


def test_the_readme_gives_the_compose_commands_that_the_demo_script_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    script = (ROOT / "deploy" / "scripts" / "compose-demo.sh").read_text()
    prefix = "docker compose -p invcoss "
    commands = [line.split("#")[0].strip()[len(prefix) :] for line in readme.splitlines() if line.startswith(prefix)]
    assert commands, "README lost its compose commands"
    for command in commands:
        if command.startswith("logs"):  # for the operator; the script prints logs only when a run fails
            continue
        if command.startswith("exec -T coordinator "):
            assert "in_coordinator " + command.removeprefix("exec -T coordinator ") in script, command
        elif command.startswith("exec -T site-a invcoss-client audit"):
            assert (
                'exec -T "site-$site" invcoss-client audit --site "$upper" --config "/etc/invcoss/site-$site.toml"'
                in script
            )
            assert command.endswith("--site A --config /etc/invcoss/site-a.toml --json"), command
        else:
            assert f"compose {command};" in script or f"compose {command}\n" in script, command
    assert 'compose_bin -p invcoss $files "$@"' in script  # every step goes through that one command line
    assert (
        "-f deploy/offline/compose.generated.yml" in readme
        and "offline_file=deploy/offline/compose.generated.yml" in script
    )
