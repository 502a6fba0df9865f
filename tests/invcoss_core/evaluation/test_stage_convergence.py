"""The first-stage convergence benchmark (benchmarks/bench_stage_convergence.py), run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_convergence_script_probes_every_epoch_against_the_random_encoder(sample_data: Path, tmp_path: Path) -> None:
    script = ROOT / "benchmarks" / "bench_stage_convergence.py"
    command = [sys.executable, str(script), "--data", str(sample_data), "--profile", "tiny"]
    command += ["--steps", "24", "--epochs", "2", "--out", str(tmp_path), "--threads", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "convergence.json").read_text())
    assert result["tasks"] == ["ct_hu_tissue", "ct_tumour"], "the first stage's (CT) tasks only"
    labels = [row["label"] for row in result["rows"]]
    assert labels == ["raw pixels", "random encoder", "epoch 1 (12 steps)", "epoch 2 (24 steps)"]
    for row in result["rows"]:
        for task in result["tasks"]:
            assert 0.0 <= row["probes"][task]["linear"] <= 1.0 and 0.0 <= row["probes"][task]["knn"] <= 1.0
    random, *epochs = result["rows"][1:]
    # Training on CT lowers the held-out CT reconstruction loss below the untrained model's (1.5 vs 0.94 here).
    assert all(row["recon"] < random["recon"] for row in epochs)
    assert (tmp_path / "stage" / "manifest.json").is_file(), "the trained stage is kept as an artifact"
    assert "points above the random encoder" in done.stdout
