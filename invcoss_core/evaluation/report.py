"""report.md from results.json: the paper's comparison layout (method × task, averages, forgetting, cost)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from invcoss_core.evaluation.data import LEFT_OUT_NOTE
from invcoss_core.evaluation.metrics import PairedDifference, paired_difference
from invcoss_core.evaluation.probes import PIXEL_FEATURE_DIM


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _pct(mean: Any, sd: Any = None) -> str:
    m = _num(mean)
    if not math.isfinite(m):
        return "–"
    s = _num(sd)
    return f"{100 * m:.1f} ± {100 * s:.1f}" if sd is not None and math.isfinite(s) else f"{100 * m:.1f}"


def _loss(mean: Any, sd: Any = None) -> str:
    m = _num(mean)
    if not math.isfinite(m):
        return "–"
    s = _num(sd)
    return f"{m:.3f} ± {s:.3f}" if sd is not None and math.isfinite(s) else f"{m:.3f}"


def _signed(mean: Any, sd: Any = None, scale: float = 100.0, digits: int = 1) -> str:
    m = _num(mean)
    if not math.isfinite(m):
        return "–"
    s = _num(sd)
    text = f"{scale * m:+.{digits}f}"
    return f"{text} ± {scale * s:.{digits}f}" if sd is not None and math.isfinite(s) else text


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _mb(value: Any) -> str:
    return "–" if value is None else f"{float(value) / 1e6:.2f}"


def _duration(seconds: Any) -> str:
    s = _num(seconds)
    if not math.isfinite(s):
        return "–"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def forgetting_sentence(results: Mapping[str, Any]) -> str:
    """One sentence: was forgetting visible for sequential fine-tuning, with the numbers."""
    check = results.get("forgetting", {})
    if check.get("visible") is None and "recon" not in check:
        return "Forgetting could not be judged: `finetune` was not run."
    parts = [
        f"{m}: {_num(v['own_stage']):.3f} → {_num(v['final']):.3f} (rise {_num(v['rise']):+.3f}, seed spread "
        f"{_loss(v['spread'])})"
        for m, v in check["recon"].items()
    ]
    drop = 100 * _num(check["probe_drop"])
    probe = (
        f"mean linear-probe accuracy on earlier tasks {'fell' if drop > 0 else 'rose'} by {abs(drop):.1f} points "
        f"(BWT {-drop:+.1f}, seed sd {_pct(check['probe_drop_spread'])})"
    )
    if "knn_probe_drop" in check:
        knn = 100 * _num(check["knn_probe_drop"])
        probe += (
            f"; kNN probe: {'fell' if knn > 0 else 'rose'} by {abs(knn):.1f} points (seed sd "
            f"{_pct(check['knn_probe_drop_spread'])}; {'beyond' if check['knn_probe_visible'] else 'within'} twice "
            "the spread)"
        )
    if check["visible"] is None:
        verdict = f"Forgetting cannot be judged against the seed spread with {check['seeds']} seed"
    elif check["visible"]:
        verdict = "Forgetting was visible"
    else:
        verdict = "Forgetting was NOT clearly visible"
    detail = (
        f"earlier-modality held-out reconstruction loss of `finetune` {'; '.join(parts)}; {probe}. "
        f"Criterion: both rises exceed twice the seed spread (reconstruction: {check['recon_visible']}, "
        f"primary (linear) probe: {check['probe_visible']})."
    )
    return f"{verdict}: {detail}"


def _per_seed(entry: Mapping[str, Any], key: str) -> dict[int, float]:
    values = entry.get("per_seed", {}).get(key, [])
    ids = entry.get("seed_ids") or list(range(len(values)))
    return {int(i): _num(v) for i, v in zip(ids, values, strict=False)}


def _paired_text(diff: PairedDifference, margin: float, scale: float, digits: int, unit: str) -> str:
    """'paired over N seeds: d ± sd unit, 95 % CI [lo, hi] → verdict': the goal margin against the interval."""
    if diff.n == 0:
        return "no common seeds to pair"
    text = f"paired over {diff.n} seed{'s' if diff.n != 1 else ''}: {_signed(diff.mean, diff.sd, scale, digits)} {unit}"
    low, high = diff.ci95
    if not (math.isfinite(low) and math.isfinite(high)):
        return text + " (one seed: no interval)"
    text += f", 95 % CI [{scale * low:+.{digits}f}, {scale * high:+.{digits}f}]"
    if low >= margin:
        return text + " → met with 95 % confidence"
    if high < margin:
        return text + " → NOT met with 95 % confidence"
    return text + " → not resolved by these seeds (the goal lies inside the interval)"


def _goal_lines(methods: Mapping[str, Any]) -> list[str]:
    """The issue's goals, each as mean vs mean and as a paired difference over the seeds both methods ran."""
    inv, fine, buf = methods.get("invcoss"), methods.get("finetune"), methods.get("real_buffer")
    if inv is None or fine is None:
        return ["Goals not evaluated: `invcoss` and `finetune` are both needed."]
    lines: list[str] = []
    # (what, per-seed key, other method, margin on invcoss − other, lower is better)
    goals: list[tuple[str, str, str, float, bool]] = [
        ("avg_prev (linear, primary)", "avg_prev", "finetune", 0.03, False),
        ("avg_prev (kNN)", "avg_prev_knn", "finetune", 0.03, False),
        ("earlier-modality reconstruction", "recon_prev", "finetune", 0.0, True),
    ]
    if buf is not None:
        goals += [
            ("avg_prev (linear, primary)", "avg_prev", "real_buffer", -0.01, False),
            ("avg_prev (kNN)", "avg_prev_knn", "real_buffer", -0.01, False),
            ("earlier-modality reconstruction", "recon_prev", "real_buffer", 0.0, True),
        ]
    for what, key, other_name, margin, lower in goals:
        other = methods[other_name]
        a, b = _num(inv.get(key)), _num(other.get(key))
        ours, theirs = _per_seed(inv, key), _per_seed(other, key)
        if lower:  # a loss: the goal is invcoss − other ≤ 0, judged as other − invcoss ≥ 0
            met = a <= b
            goal = f"invcoss as low or lower ({'met' if met else 'NOT met'})"
            detail = _paired_text(paired_difference(theirs, ours), margin, 1.0, 3, "lower for invcoss")
            lines.append(f"- {what}: invcoss {a:.3f} vs {other_name} {b:.3f} → {goal}; {detail}")
        else:
            met = a >= b + margin
            sign = "+" if margin >= 0 else "−"
            points = round(abs(100 * margin))
            unit = "point" if points == 1 else "points"
            goal = f"{'met' if met else 'NOT met'} (goal: ≥ {other_name} {sign} {points} {unit})"
            detail = _paired_text(paired_difference(ours, theirs), margin, 100.0, 1, "points")
            lines.append(f"- {what}: invcoss {100 * a:.1f} vs {other_name} {100 * b:.1f} → {goal}; {detail}")
    return lines


def _margin(acc: Sequence[Sequence[Any]], random_acc: Sequence[Any], own: int, task: int) -> str:
    """Points above the random encoder on `task` after its own stage `own` and after the last stage: "+a → +b"."""
    return " → ".join(_signed(_num(acc[stage][task]) - _num(random_acc[task])) for stage in (own, -1))


def _task_bwt_lines(methods: Mapping[str, Any], earlier: Sequence[str], check: Mapping[str, Any]) -> list[str]:
    """Backward transfer per earlier task and probe (sequential methods), and where finetune's is beyond noise."""
    sequential = {n: m for n, m in methods.items() if m.get("task_bwt")}
    if not sequential or not earlier:
        return []
    out = [
        "",
        "### Backward transfer per earlier task (points; accuracy after the last stage minus after the task's own "
        "stage; linear / kNN, mean ± sd over seeds)",
        "",
    ]
    rows = []
    for name, m in sequential.items():
        cells = [
            f"{_signed(m['task_bwt'].get(t), m['task_bwt_sd'].get(t))} / "
            f"{_signed(m['task_bwt_knn'].get(t), m['task_bwt_knn_sd'].get(t))}"
            for t in earlier
        ]
        rows.append([f"**{name}**", *cells])
    out += _table(["method", *earlier], rows)
    per_task = check.get("tasks") or {}
    if per_task:
        found = [
            f"{task} ({probe}, {_signed(-v['drop'], v['spread'])})"
            for task in earlier
            for probe, v in per_task.get(task, {}).items()
            if v.get("visible")
        ]
        verdict = (
            f"`finetune` loses beyond twice its seed spread on: {', '.join(found)}; every other earlier task and probe "
            "changes within twice the spread of these seeds."
            if found
            else "`finetune` loses beyond twice its seed spread on no earlier task and probe."
        )
        out += ["", verdict]
        every = [
            (task, probe, v) for task in earlier for probe, v in per_task.get(task, {}).items() if _loses_always(v)
        ]
        if every:
            n = int(every[0][2]["of"])
            listed = ", ".join(f"{task} ({probe})" for task, probe, _ in every)
            out += [
                "",
                f"`finetune` loses in every one of its {n} seeds on: {listed} (one-sided sign test p = {0.5**n:.3f} "
                "each).",
            ]
    return out


def _margin_lines(
    methods: Mapping[str, Any],
    tasks: Sequence[str],
    earlier: Sequence[int],
    task_stage: Sequence[int],
    rnd: Mapping[str, Any],
) -> list[str]:
    """Per earlier task: what stage training added over the random encoder, and how much of it the last stage kept.

    A probe can only show forgetting of what training added: on a task where the encoder after the task's own
    stage is no better than a random encoder, a later loss measures noise, not forgotten knowledge.
    """
    sequential = {n: m for n, m in methods.items() if len(m["acc"]) > 1}  # joint has one stage
    if not sequential or not earlier:
        return []
    out = [
        "",
        "### What stage training added over the random encoder, and what the last stage kept",
        "",
        "Points above the random encoder: after the task's own stage → after the last stage (linear / kNN). "
        "Forgetting can only show where the first number is clearly positive; where it is not, training added "
        "nothing this probe can see, and a later change is noise.",
        "",
    ]
    rows = [
        [
            "random encoder (%)",
            *(f"{_pct(rnd['acc'][j])} / {_pct(rnd['acc_knn'][j])}" for j in earlier),
        ]
    ]
    for name, m in sequential.items():
        cells = [" / ".join(_margin(m[key], rnd[key], task_stage[j], j) for key in ("acc", "acc_knn")) for j in earlier]
        rows.append([f"**{name}**", *cells])
    out += _table(["method", *(tasks[j] for j in earlier)], rows)
    return out


def _loses_always(found: Mapping[str, Any]) -> bool:
    """Every seed (two or more) lost on this task and probe; results written before the loss count say nothing."""
    return found.get("of", 0) > 1 and found.get("losses") == found.get("of")


def _diagnostics_lines(diagnostics: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[str]:
    if not diagnostics:
        return []
    lines = [
        "",
        "## Replay diagnostics (seed 0)",
        "",
        "For each earlier modality, with the model after that modality's own stage as reference: `drift real` / "
        "`drift pool` = the distillation objective (masked-encoder-output MSE, final vs reference model) on held-out "
        "real images / on the method's replay pool; `cover` = mean cosine from each held-out real image to its nearest "
        "pool image (reference features), `cover*` = the same to the nearest real training image (what a perfect "
        "stand-in reaches); `self-sim` = mean pairwise cosine inside the pool (lower = more diverse); pixel mean / "
        "per-image sd of the pool vs held-out real images.",
        "",
    ]
    rows = []
    for name, per_modality in diagnostics.items():
        for modality, d in per_modality.items():
            rows.append(
                [
                    name,
                    modality,
                    str(int(d["pool_size"])),
                    _loss(d["drift_real"]),
                    _loss(d["drift_pool"]),
                    _loss(d["coverage"]),
                    _loss(d["coverage_real_train"]),
                    _loss(d["pool_self_similarity"]),
                    f"{_loss(d['pool_mean'])} / {_loss(d['pool_image_sd'])}",
                    f"{_loss(d['real_mean'])} / {_loss(d['real_image_sd'])}",
                ]
            )
    header = [
        "method",
        "modality",
        "pool",
        "drift real",
        "drift pool",
        "cover",
        "cover*",
        "self-sim",
        "pool mean / sd",
        "real mean / sd",
    ]
    return lines + _table(header, rows)


def render_report(results: Mapping[str, Any]) -> str:
    """The Markdown report of a results dictionary (see `invcoss_core.evaluation.bench.aggregate`)."""
    tasks: list[str] = list(results["tasks"])
    order: list[str] = list(results["modalities"])
    task_stage: list[int] = list(results["task_stage"])
    methods: Mapping[str, Any] = results["methods"]
    base = results["baselines"]
    last = len(order) - 1
    earlier_tasks = [j for j, s in enumerate(task_stage) if s < last]
    task_header = [f"{t}{'*' if p else ''}" for t, p in zip(tasks, results.get("task_pseudo", [False] * len(tasks)))]
    out: list[str] = [f"# InvCoSS benchmark — profile `{results['profile']}`", ""]
    seeds = ", ".join(f"{name} {m['seeds']}" for name, m in methods.items())
    out += [
        f"Stages: {' → '.join(order)}. Seeds per method: {seeds}. Data: {results['data']['source']} "
        f"(training samples {results['data']['train_samples']}, held-out {results['data']['val_samples']}). "
        f"Compute {_duration(results.get('compute_seconds'))} (training, replay production and evaluation summed "
        f"over every stored run; a stage resumed after an interruption counts its resumed part only); this call's "
        f"wall time {_duration(results.get('wall_seconds'))}.",
        "",
        "## Forgetting check",
        "",
        forgetting_sentence(results),
        "",
        "## Probe accuracy after the last stage (linear probe, balanced accuracy %, mean ± sd over seeds)",
        "",
        f"Avg: all tasks; Avg prev: tasks of the earlier modalities ({', '.join(tasks[j] for j in earlier_tasks)}); "
        "BWT: backward transfer in points (negative = forgetting). * = pseudo-label task.",
        "",
    ]
    rows = []
    raw, rnd = base["raw_pixels"], base["random_encoder"]
    prev = [j for j in earlier_tasks]

    def _mean_of(values: Sequence[Any], idx: Sequence[int]) -> float:
        finite = [_num(values[j]) for j in idx if math.isfinite(_num(values[j]))]
        return sum(finite) / len(finite) if finite else math.nan

    rows.append(
        [
            "raw pixels",
            *(_pct(v) for v in raw["acc"]),
            _pct(_mean_of(raw["acc"], range(len(tasks)))),
            _pct(_mean_of(raw["acc"], prev)),
            "–",
        ]
    )
    rows.append(
        [
            "random encoder",
            *(_pct(m, s) for m, s in zip(rnd["acc"], rnd["acc_sd"])),
            _pct(_mean_of(rnd["acc"], range(len(tasks)))),
            _pct(_mean_of(rnd["acc"], prev)),
            "–",
        ]
    )
    for name, m in methods.items():
        final, final_sd = m["acc"][-1], m["acc_sd"][-1]
        rows.append(
            [
                f"**{name}**",
                *(_pct(a, s) for a, s in zip(final, final_sd)),
                _pct(m["avg_final"], m["avg_final_sd"]),
                _pct(m["avg_prev"], m["avg_prev_sd"]),
                _signed(m["bwt"], m["bwt_sd"]),
            ]
        )
    out += _table(["method", *task_header, "Avg", "Avg prev", "BWT"], rows)
    out += ["", "### Same, kNN probe (k-nearest neighbours, cosine)", ""]
    rows = [
        ["raw pixels", *(_pct(v) for v in raw["acc_knn"]), _pct(_mean_of(raw["acc_knn"], prev)), "–"],
        ["random encoder", *(_pct(v) for v in rnd["acc_knn"]), _pct(_mean_of(rnd["acc_knn"], prev)), "–"],
    ]
    for name, m in methods.items():
        rows.append(
            [
                f"**{name}**",
                *(_pct(a, s) for a, s in zip(m["acc_knn"][-1], m["acc_knn_sd"][-1])),
                _pct(m["avg_prev_knn"], m["avg_prev_knn_sd"]),
                _signed(m["bwt_knn"], m["bwt_knn_sd"]),
            ]
        )
    out += _table(["method", *task_header, "Avg prev", "BWT"], rows)
    out += _task_bwt_lines(methods, [tasks[j] for j in earlier_tasks], results.get("forgetting", {}))
    out += _margin_lines(methods, tasks, earlier_tasks, task_stage, rnd)
    out += [
        "",
        "## Held-out masked-reconstruction loss (↓) after the last stage",
        "",
        "`recon`: normalised-pixel MSE on the hidden patches of held-out subjects under fixed masks, computed with "
        "the current encoder and the decoder co-trained on that modality in its own stage (the stage re-initialises "
        "the decoder, so this is the modality's SSL loss as pre-trained). `rise`: change from the modality's own "
        "stage to the end (positive = forgotten). `refit`: the same loss with a fresh decoder fitted on the frozen "
        "encoder (information kept; weakly separates trained from random encoders). The untrained model's own loss "
        "is the floor.",
        "",
    ]
    earlier_mods = order[:last]
    has_refit = any(v is not None for v in rnd.get("recon_refit", []))
    header = ["method", *(f"{m} recon" for m in order), *(f"{m} rise" for m in earlier_mods), "prev recon"]
    if has_refit:
        header += [f"{m} refit" for m in order]
    rows = [
        [
            "untrained model",
            *(_loss(v) for v in rnd["recon"]),
            *("–" for _ in earlier_mods),
            _loss(_mean_of(rnd["recon"], range(last))),
        ]
    ]
    if has_refit:
        rows[0] += [_loss(v) for v in rnd["recon_refit"]]
    for name, m in methods.items():
        final, final_sd = m["recon"][-1], m["recon_sd"][-1]
        row = [
            f"**{name}**",
            *(_loss(a, s) for a, s in zip(final, final_sd)),
            *(_signed(m["recon_increase"].get(mod), m["recon_increase_sd"].get(mod), 1.0, 3) for mod in earlier_mods),
            _loss(m["recon_prev"], m["recon_prev_sd"]),
        ]
        if has_refit:
            row += [_loss(a, s) for a, s in zip(m["recon_refit"][-1], m["recon_refit_sd"][-1])]
        rows.append(row)
    out += _table(header, rows)
    out += ["", "## Reconstruction loss after each stage (own-stage decoder, mean ± sd over seeds)", ""]
    rows = []
    for name, m in methods.items():
        for s, stage in enumerate(m["stages"]):
            rows.append([name, stage, *(_loss(v, sd) for v, sd in zip(m["recon"][s], m["recon_sd"][s]))])
    out += _table(["method", "after stage", *order], rows)
    out += ["", "## Probe accuracy after each stage (linear, %)", ""]
    rows = []
    for name, m in methods.items():
        for s, stage in enumerate(m["stages"]):
            rows.append([name, stage, *(_pct(v, sd) for v, sd in zip(m["acc"][s], m["acc_sd"][s]))])
    out += _table(["method", "after stage", *task_header], rows)
    out += [
        "",
        "## Storage and time",
        "",
        "Hand-off: bytes of the last stage's artifact (weights, statistics, synthetic pools or buffer). Real buffer: "
        "what a 5 % real buffer of every stage would hold (float16). Time: training + replay production per run "
        "(first stage included, evaluation excluded), mean ± sd over seeds.",
        "",
    ]
    rows = []
    for name, m in methods.items():
        rows.append(
            [
                name,
                _mb(m["handoff_bytes"]),
                _mb(m["replay_bytes_real"]),
                f"{_duration(m['seconds'])} ± {_duration(m['seconds_sd'])}",
                _duration(m["inversion_seconds"]),
                _duration(m["replay_seconds"]),
            ]
        )
    out += _table(["method", "hand-off MB", "5 % real buffer MB", "time", "inversion", "replay production"], rows)
    out += _diagnostics_lines(results.get("diagnostics", {}))
    out += [
        "",
        "## Goals",
        "",
        "Each goal as mean against mean, and as the difference paired by seed (methods that share a seed share its "
        "first stage and data order) with its 95 % Student-t interval over the seeds both ran: a goal inside the "
        "interval is not resolved by these seeds.",
        "",
        *_goal_lines(methods),
        "",
    ]
    out += ["## Notes", ""]
    folds = results.get("task_folds") or [1] * len(tasks)
    for t, note, n_test, pseudo, k in zip(
        tasks, results.get("task_split", []), results.get("task_test_size", []), results.get("task_pseudo", []), folds
    ):
        scored = f"scored as the mean over {k} folds" if k > 1 else "scored on the primary split only"
        out.append(
            f"- `{t}`: {note}; {n_test} test samples in the primary split; {scored}"
            f"{' (pseudo-labels, not a diagnosis)' if pseudo else ''}."
        )
    for note in results.get("data", {}).get("notes", []):
        if note.startswith(LEFT_OUT_NOTE):
            out.append(f"- Left out of the probes: {note.removeprefix(LEFT_OUT_NOTE)}.")
    out.append(
        "- Probe accuracies are balanced accuracies (mean per-class recall); the probe splits and held-out "
        "subjects are fixed across seeds, so the sd reflects training only."
    )
    pooling = results.get("settings", {}).get("probes", {}).get("features", "mean")
    out.append(
        "- Encoder features for the probes: the mean of all patch tokens"
        + (
            ", followed by the mean of the tokens of the patches at the input's centre (the CT and MRI tasks are "
            "labelled by the centre voxel)."
            if pooling == "mean_centre"
            else "."
        )
        + f" Raw pixels: the input, average-pooled to at most {PIXEL_FEATURE_DIM} values."
    )
    figures = results.get("figures", [])
    if figures:
        out += ["", "## Figures", ""]
        out += [f"![{name}]({name})" for name in figures]
    return "\n".join(out) + "\n"
