"""Executing the plan: one stage of one method and seed, reused from disk or trained and evaluated."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from invcoss_core.artifact import Artifact, encode_artifact, read_artifact_dir, write_artifact_dir
from invcoss_core.common.events import EventSink, discard
from invcoss_core.config import StageConfig
from invcoss_core.data import TensorImages
from invcoss_core.evaluation.bench.status import (
    COST_EVAL_PER_MODALITY,
    COST_INVERSION_STEP,
    COST_JOINT_STEP,
    COST_REPLAY_STEP,
    BenchError,
    Tracker,
)
from invcoss_core.evaluation.bench.store import StageRecord, artifact_bytes, load_record, try_artifact, write_json
from invcoss_core.evaluation.data import BenchData
from invcoss_core.evaluation.evaluate import StageEval, evaluate_model, probe_model, probe_pixels
from invcoss_core.evaluation.joint import JointReplay
from invcoss_core.evaluation.recon import decoder_probe_loss, decoder_state, own_decoder_loss
from invcoss_core.evaluation.settings import BenchSettings, MethodSpec
from invcoss_core.inversion.synthesize import images_needed
from invcoss_core.replay import ReplayContext, ReplayStrategy, replay_class
from invcoss_core.training import load_student, run_stage
from invcoss_core.training.stage import seeded_model

# Training fields a method may change without invalidating the shared first stage (they act on replay only).
REPLAY_ONLY_TRAIN_FIELDS = ("replay_batch_size", "distill_weight", "replay_mae_weight", "mixup")


class NotTrainedError(Exception):
    """A stage that `report_only` would have had to train."""


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


@dataclass
class BenchRun:
    settings: BenchSettings
    data: BenchData
    out: Path
    device: torch.device
    tracker: Tracker
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
            return s.joint_steps * COST_JOINT_STEP + COST_EVAL_PER_MODALITY * len(self.order)
        units = 10.0  # k-means, Fisher, artifact writing
        if stage > 0:  # the shared first stage's training and evaluation are counted once per seed
            factor = 1.0 if spec.replay == "none" else COST_REPLAY_STEP
            units += s.stage_steps[stage] * factor + COST_EVAL_PER_MODALITY * (stage + 1)
        if spec.uses_inversion:
            inv = s.config_for(spec.name, 0, stage).inversion
            count = images_needed(inv, int(self.data.modalities[self.order[stage]].train.shape[0]))
            batches = max(1, math.ceil(count / inv.batch_size))
            iterations = (
                inv.iterations * batches
                if spec.replay == "pixel_inversion"
                else (inv.iterations + (batches - 1) * inv.iterations_per_batch)
            )
            units += COST_INVERSION_STEP * iterations
        return units

    def first_stage_units(self) -> float:
        return self.settings.stage_steps[0] + COST_EVAL_PER_MODALITY

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
        artifact = try_artifact(path)
        if artifact is not None and parent is not None and artifact.manifest.parent_sha256 != parent.sha256:
            artifact = None  # trained from another previous stage: stale
        record = load_record(record_path, artifact)
        if artifact is not None and record is not None and record.eval_key == self.eval_key:
            self.tracker.skip(units)
            return artifact, record
        if artifact is None and not self.train_missing:
            raise NotTrainedError(path)
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
            handoff_bytes=artifact_bytes(path),
            metrics=metrics,
        )
        write_json(record_path, record.to_json())
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
        for key in REPLAY_ONLY_TRAIN_FIELDS:
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
            COST_EVAL_PER_MODALITY * len(self.order) * seeds,
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
        write_json(path, result)
        self.tracker.end()
        return result
