"""The benchmark end to end: output schema, resumption, first-stage reuse and the joint reference."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from invcoss_core.data import TensorImages
from invcoss_core.evaluation.bench import BenchError, finish_stage, run_bench
from invcoss_core.evaluation.joint import JointReplay
from invcoss_core.evaluation.probes import ProbeSettings
from invcoss_core.evaluation.recon import ReconSettings
from invcoss_core.evaluation.settings import METHODS, BenchSettings, bench_settings
from invcoss_core.replay import ReplayContext, replay_class
from invcoss_core.training import run_stage
from tests.helpers import make_config, structured_images
from tests.invcoss_core.evaluation.conftest import synthetic_bench_data

FIGURES = ("accuracy_by_stage.png", "recon_by_stage.png", "forgetting.png")


def _is_number_or_null(value: Any) -> bool:
    return value is None or isinstance(value, (int, float))


def check_results_schema(results: dict[str, Any], methods: list[str], out: Path) -> None:
    """What results.json promises (see the issue): the fields, their shapes and types."""
    tasks, order = results["tasks"], results["modalities"]
    assert results["task_stage"] == [order.index(m) for m in results["task_modality"]]
    assert set(results["methods"]) == set(methods)
    for name, m in results["methods"].items():
        rows = len(order) if METHODS[name].sequential else 1
        for key in ("acc", "acc_sd", "acc_knn", "acc_knn_sd"):
            assert len(m[key]) == rows and all(len(r) == len(tasks) for r in m[key]), (name, key)
            assert all(_is_number_or_null(v) for r in m[key] for v in r)
        for key in ("recon", "recon_sd", "recon_refit"):
            assert len(m[key]) == rows and all(len(r) == len(order) for r in m[key]), (name, key)
        for key in ("avg_prev", "seconds", "inversion_seconds"):
            assert isinstance(m[key], float), (name, key)
        assert _is_number_or_null(m["bwt"])
        assert m["seed_ids"] == sorted(set(m["seed_ids"])) and len(m["seed_ids"]) == m["seeds"], name
        if METHODS[name].sequential:
            earlier = {t for t, s in zip(tasks, results["task_stage"]) if s < len(order) - 1}
            assert set(m["task_bwt"]) == set(m["task_bwt_knn"]) == earlier, name
            for key in ("task_bwt", "task_bwt_knn"):
                losses = m[f"{key}_losses"]
                assert set(losses) == earlier and all(0 <= v <= m["seeds"] for v in losses.values()), name
                if m["seeds"] == 1:
                    assert losses == {t: int(m[key][t] < 0) for t in earlier}, name
        assert (m["bwt"] is None) == (not METHODS[name].sequential)
        assert isinstance(m["handoff_bytes"], int) and m["handoff_bytes"] > 0
        assert isinstance(m["replay_bytes_real"], int) and m["replay_bytes_real"] > 0
        assert not Path(m["final_model"]).is_absolute()
        assert (out / m["final_model"] / "manifest.json").is_file()
        final = m["recon"][-1]
        assert all(v is not None and math.isfinite(v) for v in final), f"{name}: every modality measured at the end"
        if METHODS[name].sequential:
            assert m["recon"][0][1] is None, "a modality is not measured before its stage"
    assert len(results["baselines"]["raw_pixels"]["acc"]) == len(tasks)


def _check_outputs(out: Path, methods: list[str]) -> dict[str, Any]:
    results = json.loads((out / "results.json").read_text())
    check_results_schema(results, methods, out)
    report = (out / "report.md").read_text()
    assert "| method |" in report and "Forgetting" in report
    assert "tokens of the patches at the input's centre" in report, "the report says which features were probed"
    for name in methods:
        assert f"**{name}**" in report
    for figure in FIGURES:
        assert (out / figure).stat().st_size > 1000
    return results


def test_tiny_bench_on_sample_data_writes_all_outputs(sample_data: Path, tmp_path: Path) -> None:
    """The CI smoke run, through the real command line, on the real sample images."""
    invcoss = Path(sys.executable).parent / "invcoss"
    command = [str(invcoss), "bench", "--profile", "tiny", "--methods", "finetune,invcoss"]
    command += ["--data", str(sample_data), "--out", str(tmp_path), "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "report.md" in done.stdout + done.stderr, "the command says where its outputs are"
    methods = ["finetune", "invcoss"]
    results = _check_outputs(tmp_path, methods)
    assert results["methods"]["invcoss"]["inversion_seconds"] > 0
    assert (tmp_path / "images_ct.png").is_file()


def _fast_settings(**changes: Any) -> BenchSettings:
    return bench_settings(
        "tiny",
        **{
            "stage_steps": (4, 3, 3),
            "joint_steps": 4,
            "probes": ProbeSettings(knn_k=3, linear_steps=5),
            "recon": ReconSettings(max_train=16, max_test=8, masks_per_image=1, decoder_steps=3, decoder_batch=8),
            **changes,
        },
    )


def test_bench_schema_for_the_other_baselines_and_resume(tmp_path: Path) -> None:
    settings = _fast_settings()
    data = synthetic_bench_data(settings.first_stage_config(0))
    methods = ["joint", "real_buffer", "ewc"]
    run_bench(settings=settings, methods=methods, data=data, out_dir=tmp_path, seeds=2)
    results = _check_outputs(tmp_path, methods)
    assert results["methods"]["ewc"]["seeds"] == 2
    stage2 = tmp_path / "runs" / "ewc" / "seed0" / "stage2" / "manifest.json"
    stamp = stage2.stat().st_mtime_ns
    again = run_bench(settings=settings, methods=["ewc"], data=data, out_dir=tmp_path, seeds=2, figures=False)
    assert stage2.stat().st_mtime_ns == stamp, "a finished stage is reused, not trained again"
    assert again["methods"]["ewc"]["acc"] == results["methods"]["ewc"]["acc"]


def test_an_x_ray_stage_first_gives_four_stages_and_counts_x_ray_as_an_earlier_modality(tmp_path: Path) -> None:
    """The issue's optional order (X-ray, CT, MRI, pathology): every matrix grows a row and a column."""
    order = ("xray", "ct", "mri", "pathology")
    settings = _fast_settings(order=order, stage_steps=(4, 3, 3, 3))
    data = synthetic_bench_data(settings.first_stage_config(0), order)
    methods = ["finetune", "invcoss", "joint"]
    results = run_bench(settings=settings, methods=methods, data=data, out_dir=tmp_path, figures=False)
    check_results_schema(results, methods, tmp_path)
    assert results["modalities"] == list(order)
    assert results["task_stage"] == [0, 1, 2, 3]
    assert set(results["methods"]["finetune"]["task_bwt"]) == {"xray_texture", "ct_texture", "mri_texture"}
    assert len(results["methods"]["invcoss"]["recon"]) == 4
    runs = tmp_path / "runs"
    seed0 = runs / "invcoss" / "seed0"
    for stage, modality in enumerate(order, start=1):
        assert json.loads((seed0 / f"stage{stage}.json").read_text())["modality"] == modality
        assert json.loads((seed0 / f"stage{stage}" / "manifest.json").read_text())["site"] == modality
    assert json.loads((runs / "joint" / "seed0" / "stage1.json").read_text())["modality"] == "+".join(order)


def test_report_only_trains_nothing_and_reports_the_seeds_each_method_has(tmp_path: Path) -> None:
    settings = _fast_settings()
    data = synthetic_bench_data(settings.first_stage_config(0))
    run_bench(settings=settings, methods=["finetune"], data=data, out_dir=tmp_path, seeds=1, figures=False)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "runs").rglob("manifest.json"))
    report = run_bench(
        settings=settings, methods=["finetune", "ewc"], data=data, out_dir=tmp_path, seeds=2, report_only=True
    )
    after = sorted(p.relative_to(tmp_path) for p in (tmp_path / "runs").rglob("manifest.json"))
    assert after == before, "report only must not train a stage"
    assert report["methods"]["finetune"]["seeds"] == 1 and report["methods"]["finetune"]["seed_ids"] == [0]
    assert "ewc" not in report["methods"], "a method with no finished seed is left out, not invented"
    assert "**finetune**" in (tmp_path / "report.md").read_text()
    # A probe task the data loader left out (images too small for the inputs) is named in the report's notes.
    note = "probe task left out: probe task 'mri_tissue': no patch of size (48, 48, 48) lies on the test side"
    noted = dataclasses.replace(data, notes=[*data.notes, note])
    run_bench(settings=settings, methods=["finetune"], data=noted, out_dir=tmp_path, seeds=1, report_only=True)
    assert "- Left out of the probes: probe task 'mri_tissue': no patch" in (tmp_path / "report.md").read_text()


def test_changed_evaluation_settings_or_probe_tasks_re_evaluate_without_training(tmp_path: Path) -> None:
    settings = _fast_settings()
    data = synthetic_bench_data(settings.first_stage_config(0))
    run_bench(settings=settings, methods=["finetune"], data=data, out_dir=tmp_path, figures=False)
    manifests = sorted((tmp_path / "runs").rglob("manifest.json"))
    stamps = [p.stat().st_mtime_ns for p in manifests]
    record = tmp_path / "runs" / "finetune" / "seed0" / "stage2.json"
    key = json.loads(record.read_text())["eval_key"]
    other_probes = _fast_settings(probes=ProbeSettings(knn_k=3, linear_steps=5, folds=2))
    run_bench(settings=other_probes, methods=["finetune"], data=data, out_dir=tmp_path, figures=False)
    assert json.loads(record.read_text())["eval_key"] != key, "the stored evaluation is stale and redone"
    # Probe tasks are evaluation only as well: another task set must not ask for a new output folder.
    fewer = type(data)(data.modalities, data.tasks[:1], source=data.source)
    run_bench(settings=other_probes, methods=["finetune"], data=fewer, out_dir=tmp_path, figures=False)
    assert [p.stat().st_mtime_ns for p in manifests] == stamps, "no stage was trained again"


def test_bench_refuses_an_output_folder_of_other_settings(tmp_path: Path) -> None:
    settings = _fast_settings()
    data = synthetic_bench_data(settings.first_stage_config(0))
    run_bench(settings=settings, methods=["finetune"], data=data, out_dir=tmp_path, figures=False)
    other = _fast_settings(stage_steps=(5, 3, 3))
    with pytest.raises(BenchError, match="other settings"):
        run_bench(settings=other, methods=["finetune"], data=data, out_dir=tmp_path, figures=False)


def test_finish_stage_gives_the_products_of_training_with_the_strategy(tmp_path: Path) -> None:
    """Reusing a trained first stage equals training it with the strategy: same weights, same real buffer."""
    config = make_config(train={"epochs": 1, "batch_size": 8}, replay={"strategy": "real_buffer"})
    images = structured_images(40, (1, 16, 16, 16), seed=1)
    direct = run_stage(
        config=config, modality="ct", train_data=TensorImages(images), replay=replay_class("real_buffer")()
    )
    plain = run_stage(config=config, modality="ct", train_data=TensorImages(images), replay=replay_class("none")())
    reused, _ = finish_stage(
        plain.artifact,
        replay_class("real_buffer")(),
        config,
        "ct",
        images,
        tmp_path / "s1",
        "test",
        torch.device("cpu"),
    )
    assert all(torch.equal(direct.artifact.weights[k], v) for k, v in reused.weights.items())
    assert torch.equal(direct.artifact.extras["real_buffer"]["ct"], reused.extras["real_buffer"]["ct"])
    assert reused.manifest.replay == "real_buffer"


def test_joint_replay_cycles_other_modalities_with_the_mae_objective() -> None:
    config = make_config()
    data = {
        "mri": structured_images(6, (1, 16, 16, 16), seed=2),
        "pathology": structured_images(6, (3, 16, 16), seed=3),
    }
    strategy = JointReplay(data)
    from invcoss_core.models import build_model

    strategy.begin_stage(ReplayContext(config, "ct", build_model(config.model), None, None, torch.device("cpu")))
    g = torch.Generator().manual_seed(0)
    batches = [strategy.sample_batch(step, g) for step in range(4)]
    assert [b.modality for b in batches if b] == ["mri", "pathology", "mri", "pathology"]
    assert all(b is not None and b.objective == "mae" for b in batches)


def _finetune_entry(rise: float, sd: float, bwt: float, bwt_sd: float) -> dict[str, Any]:
    nan = None
    return {
        "seeds": 3,
        "per_seed": {"bwt": [bwt] * 3},
        "recon": [[0.8, nan, nan], [0.9, 0.9, nan], [0.8 + rise, 0.9 + rise, 0.6]],
        "recon_sd": [[sd, nan, nan], [sd, sd, nan], [sd, sd, sd]],
        "recon_increase": {"ct": rise, "mri": rise},
        "recon_increase_sd": {"ct": sd, "mri": sd},
        "bwt": bwt,
        "bwt_sd": bwt_sd,
    }


def test_forgetting_is_visible_only_beyond_twice_the_seed_spread() -> None:
    from invcoss_core.evaluation.bench import forgetting_check

    order, tasks, task_stage = ["ct", "mri", "pathology"], ["a", "b", "c"], [0, 1, 2]
    clear = forgetting_check(_finetune_entry(0.3, 0.05, -0.08, 0.02), order, tasks, task_stage)
    assert clear["visible"] is True
    assert clear["recon"]["ct"]["rise"] == pytest.approx(0.3)
    noisy = forgetting_check(_finetune_entry(0.3, 0.2, -0.08, 0.02), order, tasks, task_stage)
    assert noisy["recon_visible"] is False and noisy["visible"] is False
    helped = forgetting_check(_finetune_entry(0.3, 0.05, 0.05, 0.01), order, tasks, task_stage)
    assert helped["probe_visible"] is False


def test_forgetting_check_reports_the_knn_probe_beside_the_linear_verdict() -> None:
    from invcoss_core.evaluation.bench import forgetting_check
    from invcoss_core.evaluation.report import forgetting_sentence

    entry = {**_finetune_entry(0.3, 0.05, -0.005, 0.01), "bwt_knn": -0.035, "bwt_knn_sd": 0.007}
    check = forgetting_check(entry, ["ct", "mri", "pathology"], ["a", "b", "c"], [0, 1, 2])
    assert check["knn_probe_visible"] is True and check["knn_probe_drop"] == pytest.approx(0.035)
    assert check["probe_visible"] is False and check["visible"] is False, "the verdict stays on the linear probe"
    sentence = forgetting_sentence({"forgetting": check})
    assert "kNN probe: fell by 3.5 points" in sentence and "beyond twice" in sentence
    assert sentence.startswith("Forgetting was NOT clearly visible")


def _goal_entry(avg_prev: list[float], recon: list[float], seed_ids: list[int]) -> dict[str, Any]:
    mean = sum(avg_prev) / len(avg_prev)
    return {
        "avg_prev": mean,
        "avg_prev_knn": mean,
        "recon_prev": sum(recon) / len(recon),
        "seed_ids": seed_ids,
        "per_seed": {"avg_prev": avg_prev, "avg_prev_knn": avg_prev, "recon_prev": recon},
    }


def test_goals_pair_the_methods_by_seed_and_say_when_the_seeds_do_not_resolve_them() -> None:
    from invcoss_core.evaluation.report import _goal_lines

    # finetune's seeds vary by 10 points; invcoss is 4 points above it in every seed (paired sd 0)
    fine = _goal_entry([0.60, 0.70, 0.80], [1.0, 1.1, 1.2], [0, 1, 2])
    inv = _goal_entry([0.64, 0.74, 0.84, 0.10], [0.8, 0.9, 1.0, 5.0], [0, 1, 2, 7])  # seed 7 has no partner
    buf = _goal_entry([0.70, 0.70, 0.80], [0.8, 0.92, 0.98], [0, 1, 2])
    lines = _goal_lines({"invcoss": inv, "finetune": fine, "real_buffer": buf})
    linear_fine, _knn_fine, recon_fine, linear_buf, _knn_buf, recon_buf = lines
    assert "paired over 3 seeds: +4.0 ± 0.0 points" in linear_fine and "met with 95 % confidence" in linear_fine
    assert "NOT met (goal: ≥ finetune + 3 points)" in linear_fine, "the unpaired mean includes the unpaired seed"
    assert "+0.200 ± 0.000 lower for invcoss" in recon_fine and "met with 95 % confidence" in recon_fine
    # vs the buffer: differences -6, +4, +4 points: the -1 point goal lies inside the interval
    assert "paired over 3 seeds: +0.7 ± 5.8 points" in linear_buf and "not resolved by these seeds" in linear_buf
    assert "not resolved" in recon_buf


def test_per_task_forgetting_is_judged_against_each_tasks_own_spread() -> None:
    from invcoss_core.evaluation.bench import forgetting_check
    from invcoss_core.evaluation.report import _task_bwt_lines

    entry = {
        **_finetune_entry(0.3, 0.05, -0.005, 0.01),
        # task a loses 3 points with sd 1 (visible); b loses 4 with sd 5 (noise); kNN: a within the spread
        "task_bwt": {"a": -0.03, "b": -0.04},
        "task_bwt_sd": {"a": 0.01, "b": 0.05},
        "task_bwt_knn": {"a": -0.01, "b": 0.02},
        "task_bwt_knn_sd": {"a": 0.02, "b": 0.01},
        # seeds that lose (of the entry's 3): a in all three on the linear probe, nowhere else in all
        "task_bwt_losses": {"a": 3, "b": 2},
        "task_bwt_knn_losses": {"a": 2, "b": 0},
    }
    check = forgetting_check(entry, ["ct", "mri", "pathology"], ["a", "b", "c"], [0, 1, 2])
    assert check["tasks"]["a"]["linear"]["losses"] == 3 and check["tasks"]["a"]["linear"]["of"] == 3
    assert check["tasks"]["a"]["linear"]["sign_p"] == pytest.approx(1 / 8)
    assert check["tasks"]["b"]["linear"]["sign_p"] == pytest.approx(4 / 8)
    assert check["tasks"]["a"]["linear"]["visible"] is True
    assert check["tasks"]["a"]["linear"]["drop"] == pytest.approx(0.03)
    assert check["tasks"]["b"]["linear"]["visible"] is False and check["tasks"]["a"]["knn"]["visible"] is False
    assert check["tasks"]["b"]["knn"]["visible"] is False, "a gain is not forgetting"
    assert check["visible"] is False, "per-task findings do not change the verdict"
    lines = "\n".join(_task_bwt_lines({"finetune": entry}, ["a", "b"], check))
    assert "| **finetune** | -3.0 ± 1.0 / -1.0 ± 2.0 | -4.0 ± 5.0 / +2.0 ± 1.0 |" in lines
    assert "beyond twice its seed spread on: a (linear, -3.0 ± 1.0);" in lines
    assert "loses in every one of its 3 seeds on: a (linear) (one-sided sign test p = 0.125 each)." in lines
    older = {
        t: {p: {k: v for k, v in f.items() if k in ("drop", "spread", "visible")} for p, f in per.items()}
        for t, per in check["tasks"].items()
    }
    assert "every one of" not in "\n".join(_task_bwt_lines({"finetune": entry}, ["a", "b"], {"tasks": older})), (
        "results without the loss counts claim nothing"
    )


def test_margin_table_measures_each_earlier_task_against_the_random_encoder_at_its_own_stage() -> None:
    from invcoss_core.evaluation.report import _margin_lines

    # tasks a (stage 0), b (stage 1), c (stage 2, the last: not an earlier task); three stages
    finetune = {
        "acc": [[0.80, 0.50, 0.5], [0.78, 0.90, 0.5], [0.75, 0.70, 0.9]],
        "acc_knn": [[0.70, 0.40, 0.5], [0.70, 0.60, 0.5], [0.60, 0.45, 0.9]],
    }
    joint = {"acc": [[0.9, 0.9, 0.9]], "acc_knn": [[0.9, 0.9, 0.9]]}  # one stage: nothing to forget, no row
    rnd = {"acc": [0.70, 0.80, 0.5], "acc_knn": [0.65, 0.50, 0.5]}
    lines = _margin_lines({"joint": joint, "finetune": finetune}, ["a", "b", "c"], [0, 1], [0, 1, 2], rnd)
    text = "\n".join(lines)
    assert "| method | a | b |" in text
    assert "| random encoder (%) | 70.0 / 65.0 | 80.0 / 50.0 |" in text
    # a: own stage 0 -> +10 linear, +5 kNN; last stage +5, -5.  b: own stage 1 -> +10, +10; last -10, -5
    assert "| **finetune** | +10.0 → +5.0 / +5.0 → -5.0 | +10.0 → -10.0 / +10.0 → -5.0 |" in text
    assert "**joint**" not in text
    assert _margin_lines({"joint": joint}, ["a", "b", "c"], [0, 1], [0, 1, 2], rnd) == []
