"""Helpers shared by the integration tests: the venv's console scripts and the `invcoss embed` check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def run_embed(model: Path | str, images: Path, modality: str, out: Path) -> subprocess.CompletedProcess[bytes]:
    """Run `invcoss embed` of a final model on a folder of images (CPU); the caller checks the result."""
    return subprocess.run(
        [
            str(BIN / "invcoss"),
            "embed",
            "--model",
            str(model),
            "--images",
            str(images),
            "--modality",
            modality,
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
        capture_output=True,
        timeout=300,
        check=False,
    )
