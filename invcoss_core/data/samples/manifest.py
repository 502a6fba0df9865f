"""The sample folder's outputs: manifest.json, labels/tasks.json, NOTICE.md, subjects tables; reading one back."""

from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path
from typing import Any

from invcoss_core.data.discovery import SUBJECTS_FILE
from invcoss_core.data.probes import TASK_DEFINITIONS
from invcoss_core.data.samples.layout import Layout
from invcoss_core.data.samples.pins import MNI_NOTICE, REQUIRED_MODALITIES, SAMPLES_FORMAT_VERSION, recipe_digest


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_outputs(layout: Layout, skipped: list[dict[str, str]], started: float) -> dict[str, Any]:
    tasks: dict[str, Any] = {}
    for name, definition in TASK_DEFINITIONS.items():
        items = layout.task_items[name]
        if items:
            tasks[name] = {**definition, "items": items}
    labels = layout.root / "labels"
    labels.mkdir(parents=True, exist_ok=True)
    (labels / "tasks.json").write_text(json.dumps({"format_version": 1, "tasks": tasks}, indent=2) + "\n")
    notice = ["# Sources and licences of these sample images", ""]
    for modality, entry in sorted(layout.modalities.items()):
        for source in entry.sources:
            notice.append(
                f"- {modality}: {source['package']}=={source['version']} ({source['licence']}), "
                f"sha256 {source['sha256']}"
            )
    notice += [
        "",
        "brain2 (pyradiomics) was converted from NRRD to a DICOM series by invcoss; other volumes from "
        "NRRD to NIfTI; pixel values unchanged.",
        "",
        "```",
        MNI_NOTICE.rstrip(),
        "```",
        "",
    ]
    (layout.root / "NOTICE.md").write_text("\n".join(notice))
    for name, entry in layout.modalities.items():  # the loader's subject table (discovery.SUBJECTS_FILE)
        rows = [f"{rel.split('/', 1)[1]},{subject}" for rel, subject in zip(entry.files, entry.file_subjects)]
        (layout.root / name / SUBJECTS_FILE).write_text("file,subject\n" + "\n".join(rows) + "\n")
    modalities = {}
    for name, entry in sorted(layout.modalities.items()):
        modalities[name] = {
            "files": entry.files,
            "subjects": entry.subjects,
            "sources": entry.sources,
            "bytes": sum(folder_bytes(layout.root / f) for f in entry.files),
        }
    manifest = {
        "format_version": SAMPLES_FORMAT_VERSION,
        "recipe": recipe_digest(),
        "created_by": "invcoss samples fetch",
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.monotonic() - started, 1),
        "modalities": modalities,
        "labels": {"file": "labels/tasks.json", "tasks": sorted(tasks)},
        "skipped_packages": skipped,
    }
    manifest["total_bytes"] = folder_bytes(layout.root) + len(json.dumps(manifest))
    (layout.root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(dest: Path) -> dict[str, Any] | None:
    """The manifest of a complete sample folder built by this recipe, else None."""
    try:
        manifest = json.loads((dest / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("recipe") != recipe_digest():
        return None
    for entry in manifest.get("modalities", {}).values():
        if not all((dest / f).exists() for f in entry.get("files", [])):
            return None
    if not all(m in manifest.get("modalities", {}) for m in REQUIRED_MODALITIES):
        return None
    return manifest
