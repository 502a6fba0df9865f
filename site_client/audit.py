"""The site's outbound audit log, and the measurement that no real image tensor ever left the site.

Every message the site sends is appended to `audit.jsonl` (one JSON line, fsync'd, never rewritten) *before* it
is handed to Flower: time, message id, kind, bytes, and the sha256 of every array it carries; for artifact files
(safetensors) also the sha256 of every tensor inside and of every image in an image pool (N, C, ...).

`measure_leaks` hashes what the site holds — every file's bytes, every preprocessed image/volume and every
training sample (patch / sub-volume), each as float32 and float16 — and intersects those digests with every
digest in the audit log. The count of matches is what `report.json → audit.real_image_tensors_out` reports.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from invcoss_core.config import StageConfig

AUDIT_FILE = "audit.jsonl"


def sha256_hex(data: bytes) -> str:
    """Lowercase hex SHA-256."""
    return hashlib.sha256(data).hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw little-endian element bytes of a tensor (any dtype)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def array_digests(name: str, data: bytes) -> tuple[list[dict[str, Any]], list[str]]:
    """Per-tensor digests of a safetensors file, and per-image digests of its image pools.

    Returns:
        ([{tensor, dtype, shape, sha256}], [sha256 of each (C, ...) image of every rank >= 3 tensor]);
        both empty when `data` is not a safetensors file.
    """
    if not name.endswith(".safetensors"):
        return [], []
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError):
        return [], []
    rows: list[dict[str, Any]] = []
    samples: list[str] = []
    for key in sorted(tensors):
        t = tensors[key]
        rows.append(
            {
                "tensor": key,
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape),
                "sha256": sha256_hex(tensor_bytes(t)),
            }
        )
        if t.ndim >= 3:
            samples.extend(sha256_hex(tensor_bytes(t[i])) for i in range(t.shape[0]))
    return rows, samples


@dataclass(frozen=True)
class AuditLog:
    """Append-only JSONL log of everything that leaves the site."""

    path: Path

    def record(
        self,
        *,
        kind: str,
        message_id: str,
        reply_to: str,
        arrays: Mapping[str, bytes],
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Append one outbound message; returns the entry written.

        Args:
            kind: what the message is (stage_reply, stage_refused, stage_failed, site_info).
            arrays: name -> raw bytes of every array in the message.
            extra: small non-patient fields (run id, stage index, status).
        """
        tensors: list[dict[str, Any]] = []
        samples: list[str] = []
        listed = []
        for name in sorted(arrays):
            data = arrays[name]
            listed.append({"name": name, "bytes": len(data), "sha256": sha256_hex(data)})
            rows, pool = array_digests(name, data)
            tensors.extend({"array": name, **row} for row in rows)
            samples.extend(pool)
        entry = {
            "time": time.time(),
            "direction": "out",
            "kind": kind,
            "message_id": message_id,
            "reply_to": reply_to,
            "bytes": sum(len(b) for b in arrays.values()),
            "arrays": listed,
            "tensors": tensors,
            "sample_sha256": samples,
            **dict(extra or {}),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return entry

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, oldest first."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


def outbound_digests(entries: Iterable[Mapping[str, Any]]) -> set[str]:
    """Every digest the audit log recorded: arrays, tensors and pool images."""
    found: set[str] = set()
    for entry in entries:
        found.update(a["sha256"] for a in entry.get("arrays", []))
        found.update(t["sha256"] for t in entry.get("tensors", []))
        found.update(entry.get("sample_sha256", []))
    return found


@dataclass
class RealDigests:
    """Digests of everything real a site holds, with counts per kind."""

    digests: set[str] = field(default_factory=set)
    files: int = 0
    images: int = 0  # preprocessed whole images / volumes
    samples: int = 0  # training inputs: patches, slices, sub-volumes

    def add_array(self, array: np.ndarray | torch.Tensor) -> None:
        """Add an image's float32 and float16 digests."""
        t = torch.as_tensor(np.ascontiguousarray(array)) if isinstance(array, np.ndarray) else array
        self.digests.add(sha256_hex(tensor_bytes(t.to(torch.float32))))
        self.digests.add(sha256_hex(tensor_bytes(t.to(torch.float16))))


def real_data_digests(data_dir: Path, modality: str, configs: Iterable[StageConfig]) -> RealDigests:
    """Hash every real file, preprocessed image/volume and training sample of a site's modality.

    Args:
        data_dir: the site's image folder.
        configs: the stage configurations the site trained with (they decide sample size and placement).
    """
    from invcoss_core.data import SiteDataError, discover_images, load_site_dataset
    from invcoss_core.data.dataset import load_prepared_parts, resolve_modality_folder

    result = RealDigests()
    for path in sorted(p for p in Path(data_dir).rglob("*") if p.is_file()):
        result.digests.add(sha256_hex(path.read_bytes()))
        result.files += 1
    folder = resolve_modality_folder(Path(data_dir), modality)
    seen_specs: set[str] = set()
    for config in configs:
        spec = config.model.spec(modality)
        key = spec.model_dump_json()
        if key not in seen_specs:
            seen_specs.add(key)
            for source in discover_images(folder, group_dicom_series=spec.spatial_dims == 3).sources:
                try:
                    parts = load_prepared_parts(source, modality, spec)
                except Exception:
                    continue
                for prepared in parts:  # a whole slide's regions, or the one image
                    result.add_array(prepared.array)
                result.images += 1
        for split in ("train", "val", "all"):  # the split name seeds where samples are cut: hash each
            try:
                dataset = load_site_dataset(data_dir, modality, spec, config.data, split=split, seed=config.seed)
            except SiteDataError:
                continue
            samples = dataset.tensors()
            for i in range(samples.shape[0]):
                result.add_array(samples[i])
            result.samples += int(samples.shape[0])
    return result


def privacy_fields(files: Mapping[str, bytes]) -> dict[str, Any]:
    """The `privacy` section of an outgoing artifact's manifest, for its audit-log entry ({} when it has none)."""
    data = files.get("manifest.json")
    if not data:
        return {}
    try:
        privacy = json.loads(data).get("privacy")
    except (ValueError, AttributeError):
        return {}
    return {"privacy": privacy} if isinstance(privacy, dict) else {}


def stage_privacy(work_dir: Path) -> list[dict[str, Any]]:
    """The privacy audit of every stage this site produced (held ones included), oldest run folder first.

    Returns:
        [{run_id, stage, privacy}] from each stage folder's artifact manifest (figures only, no patient data).
    """
    rows = []
    for manifest in sorted(Path(work_dir).glob("runs/*/stage-*/artifact/manifest.json")):
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("privacy"), dict):
            rows.append({"run_id": data.get("run_id"), "stage": data.get("stage_index"), "privacy": data["privacy"]})
    return rows


def measure_leaks(audits: list[AuditLog], real: RealDigests) -> dict[str, Any]:
    """Intersect audit logs' digests with a site's real-data digests.

    Args:
        audits: the site's own audit log first, then optionally other sites' (forwarded pools are checked too).
    Returns:
        {outbound_messages, outbound_bytes (both of the site's own log), digests_out (all logs), real_digests,
        real_files, real_images, real_samples, real_image_tensors_out}: the last is the number of outbound digests
        equal to a real one (must be 0).
    """
    own = audits[0].entries()
    out = outbound_digests([e for audit in audits for e in audit.entries()])
    return {
        "outbound_messages": len(own),
        "outbound_bytes": sum(int(e.get("bytes", 0)) for e in own),
        "digests_out": len(out),
        "real_digests": len(real.digests),
        "real_files": real.files,
        "real_images": real.images,
        "real_samples": real.samples,
        "real_image_tensors_out": len(out & real.digests),
    }
