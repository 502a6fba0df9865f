"""Package boundaries: the method core imports no federation stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import invcoss_core

FORBIDDEN = ("flwr", "grpc", "prometheus_client", "server", "site_client", "invcoss")


def test_invcoss_core_imports_no_flwr_or_grpc() -> None:
    root = Path(invcoss_core.__file__).parent
    modules = sorted(
        "invcoss_core." + ".".join(p.relative_to(root).with_suffix("").parts)
        for p in root.rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "", f"invcoss_core pulled in: {out.stdout.strip()}"
    assert len(modules) >= 10


def test_no_import_statement_names_the_federation_stack() -> None:
    root = Path(invcoss_core.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        for line in path.read_text().splitlines():
            words = line.strip().split()
            if len(words) >= 2 and words[0] in ("import", "from") and words[1].split(".")[0] in FORBIDDEN:
                offenders.append(f"{path.name}: {line.strip()}")
    assert offenders == []
