"""Package boundaries: server and site_client never import each other; Flower types stay in few modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Flower is used by: each side's codec (messages and records), each side's app (the ServerApp / ClientApp
# objects) and the coordinator's SuperLink driver (its Control API client: register sites, start runs).
FLOWER_MODULES = {
    "server/codec.py",
    "server/app.py",
    "server/superlink.py",
    "site_client/codec.py",
    "site_client/app.py",
}
RECORD_TYPES = {"Array", "ArrayRecord", "ConfigRecord", "MetricRecord", "RecordDict"}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
    return found


@pytest.mark.parametrize(("package", "other"), [("server", "site_client"), ("site_client", "server")])
def test_sides_never_import_each_other(package: str, other: str) -> None:
    for path in sorted((ROOT / package).glob("*.py")):
        modules = [m for m, _ in _imports(path)]
        assert not any(m == other or m.startswith(other + ".") for m in modules), path


@pytest.mark.parametrize("package", ["server", "site_client"])
def test_neither_side_imports_the_command_package(package: str) -> None:
    """`invcoss` (the command and the demo) sits above both sides; they never depend on it."""
    for path in sorted((ROOT / package).glob("*.py")):
        modules = [m for m, _ in _imports(path)]
        assert not any(m == "invcoss" or m.startswith("invcoss.") for m in modules), path


def test_importing_the_command_module_registers_nothing() -> None:
    import invcoss.cli
    from invcoss_core.cli import app as core_app

    before = len(core_app.registered_commands)
    app = invcoss.cli.build_app()
    assert "demo" in {c.name for c in app.registered_commands}
    assert len(core_app.registered_commands) == before  # the method's own app is left as it was
    assert "demo" not in {c.name for c in core_app.registered_commands}


def test_flower_stays_in_the_codec_app_and_superlink_modules() -> None:
    for package in ("server", "site_client"):
        for path in sorted((ROOT / package).glob("*.py")):
            rel = str(path.relative_to(ROOT))
            for module, names in _imports(path):
                if module.split(".")[0] != "flwr":
                    continue
                assert rel in FLOWER_MODULES, f"{rel} imports {module}"
                if RECORD_TYPES & set(names):
                    assert rel.endswith("codec.py"), f"{rel} builds Flower records; only the codec may"
