"""The compose test runs only when selected (`pytest -m compose`, `make test-compose`): it builds images for minutes."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `compose`-marked tests unless the marker expression names them."""
    if "compose" in (config.getoption("markexpr") or "") and "not compose" not in config.getoption("markexpr"):
        return
    skip = pytest.mark.skip(reason="the compose federation runs with `pytest -m compose` (make test-compose)")
    for item in items:
        if "compose" in item.keywords:
            item.add_marker(skip)
