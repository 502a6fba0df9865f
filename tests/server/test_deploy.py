"""Deployment files: docker-compose.yml validates, example TOMLs load, only the Fleet API is exposed to sites."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from server.config import load_federation_config
from site_client.config import load_site_config

ROOT = Path(__file__).resolve().parents[2]


def test_docker_compose_config_validates() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        if os.environ.get("INVCOSS_REQUIRE_COMPOSE") == "1":
            pytest.fail("docker-compose is required here (INVCOSS_REQUIRE_COMPOSE=1) but not installed")
        pytest.skip("docker-compose not installed (Debian: apt-get install docker-compose)")
    done = subprocess.run([binary, "config", "-q"], cwd=ROOT, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()


def test_sites_reach_the_superlink_only_through_the_fleet_gateway() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert compose["networks"]["control"]["internal"] is True
    assert "ports" not in services["coordinator"]
    assert services["coordinator"]["networks"] == ["control"]
    for site in ("site-a", "site-b", "site-c"):
        assert services[site]["networks"] == ["fleet"]
    assert set(services["fleet-gateway"]["networks"]) == {"control", "fleet"}
    gateway = (ROOT / "deploy" / "nginx" / "fleet-rules.conf").read_text()  # included by fleet-gateway.conf
    assert "location /v1/fleet/" in gateway and "return 403" in gateway and "proxy_ssl_verify on" in gateway
    assert len({s["volumes"][2] for s in (services["site-a"], services["site-b"], services["site-c"])}) == 3


def test_example_tomls_load() -> None:
    config = load_federation_config(ROOT / "deploy" / "config" / "federation.toml")
    assert [s.site for s in config.stages] == ["A", "B", "C"]
    assert config.superlink.node_auth and config.stage_config(1).replay.strategy == "inversion"
    for name, site in (("a", "A"), ("b", "B"), ("c", "C")):
        cfg = load_site_config(ROOT / "deploy" / "config" / f"site-{name}.toml", site=site)
        assert cfg.superlink.address == "fleet-gateway:9093"
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert set(targets) == {"coordinator:9400", "site-a:9401", "site-b:9401", "site-c:9401"}
