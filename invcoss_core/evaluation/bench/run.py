"""`run_bench`: check the output folder, plan the jobs, run them, write results.json, report.md and figures."""

from __future__ import annotations

import datetime as _dt
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from invcoss_core.artifact import REAL_BUFFER, Artifact, read_artifact_dir
from invcoss_core.common.events import EventSink, discard
from invcoss_core.evaluation.bench.aggregate import aggregate
from invcoss_core.evaluation.bench.plan import plan_jobs
from invcoss_core.evaluation.bench.stages import BenchRun, NotTrainedError
from invcoss_core.evaluation.bench.status import COST_EVAL_PER_MODALITY, BenchError, StatusSink, Tracker, ignore_status
from invcoss_core.evaluation.bench.store import (
    StageRecord,
    check_fingerprint,
    eval_key_of,
    fingerprint,
    jsonable,
    method_fingerprint,
    write_json,
)
from invcoss_core.evaluation.data import BenchData
from invcoss_core.evaluation.settings import METHODS, BenchSettings
from invcoss_core.training import load_student

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"


def run_bench(
    *,
    settings: BenchSettings,
    methods: Sequence[str],
    data: BenchData,
    out_dir: Path,
    seeds: int | None = None,
    device: torch.device | str = "cpu",
    status: StatusSink = ignore_status,
    events: EventSink = discard,
    figures: bool = True,
    shard: tuple[int, int] = (0, 1),
    report_only: bool = False,
) -> dict[str, Any]:
    """Run the comparison and write results.json, report.md and the figures into `out_dir`.

    Args:
        settings: the profile's bench settings (`bench_settings(profile)`).
        methods: names from `METHODS`, run in this order for each seed.
        data: images and probe tasks (`load_bench_data`).
        seeds: seeds of the core methods (None: the profile's); ablations use at most `settings.ablation_seeds`.
        status: receives a BenchStatus on every step (method, seed, stage, phase, time left).
        events: receives the stage loop's and the inversion's ProgressEvents.
        figures: write the PNG figures (matplotlib).
        shard: (i, n) runs only the i-th of n disjoint parts of the plan, so that n processes can share one
            `out_dir` (core methods are split by seed, ablations one by one; the first stages of the seeds a shard
            needs must not be trained by two shards at once). Its outputs cover its own part; a final unsharded
            call reuses everything and writes the complete comparison.
        report_only: train nothing; write the outputs from the stages already in `out_dir` (stored artifacts are
            re-evaluated if the evaluation settings changed). A method/seed with a missing stage is left out and
            logged, so each method reports the seeds it has (e.g. after a run stopped early).
    Returns:
        the results dictionary written to results.json.
    Raises:
        BenchError: for unknown methods or an output folder holding another run.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise BenchError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    data.check(settings.order)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_fingerprint(out / "runs" / "fingerprint.json", fingerprint(settings, data), "a benchmark")
    for method in methods:
        check_fingerprint(
            out / "runs" / method / "fingerprint.json", method_fingerprint(settings, method), f"a {method}"
        )
    started = time.perf_counter()
    per_method_seeds = {m: settings.seeds_for(m, seeds) for m in methods}
    max_seeds = max(per_method_seeds.values())
    jobs = plan_jobs(methods, per_method_seeds, shard)
    run = BenchRun(
        settings,
        data,
        out,
        torch.device(device),
        Tracker(0.0, status),
        events,
        eval_key_of(settings, data),
        train_missing=not report_only,
    )
    total = COST_EVAL_PER_MODALITY * len(settings.order) * max_seeds
    total += sum(run.first_stage_units() for seed in {job[1] for job in jobs if METHODS[job[3]].sequential})
    for _, _, _, method in jobs:
        spec = METHODS[method]
        total += sum(run._stage_units(spec, s) for s in range(len(settings.order) if spec.sequential else 1))
    run.tracker.total = total
    baselines = run.baselines(max_seeds)
    records: dict[str, list[list[StageRecord]]] = {m: [] for m in methods}
    seed_ids: dict[str, list[int]] = {m: [] for m in methods}  # which seed each entry of records[m] is
    shared: dict[int, tuple[Artifact, StageRecord]] = {}
    for _, seed, _, method in jobs:
        spec = METHODS[method]
        try:
            if spec.sequential:
                if seed not in shared:
                    shared[seed] = run.first_stage(seed, max_seeds)
                records[method].append(run.sequential(spec, seed, per_method_seeds[method], shared[seed]))
            else:
                records[method].append(run.joint(spec, seed, per_method_seeds[method]))
        except NotTrainedError as missing:
            logger.warning("%s seed %d left out: %s was not trained (report only)", method, seed, missing.args[0])
            continue
        seed_ids[method].append(seed)
        logger.info("%s seed %d done (%.0f s elapsed)", method, seed, time.perf_counter() - started)
        write_outputs(out, settings, data, records, baselines, time.perf_counter() - started, False, seed_ids)
    return write_outputs(
        out, settings, data, records, baselines, time.perf_counter() - started, figures, seed_ids, device
    )


def write_outputs(
    out: Path,
    settings: BenchSettings,
    data: BenchData,
    records: Mapping[str, Sequence[Sequence[StageRecord]]],
    baselines: Mapping[str, Any],
    wall_seconds: float,
    figures: bool = True,
    seed_ids: Mapping[str, Sequence[int]] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Aggregate what has finished and (re)write results.json, report.md and, optionally, the figures (with the
    replay diagnostics, whose models run on `device`)."""
    from invcoss_core.evaluation.report import render_report

    results: dict[str, Any] = jsonable(aggregate(settings, data, records, baselines, root=out, seed_ids=seed_ids))
    results["wall_seconds"] = wall_seconds
    results["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if figures:
        from invcoss_core.evaluation.plots import write_figures

        results["diagnostics"] = jsonable(method_diagnostics(out, settings, data, records, device))
        results["figures"] = write_figures(results, data, out)
    write_json(out / RESULTS_FILE, results)
    (out / REPORT_FILE).write_text(render_report(results))
    return results


def method_diagnostics(
    out: Path,
    settings: BenchSettings,
    data: BenchData,
    records: Mapping[str, Sequence[Sequence[StageRecord]]],
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, dict[str, float]]]:
    """Replay coverage and feature drift of every sequential method (seed 0) for each earlier modality.

    The models run on `device`: a `base` model's diagnostics are several ViT-B passes over 512 images per earlier
    modality and method — minutes on a CPU (on the H100 machine, run there on its CPU, the report step of a
    two-method run did not end within 77 s).

    Returns:
        method -> modality -> `ReplayDiagnostics` numbers (see `invcoss_core.evaluation.diagnostics`).
    """
    from invcoss_core.evaluation.diagnostics import replay_diagnostics

    result: dict[str, dict[str, dict[str, float]]] = {}
    for name, runs in records.items():
        if not runs or not METHODS[name].sequential:
            continue
        stages = runs[0]
        final = read_artifact_dir(out / stages[-1].artifact)
        student = load_student(final, device)
        pools = dict(final.synthetic) or dict(final.extras.get(REAL_BUFFER.removesuffix(".safetensors"), {}))
        result[name] = {}
        for index, modality in enumerate(settings.order[:-1]):
            reference = load_student(read_artifact_dir(out / stages[index].artifact), device)
            images = data.modalities[modality]
            diag = replay_diagnostics(student, reference, pools.get(modality), images.val, images.train, modality)
            result[name][modality] = diag.to_json()
    return result
