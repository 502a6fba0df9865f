"""site.toml validation: paths resolve against the file, typos and policy violations fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from invcoss_core.config import ConfigError
from site_client.config import load_site_config
from tests.site_client.conftest import write_site_toml


def test_site_toml_resolves_relative_paths(tmp_path: Path) -> None:
    cfg = load_site_config(write_site_toml(tmp_path, Path("data")), site="A")
    assert cfg.data_dir == (tmp_path / "data").resolve()
    assert cfg.private_key == (tmp_path / "keys" / "A.key").resolve()
    assert cfg.superlink.root_certificates == (tmp_path / "certs" / "ca.crt").resolve()


def test_site_name_must_match_the_command_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--site says 'B'"):
        load_site_config(write_site_toml(tmp_path, Path("data")), site="B")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"modalty": "ct"}, "unknown key 'modalty'"),
        ({"device": "gpu"}, "device"),
        ({"superlink": {"address": "nohost"}}, "HOST:PORT"),
        ({"stage": {"replay": {"strategy": "real_buffer"}}}, "real_buffer"),
    ],
)
def test_bad_site_settings_name_the_key(tmp_path: Path, extra: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_site_config(write_site_toml(tmp_path, Path("data"), **extra))
