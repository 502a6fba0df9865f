"""Fixtures for site unit tests: a site folder with real-format images, keys, a site config."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from invcoss_core.common.signing import PrivateKey, generate_private_key, private_key_openssh
from site_client.config import SiteConfig, load_site_config
from tests.helpers import task_identity
from tests.integration.conftest import generated_site_data


@pytest.fixture(scope="session")
def site_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generated_site_data(tmp_path_factory.mktemp("images"))


@pytest.fixture
def site_key(tmp_path: Path) -> PrivateKey:
    key = generate_private_key()
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "A.key").write_bytes(private_key_openssh(key))
    return key


def write_site_toml(tmp_path: Path, data_dir: Path, **extra: Any) -> Path:
    data: dict[str, Any] = {
        "site": "A",
        "modality": "pathology",
        "data_dir": str(data_dir),
        "work_dir": "work",
        "private_key": "keys/A.key",
        "device": "cpu",
        **extra,
    }
    path = tmp_path / "site.toml"
    path.write_text(tomli_w.dumps(data))
    return path


@pytest.fixture
def site_config(tmp_path: Path, site_images: Path, site_key: PrivateKey) -> SiteConfig:
    return load_site_config(write_site_toml(tmp_path, site_images / "pathology"))


@pytest.fixture(autouse=True)
def flower_task_identity() -> Iterator[None]:
    """Flower builds Messages only inside a task; give unit tests the identity an app process would have."""
    with task_identity():
        yield
