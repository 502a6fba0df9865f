"""Audit log and leak measurement: digests of every outbound array, and a real image in a pool is found."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import torch
from safetensors.torch import save

from invcoss_core.config import build_config
from invcoss_core.data import load_site_dataset
from site_client.audit import AuditLog, array_digests, measure_leaks, real_data_digests, sha256_hex


def test_audit_entry_has_every_array_tensor_and_pool_image(tmp_path: Path) -> None:
    pool = torch.rand(3, 3, 16, 16).to(torch.float16)
    files = {"synthetic.safetensors": save({"pathology": pool}), "manifest.json": b"{}"}
    log = AuditLog(tmp_path / "audit.jsonl")
    entry = log.record(kind="stage_reply", message_id="m1", reply_to="r1", arrays=files, extra={"stage": 1})
    assert entry["bytes"] == sum(len(b) for b in files.values())
    assert {a["sha256"] for a in entry["arrays"]} == {sha256_hex(b) for b in files.values()}
    assert len(entry["sample_sha256"]) == 3
    assert entry["tensors"][0]["shape"] == [3, 3, 16, 16] and entry["tensors"][0]["dtype"] == "float16"
    log.record(kind="site_info", message_id="m2", reply_to="r2", arrays={})
    assert [e["message_id"] for e in log.entries()] == ["m1", "m2"]
    assert json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[0])["stage"] == 1
    assert stat.S_IMODE(os.stat(tmp_path / "audit.jsonl").st_mode) & 0o007 == 0


def test_leak_measurement_is_zero_for_synthetic_and_finds_an_injected_real_sample(
    tmp_path: Path, site_images: Path
) -> None:
    config = build_config("tiny", {"data": {"samples_per_volume": 4}})
    real = real_data_digests(site_images / "pathology", "pathology", [config])
    assert real.files == 2 and real.images == 2 and real.samples > 0
    log = AuditLog(tmp_path / "audit.jsonl")
    synthetic = torch.rand(4, 3, 16, 16)
    log.record(
        kind="stage_reply",
        message_id="m1",
        reply_to="r",
        arrays={"synthetic.safetensors": save({"pathology": synthetic.to(torch.float16)})},
    )
    assert measure_leaks([log], real)["real_image_tensors_out"] == 0
    spec = config.model.spec("pathology")
    sample = load_site_dataset(site_images / "pathology", "pathology", spec, config.data, "train", 0).tensors()[2:3]
    leaked = torch.cat([synthetic, sample]).to(torch.float16)
    log.record(
        kind="stage_reply", message_id="m2", reply_to="r", arrays={"synthetic.safetensors": save({"pathology": leaked})}
    )
    result = measure_leaks([log], real)
    assert result["real_image_tensors_out"] == 1 and result["outbound_messages"] == 2
    raw_file = next((site_images / "pathology").iterdir()).read_bytes()
    log.record(kind="stage_reply", message_id="m3", reply_to="r", arrays={"image.png": raw_file})
    assert measure_leaks([log], real)["real_image_tensors_out"] == 2


def test_non_safetensors_arrays_have_only_a_file_digest() -> None:
    assert array_digests("manifest.json", b"{}") == ([], [])
    assert array_digests("broken.safetensors", b"nope") == ([], [])
