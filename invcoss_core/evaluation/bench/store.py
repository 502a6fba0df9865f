"""What a benchmark run keeps on disk: stage records, JSON files, and the fingerprints that decide reuse."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from invcoss_core.artifact import Artifact, read_artifact_dir
from invcoss_core.evaluation.bench.status import BenchError
from invcoss_core.evaluation.data import BenchData
from invcoss_core.evaluation.evaluate import StageEval
from invcoss_core.evaluation.settings import METHODS, BenchSettings

logger = logging.getLogger(__name__)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(jsonable(data), indent=2, sort_keys=False, allow_nan=False))
    tmp.replace(path)


def jsonable(value: Any) -> Any:
    """NaN/inf become null (JSON has no NaN); numpy scalars and arrays become Python numbers and lists."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def artifact_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and not f.name.startswith("."))


def try_artifact(path: Path) -> Artifact | None:
    if not (path / "manifest.json").is_file():
        return None
    try:
        return read_artifact_dir(path)
    except ValueError as err:
        logger.warning("ignoring unreadable artifact at %s (%s); it is trained again", path, err)
        return None


@dataclass
class StageRecord:
    """One finished stage of one method and seed: its evaluation and costs.

    eval_key identifies the evaluation settings and data the `eval` was measured with: a record whose key differs
    from the current one is evaluated again from its stored artifact (no retraining).
    """

    modality: str
    eval: StageEval
    eval_key: str
    train_seconds: float
    replay_seconds: float
    artifact: str
    artifact_sha256: str
    handoff_bytes: int
    metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "modality": self.modality,
            "eval": self.eval.to_json(),
            "eval_key": self.eval_key,
            "train_seconds": self.train_seconds,
            "replay_seconds": self.replay_seconds,
            "artifact": self.artifact,
            "artifact_sha256": self.artifact_sha256,
            "handoff_bytes": self.handoff_bytes,
            "metrics": self.metrics,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StageRecord:
        """Inverse of `to_json`."""
        return cls(
            modality=data["modality"],
            eval=StageEval.from_json(data["eval"]),
            eval_key=str(data.get("eval_key", "")),
            train_seconds=float(data["train_seconds"]),
            replay_seconds=float(data["replay_seconds"]),
            artifact=data["artifact"],
            artifact_sha256=data["artifact_sha256"],
            handoff_bytes=int(data["handoff_bytes"]),
            metrics={k: float(v) for k, v in data.get("metrics", {}).items() if v is not None},
        )


def load_record(path: Path, artifact: Artifact | None) -> StageRecord | None:
    """A stored stage record, if it belongs to `artifact`."""
    if artifact is None or not path.is_file():
        return None
    try:
        record = StageRecord.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError):
        return None
    return record if record.artifact_sha256 == artifact.sha256 else None


def image_digest(data: BenchData) -> str:
    """What training depends on: the SSL images of every modality (a strided sample of them)."""
    digest = hashlib.sha256()
    for m in sorted(data.modalities):
        for tensor in (data.modalities[m].train, data.modalities[m].val):
            digest.update(tensor[:: max(1, tensor.shape[0] // 16)].numpy().tobytes())
    return digest.hexdigest()


def task_digest(data: BenchData) -> str:
    """What the probes depend on besides the settings: the tasks' labels, splits and folds."""
    digest = hashlib.sha256()
    for task in data.tasks:
        digest.update(task.name.encode())
        digest.update(task.y.numpy().tobytes())
        digest.update(task.train_mask.numpy().tobytes())
        if task.folds is not None:
            digest.update(task.folds.numpy().tobytes())
    return digest.hexdigest()


METHOD_ONLY_FIELDS = {"method_config", "joint_steps", "seeds", "ablation_seeds", "grid_images"}


# Settings that only evaluation depends on: changing them re-evaluates stored artifacts, never retrains.
EVAL_FIELDS = {"probes", "recon", "probe_tasks", "probe_max_per_class"}


def fingerprint(settings: BenchSettings, data: BenchData) -> dict[str, Any]:
    """What every stored stage's training depends on: the shared settings and the data."""
    exclude = METHOD_ONLY_FIELDS | EVAL_FIELDS
    first = settings.first_stage_config(0).model_dump(mode="json", exclude={"seed", "replay", "inversion", "gate"})
    return {
        "settings": settings.model_dump(mode="json", exclude=exclude),
        "first_stage": first,
        "images": image_digest(data),
    }


def eval_key_of(settings: BenchSettings, data: BenchData) -> str:
    blob = json.dumps(
        {
            "eval": settings.model_dump(mode="json", include=EVAL_FIELDS),
            "images": image_digest(data),
            "tasks": task_digest(data),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def method_fingerprint(settings: BenchSettings, method: str) -> dict[str, Any]:
    """The StageConfigs of a method's stages (seed 0): a stored run of another config is not reused."""
    spec = METHODS[method]
    stages = len(settings.order) if spec.sequential else 1
    exclude = {"seed"} if spec.uses_inversion else {"seed", "inversion", "gate"}
    return {
        "configs": [settings.config_for(method, 0, s).model_dump(mode="json", exclude=exclude) for s in range(stages)]
    }


def check_fingerprint(path: Path, fingerprint: dict[str, Any], what: str) -> None:
    if path.is_file():
        if json.loads(path.read_text()) != jsonable(fingerprint):
            raise BenchError(
                f"{path.parent} holds {what} run with other settings or data; choose a new --out folder "
                f"(or delete {path.parent} to train it again)"
            )
    else:
        write_json(path, fingerprint)
