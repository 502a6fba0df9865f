"""`invcoss bench`: train every method stage by stage on real images, measure forgetting, write the comparison.

Plan of one run (core methods seed by seed in the order given, then the ablations):
1. the first stage (MAE on the first modality) is trained once per seed with the one stage loop and reused by
   every sequential method: each method's own first-stage products (inversion pool, real buffer, EWC Fisher) are
   computed from those trained weights and statistics through its `ReplayStrategy.end_stage` (`finish_stage`);
2. each sequential method then runs the later stages with `run_stage` and its strategy; `joint` runs one stage
   on the first modality while `JointReplay` feeds the others with the MAE loss;
3. after every stage the model is evaluated (`evaluate_model`): probes on every task, held-out reconstruction on
   every modality seen so far. The first stage's evaluation is shared like its weights.
Everything lands under `out/runs/` (artifacts + per-stage JSON), so a rerun with the same settings resumes and
only trains what is missing — e.g. a `finetune`-only forgetting check followed by all methods; changed evaluation
settings re-evaluate the stored artifacts without retraining. `shard` splits the plan over parallel processes.
Outputs: `results.json` (see `aggregate`), `report.md`, and PNG figures (see `invcoss_core.evaluation.plots`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from invcoss_core.artifact import REAL_BUFFER, Artifact, encode_artifact, read_artifact_dir, write_artifact_dir
from invcoss_core.common.events import EventSink, ProgressEvent, discard
from invcoss_core.config import StageConfig
from invcoss_core.data import TensorImages
from invcoss_core.evaluation.data import BenchData
from invcoss_core.evaluation.evaluate import StageEval, evaluate_model, probe_model, probe_pixels
from invcoss_core.evaluation.joint import JointReplay
from invcoss_core.evaluation.metrics import (
    avg_prev,
    backward_transfer,
    elementwise_mean_sd,
    mean_sd,
    recon_increase,
    sign_test_p,
    task_backward_transfer,
)
from invcoss_core.evaluation.recon import decoder_probe_loss, decoder_state, own_decoder_loss
from invcoss_core.evaluation.settings import METHODS, BenchSettings, MethodSpec
from invcoss_core.inversion.synthesize import images_needed
from invcoss_core.replay import ReplayContext, ReplayStrategy, replay_class
from invcoss_core.training import load_student, run_stage
from invcoss_core.training.stage import seeded_model

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
PRIMARY_PROBE = "linear"  # `acc` in results.json; kNN is reported beside it as `acc_knn`
# Training fields a method may change without invalidating the shared first stage (they act on replay only).
_REPLAY_ONLY_TRAIN_FIELDS = ("replay_batch_size", "distill_weight", "replay_mae_weight", "mixup")


class BenchError(RuntimeError):
    """The benchmark cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class BenchStatus:
    """Where the benchmark stands: the running method/seed/stage/phase and the estimated time left."""

    method: str
    seed: int  # 0-based
    seeds: int
    stage: int  # 1-based; 0 while computing baselines
    stages: int
    modality: str
    phase: str  # "baselines", "train", "replay", "inversion", "gate", "eval"
    done: float  # work units done (training-step equivalents)
    total: float
    elapsed: float
    seconds_left: float | None  # None until something was measured
    step: int = 0  # progress within the phase
    steps: int = 0


StatusSink = Callable[[BenchStatus], None]


class _NotTrainedError(Exception):
    """A stage that `report_only` would have had to train."""


def _ignore_status(_status: BenchStatus) -> None:
    """A StatusSink that drops everything."""


# --- work accounting for the time-left estimate ------------------------------------------------------------------

# Relative cost of one optimiser step or evaluation, in plain-training-step units (measured on CPU).
_COST_REPLAY_STEP = 1.6
_COST_JOINT_STEP = 2.0
_COST_EVAL_PER_MODALITY = 60.0
_COST_INVERSION_STEP = 1.5


@dataclass
class _Tracker:
    total: float
    sink: StatusSink
    started: float = field(default_factory=time.perf_counter)
    done: float = 0.0
    job_units: float = 0.0
    job_fraction: float = 0.0
    where: dict[str, Any] = field(default_factory=dict)

    def begin(self, units: float, **where: Any) -> None:
        self.job_units = units
        self.job_fraction = 0.0
        self.where = where
        self.emit(0, 0)

    def progress(self, fraction: float, step: int, steps: int, phase: str | None = None) -> None:
        self.job_fraction = min(1.0, max(self.job_fraction, fraction))
        if phase is not None:
            self.where["phase"] = phase
        self.emit(step, steps)

    def end(self) -> None:
        self.done += self.job_units
        self.job_units = self.job_fraction = 0.0

    def skip(self, units: float) -> None:
        """Work found on disk: it no longer counts towards the remaining time."""
        self.total = max(0.0, self.total - units)

    def emit(self, step: int, steps: int) -> None:
        done = self.done + self.job_units * self.job_fraction
        elapsed = time.perf_counter() - self.started
        left = elapsed * (self.total - done) / done if done > 0 and elapsed > 5 else None
        w = self.where
        self.sink(
            BenchStatus(
                method=w.get("method", ""),
                seed=w.get("seed", 0),
                seeds=w.get("seeds", 1),
                stage=w.get("stage", 0),
                stages=w.get("stages", 0),
                modality=w.get("modality", ""),
                phase=w.get("phase", ""),
                done=done,
                total=self.total,
                elapsed=elapsed,
                seconds_left=left,
                step=step,
                steps=steps,
            )
        )

    def events(self, forward: EventSink) -> EventSink:
        """A ProgressEvent sink that advances the current job (training steps or inversion steps)."""

        def sink(event: ProgressEvent) -> None:
            forward(event)
            if event.total <= 0:
                return
            fraction = event.step / event.total
            if event.phase == "train":
                self.progress(
                    0.8 * fraction if self.where.get("inversion") else fraction, event.step, event.total, "train"
                )
            elif event.phase == "inversion":
                self.progress(0.8 + 0.2 * fraction, event.step, event.total, "inversion")
            else:
                self.progress(self.job_fraction, event.step, event.total, event.phase)

        return sink


# --- first-stage reuse -------------------------------------------------------------------------------------------


def finish_stage(
    trained: Artifact,
    strategy: ReplayStrategy,
    config: StageConfig,
    modality: str,
    train_images: torch.Tensor,
    out_dir: Path,
    run_id: str,
    device: torch.device,
    events: EventSink = discard,
) -> tuple[Artifact, float]:
    """Give an already trained first stage another strategy's end-of-stage products (pool, buffer, Fisher).

    The weights and statistics are those of `trained`; only what `strategy.end_stage` adds differs, exactly as if
    the stage had been trained with `strategy` (the first stage has nothing to replay, so training is the same).

    Args:
        trained: the shared first-stage artifact (replay `none`).
        config: the method's first-stage config (same model and training as `trained`'s).
        train_images: (N, C, *img_size) the stage's real training images (the strategy may select or gate on them).
    Returns:
        the method's first-stage artifact (also written to `out_dir`) and the seconds `end_stage` took.
    Raises:
        BenchError: when `trained` is not a first stage or was trained with another architecture.
    """
    if trained.manifest.stage_index != 1:
        raise BenchError(f"finish_stage needs a first-stage artifact; got stage {trained.manifest.stage_index}")
    if trained.manifest.architecture != config.model:
        raise BenchError("the shared first stage was trained with another architecture than this method's config")
    student = load_student(trained, device)
    ctx = ReplayContext(
        config=config, modality=modality, student=student, teacher=None, incoming=None, device=device, events=events
    )
    strategy.begin_stage(ctx)
    own = {k: v for k, v in trained.stats.items() if k.split(".", 1)[0] == modality}
    outcome = strategy.end_stage(ctx, TensorImages(train_images), own)
    files = encode_artifact(
        run_id=run_id,
        stage_index=1,
        site=modality,
        modalities=[modality],
        profile=config.profile,
        replay=strategy.name,
        parent_sha256=None,
        architecture=config.model,
        weights=trained.weights,
        stats=trained.stats,
        synthetic=outcome.synthetic,
        extras=outcome.extras,
        privacy_gate=outcome.gate,
        metrics={**trained.manifest.metrics, "replay_seconds": outcome.seconds, **outcome.metrics},
    )
    write_artifact_dir(files, out_dir)
    for name, png in outcome.previews.items():
        out_dir.with_name(f"{out_dir.name}.preview-{name}.png").write_bytes(png)
    return read_artifact_dir(out_dir), outcome.seconds


# --- persistence -------------------------------------------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=False, allow_nan=False))
    tmp.replace(path)


def _jsonable(value: Any) -> Any:
    """NaN/inf become null (JSON has no NaN); numpy scalars and arrays become Python numbers and lists."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _artifact_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and not f.name.startswith("."))


def _try_artifact(path: Path) -> Artifact | None:
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


def _load_record(path: Path, artifact: Artifact | None) -> StageRecord | None:
    """A stored stage record, if it belongs to `artifact`."""
    if artifact is None or not path.is_file():
        return None
    try:
        record = StageRecord.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError):
        return None
    return record if record.artifact_sha256 == artifact.sha256 else None


def _image_digest(data: BenchData) -> str:
    """What training depends on: the SSL images of every modality (a strided sample of them)."""
    digest = hashlib.sha256()
    for m in sorted(data.modalities):
        for tensor in (data.modalities[m].train, data.modalities[m].val):
            digest.update(tensor[:: max(1, tensor.shape[0] // 16)].numpy().tobytes())
    return digest.hexdigest()


def _task_digest(data: BenchData) -> str:
    """What the probes depend on besides the settings: the tasks' labels, splits and folds."""
    digest = hashlib.sha256()
    for task in data.tasks:
        digest.update(task.name.encode())
        digest.update(task.y.numpy().tobytes())
        digest.update(task.train_mask.numpy().tobytes())
        if task.folds is not None:
            digest.update(task.folds.numpy().tobytes())
    return digest.hexdigest()


# --- the run -----------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    settings: BenchSettings
    data: BenchData
    out: Path
    device: torch.device
    tracker: _Tracker
    events: EventSink
    eval_key: str = ""
    train_missing: bool = True  # False (report only): a stage not on disk is reported as missing, never trained

    @property
    def order(self) -> tuple[str, ...]:
        return self.settings.order

    def _evaluate(self, model: Any, seen: Sequence[str], anchors: Mapping[str, dict[str, torch.Tensor]]) -> StageEval:
        self.tracker.progress(self.tracker.job_fraction, 0, 0, "eval")
        return evaluate_model(model, self.data, seen, anchors, self.settings.probes, self.settings.recon, self.device)

    def _stage_units(self, spec: MethodSpec, stage: int) -> float:
        """Estimated cost of one stage of one method (training, replay production, evaluation)."""
        s = self.settings
        if not spec.sequential:
            return s.joint_steps * _COST_JOINT_STEP + _COST_EVAL_PER_MODALITY * len(self.order)
        units = 10.0  # k-means, Fisher, artifact writing
        if stage > 0:  # the shared first stage's training and evaluation are counted once per seed
            factor = 1.0 if spec.replay == "none" else _COST_REPLAY_STEP
            units += s.stage_steps[stage] * factor + _COST_EVAL_PER_MODALITY * (stage + 1)
        if spec.uses_inversion:
            inv = s.config_for(spec.name, 0, stage).inversion
            count = images_needed(inv, int(self.data.modalities[self.order[stage]].train.shape[0]))
            batches = max(1, math.ceil(count / inv.batch_size))
            iterations = (
                inv.iterations * batches
                if spec.replay == "pixel_inversion"
                else (inv.iterations + (batches - 1) * inv.iterations_per_batch)
            )
            units += _COST_INVERSION_STEP * iterations
        return units

    def first_stage_units(self) -> float:
        return self.settings.stage_steps[0] + _COST_EVAL_PER_MODALITY

    def _stage(
        self,
        *,
        path: Path,
        units: float,
        where: dict[str, Any],
        train: Callable[[EventSink], Artifact],
        evaluate: Callable[[Artifact], StageEval],
        modality: str,
        parent: Artifact | None = None,
        train_seconds: float | None = None,
    ) -> tuple[Artifact, StageRecord]:
        """One stage: reuse what is stored (artifact, evaluation), train and evaluate what is missing."""
        record_path = path.with_suffix(".json")
        artifact = _try_artifact(path)
        if artifact is not None and parent is not None and artifact.manifest.parent_sha256 != parent.sha256:
            artifact = None  # trained from another previous stage: stale
        record = _load_record(record_path, artifact)
        if artifact is not None and record is not None and record.eval_key == self.eval_key:
            self.tracker.skip(units)
            return artifact, record
        if artifact is None and not self.train_missing:
            raise _NotTrainedError(path)
        self.tracker.begin(units, **where)
        if artifact is None:
            artifact = train(self.tracker.events(self.events))
        evaluation = evaluate(artifact)
        metrics = dict(artifact.manifest.metrics)
        record = StageRecord(
            modality=modality,
            eval=evaluation,
            eval_key=self.eval_key,
            train_seconds=float(metrics.get("train_seconds", 0.0)) if train_seconds is None else train_seconds,
            replay_seconds=float(metrics.get("replay_seconds", 0.0)),
            artifact=str(path.relative_to(self.out)),
            artifact_sha256=artifact.sha256,
            handoff_bytes=_artifact_bytes(path),
            metrics=metrics,
        )
        _write_json(record_path, record.to_json())
        self.tracker.end()
        return artifact, record

    # -- shared first stage --

    def first_stage(self, seed: int, seeds: int) -> tuple[Artifact, StageRecord]:
        """The shared first stage of `seed` (trained once, or found on disk) and its evaluation."""
        modality = self.order[0]
        path = self.out / "runs" / "_shared" / f"seed{seed}" / "stage1"

        def train(events: EventSink) -> Artifact:
            return run_stage(
                config=self.settings.first_stage_config(seed),
                modality=modality,
                train_data=TensorImages(self.data.modalities[modality].train),
                run_id=f"bench-shared-seed{seed}",
                site=modality,
                out_dir=path,
                work_dir=path.with_name(f"{path.name}.work"),
                device=self.device,
                events=events,
                replay=replay_class("none")(),
            ).artifact

        def evaluate(artifact: Artifact) -> StageEval:
            model = load_student(artifact, self.device)
            return self._evaluate(model, [modality], {modality: decoder_state(artifact.weights)})

        where = {
            "method": "(shared)",
            "seed": seed,
            "seeds": seeds,
            "stage": 1,
            "stages": len(self.order),
            "modality": modality,
            "phase": "train",
        }
        return self._stage(
            path=path, units=self.first_stage_units(), where=where, train=train, evaluate=evaluate, modality=modality
        )

    # -- one method, one seed --

    def _check_shared_config(self, method: str, seed: int) -> StageConfig:
        config = self.settings.config_for(method, seed, 0)
        shared = self.settings.first_stage_config(seed)
        mine = config.model_dump(exclude={"replay", "inversion", "gate"})
        ref = shared.model_dump(exclude={"replay", "inversion", "gate"})
        for key in _REPLAY_ONLY_TRAIN_FIELDS:
            mine["train"].pop(key)
            ref["train"].pop(key)
        if mine != ref:
            raise BenchError(
                f"method {method} changes the first stage's model, training or data settings; the shared first "
                "stage cannot be reused. Put only replay/inversion settings in method_config."
            )
        return config

    def sequential(
        self, spec: MethodSpec, seed: int, seeds: int, shared: tuple[Artifact, StageRecord]
    ) -> list[StageRecord]:
        """All stages of one sequential method and seed."""
        records: list[StageRecord] = []
        anchors: dict[str, dict[str, torch.Tensor]] = {}
        previous: Artifact | None = None
        for stage, modality in enumerate(self.order):
            if stage == 0:
                artifact, record = self._method_first_stage(spec, seed, seeds, shared)
            else:
                assert previous is not None  # set by the first stage
                artifact, record = self._method_later_stage(spec, seed, seeds, stage, previous, anchors)
            anchors[modality] = decoder_state(artifact.weights)
            records.append(record)
            previous = artifact
        return records

    def _where(self, spec: MethodSpec, seed: int, seeds: int, stage: int) -> dict[str, Any]:
        return {
            "method": spec.name,
            "seed": seed,
            "seeds": seeds,
            "stage": stage + 1,
            "stages": len(self.order),
            "modality": self.order[stage],
            "phase": "train",
            "inversion": spec.uses_inversion,
        }

    def _method_first_stage(
        self, spec: MethodSpec, seed: int, seeds: int, shared: tuple[Artifact, StageRecord]
    ) -> tuple[Artifact, StageRecord]:
        """The shared first stage given this method's end-of-stage products (its evaluation is the shared one)."""
        base, base_record = shared
        modality = self.order[0]
        path = self.out / "runs" / spec.name / f"seed{seed}" / "stage1"
        config = self._check_shared_config(spec.name, seed)

        def train(events: EventSink) -> Artifact:
            artifact, _ = finish_stage(
                base,
                replay_class(spec.replay)(),
                config,
                modality,
                self.data.modalities[modality].train,
                path,
                f"bench-{spec.name}-seed{seed}",
                self.device,
                events,
            )
            return artifact

        return self._stage(
            path=path,
            units=self._stage_units(spec, 0),
            where=self._where(spec, seed, seeds, 0),
            train=train,
            evaluate=lambda _artifact: base_record.eval,  # the same weights as the shared stage
            modality=modality,
            train_seconds=base_record.train_seconds,
        )

    def _method_later_stage(
        self,
        spec: MethodSpec,
        seed: int,
        seeds: int,
        stage: int,
        previous: Artifact,
        anchors: Mapping[str, dict[str, torch.Tensor]],
    ) -> tuple[Artifact, StageRecord]:
        """A later stage of a sequential method: `run_stage` with its strategy, then the evaluation."""
        modality = self.order[stage]
        path = self.out / "runs" / spec.name / f"seed{seed}" / f"stage{stage + 1}"
        config = self.settings.config_for(spec.name, seed, stage)

        def train(events: EventSink) -> Artifact:
            return run_stage(
                config=config,
                modality=modality,
                train_data=TensorImages(self.data.modalities[modality].train),
                incoming=previous,
                run_id=f"bench-{spec.name}-seed{seed}",
                site=modality,
                out_dir=path,
                work_dir=path.with_name(f"{path.name}.work"),
                device=self.device,
                events=events,
                replay=replay_class(spec.replay)(),
            ).artifact

        def evaluate(artifact: Artifact) -> StageEval:
            own = {**anchors, modality: decoder_state(artifact.weights)}
            return self._evaluate(load_student(artifact, self.device), self.order[: stage + 1], own)

        return self._stage(
            path=path,
            units=self._stage_units(spec, stage),
            where=self._where(spec, seed, seeds, stage),
            train=train,
            evaluate=evaluate,
            modality=modality,
            parent=previous,
        )

    def joint(self, spec: MethodSpec, seed: int, seeds: int) -> list[StageRecord]:
        """The single joint stage of one seed."""
        path = self.out / "runs" / spec.name / f"seed{seed}" / "stage1"
        first = self.order[0]

        def train(events: EventSink) -> Artifact:
            others = {m: self.data.modalities[m].train for m in self.order[1:]}
            return run_stage(
                config=self.settings.config_for(spec.name, seed, 0),
                modality=first,
                train_data=TensorImages(self.data.modalities[first].train),
                run_id=f"bench-joint-seed{seed}",
                site="joint",
                out_dir=path,
                work_dir=path.with_name(f"{path.name}.work"),
                device=self.device,
                events=events,
                replay=JointReplay(others),
            ).artifact

        def evaluate(artifact: Artifact) -> StageEval:
            decoder = decoder_state(artifact.weights)
            model = load_student(artifact, self.device)
            return self._evaluate(model, self.order, dict.fromkeys(self.order, decoder))

        where = {
            "method": spec.name,
            "seed": seed,
            "seeds": seeds,
            "stage": 1,
            "stages": 1,
            "modality": "all",
            "phase": "train",
        }
        _, record = self._stage(
            path=path,
            units=self._stage_units(spec, 0),
            where=where,
            train=train,
            evaluate=evaluate,
            modality="+".join(self.order),
        )
        return [record]

    def baselines(self, seeds: int) -> dict[str, Any]:
        """Raw pixels (once) and a randomly initialised encoder (per seed): the floor the probes must beat."""
        path = self.out / "runs" / "_shared" / "baselines.json"
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored.get("eval_key") == self.eval_key and len(stored.get("random_encoder", [])) >= seeds:
                return dict(stored)
        self.tracker.begin(
            _COST_EVAL_PER_MODALITY * len(self.order) * seeds,
            method="(baselines)",
            seed=0,
            seeds=seeds,
            stage=0,
            stages=len(self.order),
            modality="all",
            phase="baselines",
        )
        pixels = probe_pixels(self.data.tasks, self.settings.probes)
        randoms = []
        for seed in range(seeds):
            model = seeded_model(self.settings.first_stage_config(seed), 1).to(self.device).eval()
            probes = probe_model(model, self.data.tasks, self.settings.probes, self.device)
            entry: dict[str, Any] = {"probes": probes}
            if seed == 0:  # reconstruction floors: one seed is enough (and the decoder probe is the cost)
                recon = self.settings.recon
                entry["recon"] = {  # the untrained model's own loss: where every modality starts
                    m: own_decoder_loss(model, decoder_state(model.state_dict()), d.val, m, recon, self.device).loss
                    for m, d in self.data.modalities.items()
                }
                if recon.decoder_steps > 0:
                    entry["recon_refit"] = {
                        m: decoder_probe_loss(model, d.train, d.val, m, recon, self.device).loss
                        for m, d in self.data.modalities.items()
                    }
            randoms.append(entry)
            self.tracker.progress((seed + 1) / seeds, seed + 1, seeds, "baselines")
        result = {"eval_key": self.eval_key, "raw_pixels": pixels, "random_encoder": randoms}
        _write_json(path, result)
        self.tracker.end()
        return result


_METHOD_ONLY_FIELDS = {"method_config", "joint_steps", "seeds", "ablation_seeds", "grid_images"}


# Settings that only evaluation depends on: changing them re-evaluates stored artifacts, never retrains.
_EVAL_FIELDS = {"probes", "recon", "probe_tasks", "probe_max_per_class"}


def _fingerprint(settings: BenchSettings, data: BenchData) -> dict[str, Any]:
    """What every stored stage's training depends on: the shared settings and the data."""
    exclude = _METHOD_ONLY_FIELDS | _EVAL_FIELDS
    first = settings.first_stage_config(0).model_dump(mode="json", exclude={"seed", "replay", "inversion", "gate"})
    return {
        "settings": settings.model_dump(mode="json", exclude=exclude),
        "first_stage": first,
        "images": _image_digest(data),
    }


def _eval_key(settings: BenchSettings, data: BenchData) -> str:
    blob = json.dumps(
        {
            "eval": settings.model_dump(mode="json", include=_EVAL_FIELDS),
            "images": _image_digest(data),
            "tasks": _task_digest(data),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _method_print(settings: BenchSettings, method: str) -> dict[str, Any]:
    """The StageConfigs of a method's stages (seed 0): a stored run of another config is not reused."""
    spec = METHODS[method]
    stages = len(settings.order) if spec.sequential else 1
    exclude = {"seed"} if spec.uses_inversion else {"seed", "inversion", "gate"}
    return {
        "configs": [settings.config_for(method, 0, s).model_dump(mode="json", exclude=exclude) for s in range(stages)]
    }


def _check_print(path: Path, fingerprint: dict[str, Any], what: str) -> None:
    if path.is_file():
        if json.loads(path.read_text()) != _jsonable(fingerprint):
            raise BenchError(
                f"{path.parent} holds {what} run with other settings or data; choose a new --out folder "
                f"(or delete {path.parent} to train it again)"
            )
    else:
        _write_json(path, fingerprint)


def run_bench(
    *,
    settings: BenchSettings,
    methods: Sequence[str],
    data: BenchData,
    out_dir: Path,
    seeds: int | None = None,
    device: torch.device | str = "cpu",
    status: StatusSink = _ignore_status,
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
    _check_print(out / "runs" / "fingerprint.json", _fingerprint(settings, data), "a benchmark")
    for method in methods:
        _check_print(out / "runs" / method / "fingerprint.json", _method_print(settings, method), f"a {method}")
    started = time.perf_counter()
    per_method_seeds = {m: settings.seeds_for(m, seeds) for m in methods}
    max_seeds = max(per_method_seeds.values())
    # Core methods seed by seed first, the ablations last: an interrupted run still holds whole comparisons.
    jobs = sorted(
        ((METHODS[m].ablation, seed, methods.index(m), m) for m in methods for seed in range(per_method_seeds[m])),
    )
    index, parts = shard
    if not 0 <= index < parts:
        raise BenchError(f"shard {index}/{parts} does not exist; use i/n with 0 <= i < n")
    ablations = [job for job in jobs if job[0]]
    jobs = [
        job
        for job in jobs
        if (ablations.index(job) if job[0] else job[1]) % parts == index  # ablations one by one, core by seed
    ]
    run = _Run(
        settings,
        data,
        out,
        torch.device(device),
        _Tracker(0.0, status),
        events,
        _eval_key(settings, data),
        train_missing=not report_only,
    )
    total = _COST_EVAL_PER_MODALITY * len(settings.order) * max_seeds
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
        except _NotTrainedError as missing:
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

    results: dict[str, Any] = _jsonable(aggregate(settings, data, records, baselines, root=out, seed_ids=seed_ids))
    results["wall_seconds"] = wall_seconds
    results["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if figures:
        from invcoss_core.evaluation.plots import write_figures

        results["diagnostics"] = _jsonable(method_diagnostics(out, settings, data, records, device))
        results["figures"] = write_figures(results, data, out)
    _write_json(out / RESULTS_FILE, results)
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


# --- aggregation -------------------------------------------------------------------------------------------------


def _matrix(
    records: Sequence[StageRecord], rows: int, columns: Sequence[str], pick: Callable[[StageEval, str], float | None]
) -> np.ndarray:
    out = np.full((rows, len(columns)), math.nan)
    for s, record in enumerate(records):
        for j, name in enumerate(columns):
            value = pick(record.eval, name)
            if value is not None:
                out[s, j] = value
    return out


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def _ms(values: Sequence[float]) -> tuple[float, float]:
    stat = mean_sd(values)
    return stat.mean, stat.sd


def replay_bytes_real(data: BenchData, settings: BenchSettings, fraction: float = 0.05) -> int:
    """Bytes a real replay buffer of `fraction` of every stage's training set would hold (float16, as stored)."""
    total = 0
    for modality in settings.order:
        images = data.modalities[modality].train
        count = max(1, round(fraction * images.shape[0]))
        total += count * math.prod(images.shape[1:]) * 2
    return total


def _relative(path: str, root: Path | None) -> str:
    """`path` relative to the output folder when it lies inside it (results stay valid when the folder moves)."""
    if root is None or not Path(path).is_absolute():
        return path
    try:
        return str(Path(path).relative_to(Path(root).absolute()))
    except ValueError:
        return path


def aggregate(
    settings: BenchSettings,
    data: BenchData,
    records: Mapping[str, Sequence[Sequence[StageRecord]]],
    baselines: Mapping[str, Any],
    root: Path | None = None,
    seed_ids: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Turn per-seed stage records into the results dictionary (means ± sd over seeds).

    Layout: {"tasks", "task_modality", "task_stage", "modalities", "methods": {name: {"acc" (stage × task,
    linear probe), "acc_sd", "acc_knn", "acc_knn_sd", "recon" (stage × modality, own-stage decoder), "recon_sd",
    "recon_refit", "recon_refit_sd" (decoder probe; null when disabled), "avg_prev", "avg_prev_sd", "avg_prev_knn",
    "avg_prev_knn_sd", "avg_final", "bwt", "bwt_sd", "bwt_knn", "bwt_knn_sd", "recon_prev", "recon_prev_sd",
    "recon_increase", "recon_increase_sd", "handoff_bytes", "replay_bytes_real", "seconds", "seconds_sd",
    "inversion_seconds", "replay_seconds", "task_bwt", "task_bwt_sd", "task_bwt_knn", "task_bwt_knn_sd",
    "task_bwt_losses", "task_bwt_knn_losses" (per earlier task: mean, sd, seeds that lose; sequential methods
    only), "final_model" (relative to `root`), "seeds", "seed_ids" (the seed of each `per_seed` entry;
    `seed_ids[name]`, else 0, 1, ...), "stages", "per_seed"}}, "baselines", "forgetting", "compute_seconds"}.
    Joint has one row; its BWT is null.
    """
    order = settings.order
    tasks = [t.name for t in data.tasks]
    task_stage = [order.index(t.modality) for t in data.tasks]
    num_stages = len(order)
    real_bytes = replay_bytes_real(data, settings)
    methods: dict[str, Any] = {}
    for name, runs in records.items():
        if not runs:
            continue
        spec = METHODS[name]
        rows = num_stages if spec.sequential else 1
        lin = [_matrix(r, rows, tasks, lambda e, t: e.probes.get(t, {}).get("linear")) for r in runs]
        knn = [_matrix(r, rows, tasks, lambda e, t: e.probes.get(t, {}).get("knn")) for r in runs]
        rec = [_matrix(r, rows, list(order), lambda e, m: e.recon.get(m)) for r in runs]
        ref = [_matrix(r, rows, list(order), lambda e, m: e.recon_refit.get(m)) for r in runs]
        entry: dict[str, Any] = {
            "description": spec.description,
            "seeds": len(runs),
            "seed_ids": list(seed_ids[name]) if seed_ids and name in seed_ids else list(range(len(runs))),
            "stages": list(order) if spec.sequential else ["joint"],
        }
        for key, mats in (("acc", lin), ("acc_knn", knn), ("recon", rec), ("recon_refit", ref)):
            mean, sd = elementwise_mean_sd(mats)
            entry[key], entry[f"{key}_sd"] = mean, sd
        earlier = [m for m in range(num_stages - 1)]
        per_seed: dict[str, list[float]] = {
            "avg_prev": [avg_prev(m[-1], task_stage, num_stages) for m in lin],
            "avg_prev_knn": [avg_prev(m[-1], task_stage, num_stages) for m in knn],
            "avg_final": [float(np.nanmean(m[-1])) for m in lin],
            "recon_prev": [_nanmean(r[-1, earlier]) for r in rec],
            "recon_refit_prev": [_nanmean(r[-1, earlier]) for r in ref],
            "seconds": [sum(s.train_seconds + s.replay_seconds for s in r) for r in runs],
            "replay_seconds": [sum(s.replay_seconds for s in r) for r in runs],
        }
        if spec.sequential:
            per_seed["bwt"] = [backward_transfer(m, task_stage) for m in lin]
            per_seed["bwt_knn"] = [backward_transfer(m, task_stage) for m in knn]
            earlier_tasks = [j for j in range(len(tasks)) if task_stage[j] < num_stages - 1]
            for key, mats in (("task_bwt", lin), ("task_bwt_knn", knn)):
                per_task = [task_backward_transfer(m, task_stage) for m in mats]
                stats = {tasks[j]: _ms([row[j] for row in per_task]) for j in earlier_tasks}
                entry[key] = {t: mean for t, (mean, _sd) in stats.items()}
                entry[f"{key}_sd"] = {t: sd for t, (_mean, sd) in stats.items()}
                # How many seeds lose on each task: a consistency the mean ± sd does not show.
                entry[f"{key}_losses"] = {tasks[j]: sum(1 for row in per_task if row[j] < 0) for j in earlier_tasks}
            increases = [recon_increase(r, list(range(num_stages))) for r in rec]
            entry["recon_increase"] = {order[m]: _ms([inc[m] for inc in increases])[0] for m in earlier}
            entry["recon_increase_sd"] = {order[m]: _ms([inc[m] for inc in increases])[1] for m in earlier}
        else:
            per_seed["bwt"] = per_seed["bwt_knn"] = [math.nan for _ in runs]
            entry["recon_increase"] = entry["recon_increase_sd"] = {order[m]: None for m in earlier}
        for key, values in per_seed.items():
            entry[key], entry[f"{key}_sd"] = _ms(values)
        entry["per_seed"] = per_seed
        entry["handoff_bytes"] = max(s.handoff_bytes for s in runs[0])
        entry["replay_bytes_real"] = real_bytes
        entry["inversion_seconds"] = entry["replay_seconds"] if spec.uses_inversion else 0.0
        entry["final_model"] = _relative(runs[0][-1].artifact, root)
        entry["stage_metrics"] = [s.metrics for s in runs[0]]
        methods[name] = entry
    randoms = baselines.get("random_encoder", [])
    base = {
        "raw_pixels": {
            "acc": [baselines["raw_pixels"][t]["linear"] for t in tasks],
            "acc_knn": [baselines["raw_pixels"][t]["knn"] for t in tasks],
        },
        "random_encoder": {
            "seeds": len(randoms),
            "acc": [_ms([r["probes"][t]["linear"] for r in randoms])[0] for t in tasks],
            "acc_sd": [_ms([r["probes"][t]["linear"] for r in randoms])[1] for t in tasks],
            "acc_knn": [_ms([r["probes"][t]["knn"] for r in randoms])[0] for t in tasks],
            "recon": [_ms([r["recon"][m] for r in randoms if "recon" in r])[0] for m in order],
            "recon_refit": [_ms([r["recon_refit"][m] for r in randoms if "recon_refit" in r])[0] for m in order],
        },
    }
    return {
        "profile": settings.profile,
        "compute_seconds": compute_seconds(records),
        "modalities": list(order),
        "tasks": tasks,
        "task_modality": [t.modality for t in data.tasks],
        "task_stage": task_stage,
        "task_pseudo": [t.pseudo for t in data.tasks],
        "task_split": [t.split_note for t in data.tasks],
        "task_test_size": [int((~t.train_mask).sum()) for t in data.tasks],
        "task_folds": [min(settings.probes.folds, t.num_folds) for t in data.tasks],
        "primary_probe": PRIMARY_PROBE,
        "methods": methods,
        "baselines": base,
        "forgetting": forgetting_check(methods.get("finetune"), order, tasks, task_stage),
        "data": {
            "source": data.source,
            "notes": data.notes,
            "train_samples": {m: int(d.train.shape[0]) for m, d in data.modalities.items()},
            "val_samples": {m: int(d.val.shape[0]) for m, d in data.modalities.items()},
        },
        "settings": settings.model_dump(mode="json"),
    }


def compute_seconds(records: Mapping[str, Sequence[Sequence[StageRecord]]]) -> float:
    """Training + replay production + evaluation seconds of everything in `records`.

    The shared first stage of a seed (trained and evaluated once, reused by every sequential method) counts once.
    """
    total = 0.0
    shared: set[int] = set()
    for name, runs in records.items():
        for seed, run in enumerate(runs):
            for index, stage in enumerate(run):
                if METHODS[name].sequential and index == 0:
                    total += stage.replay_seconds
                    if seed not in shared:
                        shared.add(seed)
                        total += stage.train_seconds + stage.eval.seconds
                    continue
                total += stage.train_seconds + stage.replay_seconds + stage.eval.seconds
    return total


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _finite_max(values: Sequence[float]) -> float:
    """The largest finite value, NaN when there is none (one seed: the spread is unknown)."""
    finite = [float(v) for v in values if math.isfinite(float(v))]
    return max(finite) if finite else math.nan


def _beyond_twice(change: float, spread: float) -> bool:
    """A positive change larger than twice a known (finite) seed spread."""
    return bool(change > 0 and math.isfinite(spread) and change > 2 * spread)


def forgetting_check(
    finetune: Mapping[str, Any] | None, order: Sequence[str], tasks: Sequence[str], task_stage: Sequence[int]
) -> dict[str, Any]:
    """Is forgetting visible for sequential fine-tuning? The benchmark's precondition.

    For each earlier modality m: the rise of its held-out reconstruction loss from its own stage to the end must
    exceed twice the seed spread, spread = the largest sample sd over seeds among the own-stage value, the final
    value and the per-seed rise. For the probes, the mean accuracy drop over the earlier tasks (-BWT) must exceed
    twice the sd of BWT over seeds. With a single seed the spread is unknown and `visible` is null.
    """
    if finetune is None:
        return {"visible": None, "reason": "finetune was not run"}
    per_seed = finetune["per_seed"]
    seeds = int(finetune["seeds"])
    rec, rec_sd = np.asarray(finetune["recon"], dtype=float), np.asarray(finetune["recon_sd"], dtype=float)
    last = len(order) - 1
    modalities: dict[str, Any] = {}
    for m in range(last):
        rise = float(finetune["recon_increase"][order[m]])
        spread = _finite_max([rec_sd[m, m], rec_sd[last, m], _num(finetune["recon_increase_sd"][order[m]])])
        modalities[order[m]] = {
            "own_stage": float(rec[m, m]),
            "final": float(rec[last, m]),
            "rise": rise,
            "spread": spread,
            "visible": _beyond_twice(rise, spread),
        }
    drop = -_num(finetune["bwt"])
    drop_spread = _finite_max([_num(finetune["bwt_sd"])])
    probe_visible = _beyond_twice(drop, drop_spread)
    # The kNN probe, reported beside the primary (linear) probe; the verdict stays on the primary probe.
    knn_drop = -_num(finetune.get("bwt_knn"))
    knn_spread = _finite_max([_num(finetune.get("bwt_knn_sd"))])
    recon_visible = all(v["visible"] for v in modalities.values())
    # Per earlier task (reported, not part of the verdict): where the probes' forgetting is beyond the seed noise.
    per_task: dict[str, Any] = {}
    for probe, key in (("linear", "task_bwt"), ("knn", "task_bwt_knn")):
        for task, bwt in (finetune.get(key) or {}).items():
            task_drop, task_spread = -_num(bwt), _finite_max([_num(finetune[f"{key}_sd"][task])])
            found: dict[str, Any] = {
                "drop": task_drop,
                "spread": task_spread,
                "visible": _beyond_twice(task_drop, task_spread),
            }
            losses = (finetune.get(f"{key}_losses") or {}).get(task)
            if losses is not None and seeds > 0:
                found.update(losses=int(losses), of=seeds, sign_p=sign_test_p(int(losses), seeds))
            per_task.setdefault(task, {})[probe] = found
    return {
        "tasks": per_task,
        "seeds": seeds,
        "recon": modalities,
        "probe_drop": drop,
        "probe_drop_spread": drop_spread,
        "probe_visible": probe_visible,
        "knn_probe_drop": knn_drop,
        "knn_probe_drop_spread": knn_spread,
        "knn_probe_visible": _beyond_twice(knn_drop, knn_spread),
        "recon_visible": recon_visible,
        "visible": (recon_visible and probe_visible) if seeds > 1 else None,
        "bwt_per_seed": per_seed.get("bwt"),
    }
