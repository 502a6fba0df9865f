"""`invcoss bench`: the method comparison on real sample images (mounted by the `invcoss` CLI; runs standalone).

python -m invcoss_core.evaluation.cli --profile tiny --methods finetune,invcoss --out /tmp/bench
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from invcoss_core.common.cli_support import console, log_handler
from invcoss_core.common.events import EventSink, ProgressEvent
from invcoss_core.common.progress import plain_progress_lines
from invcoss_core.config import ConfigError
from invcoss_core.data import SampleFetchError, SiteDataError, fetch_samples
from invcoss_core.evaluation.bench import REPORT_FILE, RESULTS_FILE, BenchError, BenchStatus, run_bench
from invcoss_core.evaluation.data import BenchDataError, load_bench_data
from invcoss_core.evaluation.settings import CORE_METHODS, METHODS, bench_settings

_METHOD_LIST = ", ".join(METHODS)
BENCH_HELP = (
    "Compare continual pre-training methods on real images and measure forgetting.\n\n"
    "Each method trains the stages in order (the first stage is trained once per seed and shared), and after "
    "every stage the encoder is evaluated: frozen-encoder kNN and linear probes on every labelled task, and the "
    "held-out masked-reconstruction loss of every modality seen so far. Writes results.json, report.md and PNG "
    "figures into --out. Rerunning with the same --out resumes: finished stages are reused, so a "
    "`--methods finetune` forgetting check can be followed by the full comparison.\n\n"
    + "Methods: "
    + "; ".join(f"{name} — {spec.description}" for name, spec in METHODS.items())
    + "."
)


def _format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "estimating…"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m left" if hours else f"{rest // 60}m{rest % 60:02d}s left"


@contextmanager
def bench_progress(enabled: bool = True) -> Iterator[tuple[Any, EventSink]]:
    """Two bars: the whole benchmark (method, seed, stage, time left) and the running phase's steps.

    Piped (stderr is no terminal), plain lines instead: one per training epoch and finished phase.
    """
    if not enabled:
        yield (lambda _s: None), (lambda _e: None)
        return
    if not console.is_terminal:
        yield (lambda _s: None), plain_progress_lines(console)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    overall: TaskID = progress.add_task("bench", total=1.0, info="")
    phase: TaskID = progress.add_task("", total=1, info="")

    def on_status(status: BenchStatus) -> None:
        stage = f"stage {status.stage}/{status.stages} {status.modality}" if status.stage else status.modality
        progress.update(
            overall,
            completed=status.done,
            total=max(status.total, 1e-9),
            description=f"{status.method} · seed {status.seed + 1}/{status.seeds} · {stage}",
            info=f"{100 * status.done / max(status.total, 1e-9):.0f}% · {_format_seconds(status.seconds_left)}",
        )

    def on_event(event: ProgressEvent) -> None:
        info = " ".join(f"{k}={v:.4g}" for k, v in list(event.metrics.items())[:3])
        progress.update(
            phase,
            completed=event.step,
            total=max(event.total, 1),
            description=f"  {event.phase} {event.modality}",
            info=info,
        )

    with progress:
        yield on_status, on_event


def _methods(value: str | None) -> list[str]:
    if not value:
        return list(METHODS)
    if value == "core":
        return list(CORE_METHODS)
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise typer.BadParameter(f"unknown methods {unknown}; choose from {', '.join(METHODS)} (or 'core')")
    return names


def bench(
    out: Annotated[Path, typer.Option("--out", help="Output folder: results.json, report.md, *.png, runs/.")],
    profile: Annotated[
        str, typer.Option(help="Bench profile: tiny (CI smoke, ~2 min), small (CPU comparison, hours), base (GPU).")
    ] = "tiny",
    methods: Annotated[
        str | None,
        typer.Option(help=f"Comma-separated methods from {_METHOD_LIST} (default: all; 'core': no ablations)."),
    ] = None,
    seeds: Annotated[
        int | None, typer.Option(min=1, help="Seeds of the core methods (default: the profile's).")
    ] = None,
    ablation_seeds: Annotated[
        int | None,
        typer.Option(min=1, help="Seeds of the ablations (default: the profile's; never more than --seeds)."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data", help="Sample-data folder (`invcoss samples fetch`); default: fetch or reuse the cached samples."
        ),
    ] = None,
    order: Annotated[
        str | None,
        typer.Option(
            help="Stage modalities in order, e.g. xray,ct,mri,pathology (default: the profile's ct,mri,pathology)."
        ),
    ] = None,
    stage_steps: Annotated[
        str | None,
        typer.Option(
            help="Optimiser steps of each stage, comma-separated in stage order, e.g. 6000,4500,3000 (default: "
            "the profile's). A changed first stage is a different benchmark: use a new --out."
        ),
    ] = None,
    epochs_per_stage: Annotated[
        int | None,
        typer.Option(min=1, help="Epochs each stage's steps are split into (checkpoints; default: the profile's)."),
    ] = None,
    joint_steps: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Steps of `joint`'s single stage (each: a batch of the first modality and one of another in turn; "
            "default: the profile's).",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for torch (default: torch's).")] = None,
    no_figures: Annotated[bool, typer.Option("--no-figures", help="Skip the PNG figures.")] = False,
    shard: Annotated[
        str,
        typer.Option(
            help="i/n: run only part i of n of the plan (parallel processes on one --out; core methods split by "
            "seed). Finish with one unsharded call to write the complete comparison."
        ),
    ] = "0/1",
    report_only: Annotated[
        bool,
        typer.Option(
            "--report-only",
            help="Train nothing: write results.json, report.md and the figures from the stages already finished in "
            "--out (each method reports the seeds it has; unfinished ones are listed in the log).",
        ),
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars with the time left.")] = True,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "warning",
) -> None:
    """Compare continual pre-training methods on real images and measure forgetting (see BENCH_HELP)."""
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.WARNING),
        handlers=[log_handler()],
        force=True,
    )
    if threads is not None:
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        console.print("[bold red]error:[/] --device cuda was requested but no CUDA device is available")
        raise typer.Exit(2)
    try:
        changes: dict[str, Any] = {}
        if order:
            names = tuple(m.strip() for m in order.split(",") if m.strip())
            base = bench_settings(profile)
            default_steps = dict(zip(base.order, base.stage_steps))
            changes["order"] = names
            changes["stage_steps"] = tuple(default_steps.get(m, base.stage_steps[-1]) for m in names)
        if stage_steps:
            try:
                changes["stage_steps"] = tuple(int(v) for v in stage_steps.split(",") if v.strip())
            except ValueError:
                raise typer.BadParameter(
                    f"--stage-steps {stage_steps!r} must be whole numbers, e.g. 6000,4500,3000"
                ) from None
        if epochs_per_stage is not None:
            changes["epochs_per_stage"] = epochs_per_stage
        if joint_steps is not None:
            changes["joint_steps"] = joint_steps
        if ablation_seeds is not None:
            changes["ablation_seeds"] = ablation_seeds
        settings = bench_settings(profile, **changes)
        try:
            part, parts = (int(v) for v in shard.split("/"))
        except ValueError:
            raise typer.BadParameter(f"--shard {shard!r} must look like i/n, e.g. 0/2") from None
        chosen = _methods(methods)
        root = data if data is not None else fetch_samples(progress=progress)
        config = settings.first_stage_config(0)
        bench_data = load_bench_data(
            root, config, settings.order, settings.data_seed, settings.probe_tasks, settings.probe_max_per_class
        )
        with bench_progress(progress) as (on_status, on_event):
            results = run_bench(
                settings=settings,
                methods=chosen,
                data=bench_data,
                out_dir=out,
                seeds=seeds,
                device=device,
                status=on_status,
                events=on_event,
                figures=not no_figures,
                shard=(part, parts),
                report_only=report_only,
            )
    except (ConfigError, BenchError, BenchDataError, SiteDataError, SampleFetchError) as err:
        console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(2) from None
    console.print(f"wrote {out / RESULTS_FILE} and {out / REPORT_FILE}")
    for name, m in results["methods"].items():
        prev, bwt, rec = m["avg_prev"], m["bwt"], m["recon_prev"]
        console.print(
            f"  {name:16s} avg_prev {'–' if prev is None else format(100 * prev, '5.1f')}  "
            f"BWT {'–' if bwt is None else format(100 * bwt, '+5.1f')}  "
            f"earlier recon {'–' if rec is None else format(rec, '.3f')}"
        )


# Typer takes a command's help from its docstring; the text is assembled from METHODS, so it is set here for both
# the standalone app and the `invcoss bench` mount.
bench.__doc__ = BENCH_HELP

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(bench)

if __name__ == "__main__":
    app()
