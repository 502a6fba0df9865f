"""The prepared GPU check (benchmarks/gpu/check.py) in its --smoke mode, and the input pipeline's own cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_input_pipeline import CachedCrops  # noqa: E402


def test_gpu_check_smoke_runs_every_section_and_prints_one_json(sample_data: Path, tmp_path: Path) -> None:
    script = ROOT / "benchmarks" / "gpu" / "check.py"
    command = [sys.executable, str(script), "--smoke", "--device", "cpu", "--data", str(sample_data)]
    done = subprocess.run(
        [*command, "--json", str(tmp_path / "check.json")], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)
    assert printed == json.loads((tmp_path / "check.json").read_text())
    stage = printed["stage"]
    assert {(r["modality"], r["amp"]) for r in stage} == {(m, a) for m in ("ct", "pathology") for a in (True, False)}
    for row in stage:
        assert row["precision"] == "float32"  # the CPU never autocasts
        assert row["samples_per_s"] > 0 and row["train_gflops_per_sample"] > 0
        assert row["mfu"] is None  # no known peak for a CPU
    for modality in ("ct", "pathology"):  # the same model in either precision: the same FLOPs
        flops = {r["train_gflops_per_sample"] for r in stage if r["modality"] == modality}
        assert len(flops) == 1
    for group in ("3d", "2d"):
        rows = printed["loader"][group]["rows"]
        assert {(r["variant"], r["workers"]) for r in rows} == {(v, w) for v in ("ours", "monai-cache") for w in (0, 1)}
        assert all(r["samples_per_s"] > 0 and r["cache_mib"] > 0 for r in rows)
    generator, pixels = printed["inversion"]
    assert (generator["method"], pixels["method"]) == ("generator", "pixels")
    assert generator["input_shape"][1:] == [16, 16, 16] and "memory_vs_pixels" in generator
    assert printed["seconds"]["total"] < 300


def test_our_cache_cuts_fresh_augmented_crops_of_the_input_size() -> None:
    rng = np.random.default_rng(0)
    volume = np.zeros((1, 40, 36, 30), np.float32)
    volume[0, 10:20, 10:20, 10:20] = rng.uniform(0.5, 1.0, (10, 10, 10))  # the foreground
    cache = CachedCrops([volume], ["ct"], (16, 16, 16))
    crops = torch.stack([cache[0] for _ in range(20)])
    assert crops.shape == (20, 1, 16, 16, 16) and crops.dtype == torch.float32
    assert float(crops.min()) >= 0 and float(crops.max()) <= 1
    assert len({c.sum().item() for c in crops}) > 10  # random crops and augmentation: not one sample repeated
    assert cache.images[0].dtype == torch.float16  # the cache holds half the bytes of the float32 images
    assert (crops.flatten(1).amax(1) > 0.5).float().mean() >= 0.7  # most crops centred on the foreground


def test_the_half_precision_variant_hands_float16_crops_without_the_intensity_change() -> None:
    volume = np.linspace(0, 1, 40 * 36 * 30, dtype=np.float32).reshape(1, 40, 36, 30)
    half = CachedCrops([volume], ["ct"], (16, 16, 16), half_out=True)[0]
    assert half.dtype == torch.float16 and half.shape == (1, 16, 16, 16)
    values = set(np.unique(volume.astype(np.float16)).tolist())
    assert set(np.unique(half.numpy()).tolist()) <= values  # voxels moved (crop, flips, turns), none rescaled
