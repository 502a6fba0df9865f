"""Training precision: float32 on the CPU, bf16 autocast on GPUs that support it, recorded in the manifest."""

from __future__ import annotations

import json

import pytest
import torch

from invcoss_core.artifact import decode_artifact
from invcoss_core.data import TensorImages
from invcoss_core.training import run_stage
from invcoss_core.training.precision import autocast, training_precision
from tests.helpers import make_config


def test_cpu_trains_in_float32_even_with_amp_on() -> None:
    assert training_precision(torch.device("cpu"), amp=True) == "float32"
    with autocast(torch.device("cpu"), "float32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.parametrize(
    ("native_bf16", "amp", "expected"), [(True, True, "bfloat16"), (False, True, "float32"), (True, False, "float32")]
)
def test_a_gpu_uses_bf16_only_where_it_runs_it_natively_and_amp_is_on(
    monkeypatch: pytest.MonkeyPatch, native_bf16: bool, amp: bool, expected: str
) -> None:
    calls: list[bool] = []

    def supported(including_emulation: bool = True) -> bool:
        calls.append(including_emulation)
        return native_bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert training_precision(torch.device("cuda"), amp=amp) == expected
    assert all(flag is False for flag in calls)  # emulated bf16 (pre-Ampere) does not count


def test_the_manifest_records_the_precision_and_older_manifests_still_read(ct_data: TensorImages) -> None:
    cfg = make_config(train={"epochs": 1, "batch_size": 8})
    result = run_stage(config=cfg, modality="ct", train_data=ct_data, run_id="r")
    assert result.artifact.manifest.precision == "float32"
    manifest = json.loads(result.files["manifest.json"])
    del manifest["precision"]  # an artifact written before the field existed
    files = {**result.files, "manifest.json": json.dumps(manifest).encode()}
    assert decode_artifact(files).manifest.precision is None
