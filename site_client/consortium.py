"""One consortium step on a site, independent of Flower: verify, run the method step, sign a receipt.

A consortium stage (DESIGN §7) asks each of its sites for a sequence of steps (`invcoss_core.common.protocol.STEPS`).
What leaves the site in each: `round` — its locally trained weights and sample count; `stats` — count, sum and
sum of squares of the final model's block inputs on its images; `invert` (the inversion site) — candidate
synthetic images and its own verdicts; `gate` — one pass/block verdict per candidate, never a similarity;
`finalize` (the inversion site) — the signed stage artifact with the images every site passed. Every reply
carries a receipt signed with the site's key (`Receipt`).

State lives beside the one-site stage's, in `work_dir/runs/<run_id>/stage-<k>/`: the verified parent artifact
(`incoming/`, kept after the first message so later rounds do not carry it again), the optimizer state after the
last round (`rounds/optimizer`), each finished round's reply (`rounds/round-<r>/`, re-sent when the coordinator
asks for the same round from the same weights again, e.g. after its restart), and the candidates this site
synthesised (`candidates.safetensors`, the only images `finalize` will sign).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch.utils.data import Dataset

from invcoss_core.artifact import Artifact, decode_artifact, read_artifact_files, sha256_hex, write_artifact_dir
from invcoss_core.common.protocol import (
    CANDIDATES_FILE,
    STATS_FILE,
    WEIGHTS_FILE,
    Receipt,
    StepReply,
    StepRequest,
    payload_digest,
)
from invcoss_core.common.signing import PrivateKey, sign_bytes
from invcoss_core.config import StageConfig
from invcoss_core.consortium import (
    Verdicts,
    consortium_artifact,
    gate_verdicts,
    round_config,
    site_sufficient_stats,
    synthesize_candidates,
    train_round,
)
from invcoss_core.privacy import AuditInputs, hold_message, split_for_audit
from invcoss_core.stats import SufficientStats
from invcoss_core.training.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from site_client.config import SiteConfig
from site_client.metrics import SiteEvents
from site_client.runner import RefusedError, StagePaths, resolve_device, resolve_stage_config, stage_lock, stage_paths
from site_client.runner import verify_incoming as verify_parent

logger = logging.getLogger(__name__)

__all__ = ["run_site_step"]


def _tensors(name: str, payload: Mapping[str, bytes]) -> dict[str, torch.Tensor]:
    if name not in payload:
        raise RefusedError(f"the request carries no {name}")
    try:
        return dict(st_load(payload[name]))
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise RefusedError(f"{name} is not a valid safetensors file: {err}") from None


def _weights(payload: Mapping[str, bytes]) -> dict[str, torch.Tensor]:
    weights = _tensors(WEIGHTS_FILE, payload)
    for key, value in weights.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise RefusedError(f"the coordinator's weights hold NaN or inf ({key}); refusing to train on them")
    return weights


def _incoming(cfg: SiteConfig, request: StepRequest, paths: StagePaths) -> Artifact | None:
    """The verified parent artifact: from the request, or as kept on disk from an earlier step (re-verified)."""
    stored = paths.root / "incoming"
    files = request.files
    if not files and request.stage_index > 1:
        if not (stored / "manifest.json").is_file():
            raise RefusedError(f"stage {request.stage_index}: this site does not hold the parent artifact yet")
        files = read_artifact_files(stored)
    artifact = verify_parent(cfg, request.as_stage_request(files))
    if request.files and artifact is not None:
        write_artifact_dir(request.files, stored)
    return artifact


@dataclass(frozen=True)
class _Step:
    """Everything one step on this site works with."""

    cfg: SiteConfig
    request: StepRequest
    config: StageConfig
    paths: StagePaths
    incoming: Artifact | None
    key: PrivateKey
    events: SiteEvents
    device: torch.device

    def reply(
        self,
        payload: Mapping[str, bytes],
        *,
        num_examples: int = 0,
        metrics: Mapping[str, float] | None = None,
        verdicts: list[bool] | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> StepReply:
        """The signed reply: payload and files, with a receipt binding them to this very request."""
        request = self.request
        receipt = Receipt(
            run_id=request.run_id,
            stage_index=request.stage_index,
            step=request.step,
            round=request.round,
            site=request.site,
            base_sha256=payload_digest(request.payload),
            files={name: sha256_hex(data) for name, data in sorted(payload.items())},
            num_examples=num_examples,
            metrics={k: float(v) for k, v in (metrics or {}).items()},
            verdicts=list(verdicts or []),
        )
        data = receipt.to_bytes()
        signature = sign_bytes(self.key, data)
        return StepReply(status="ok", payload=dict(payload), files=dict(files or {}), receipt=data, signature=signature)

    def split(self, config: StageConfig | None = None) -> tuple[Dataset[torch.Tensor], AuditInputs]:
        """This site's training images minus its audit subjects, and the audit's inputs (`privacy.audit_fraction`).

        Every step of every site uses the same split (same seed), so audit subjects never train the stage.
        """
        from invcoss_core.data import load_site_dataset

        cfg, config = self.cfg, config or self.config
        spec = config.model.spec(cfg.modality)
        data = load_site_dataset(cfg.data_dir, cfg.modality, spec, config.data, split="train", seed=config.seed)
        return split_for_audit(data, config.privacy.audit_fraction, config.seed)

    def dataset(self, config: StageConfig | None = None) -> Dataset[torch.Tensor]:
        """This site's training images (never leave the site)."""
        return self.split(config)[0]

    def pooled(self) -> SufficientStats:
        """The pooled sufficient statistics of the request's payload."""
        model = self.config.model
        try:
            tensors = _tensors(STATS_FILE, self.request.payload)
            return SufficientStats.from_tensors(tensors, self.cfg.modality, model.num_layers, model.hidden_size)
        except ValueError as err:
            raise RefusedError(f"pooled statistics refused: {err}") from None

    def candidates(self) -> torch.Tensor:
        """The request's candidate pool: one finite float16 pool of this site's modality."""
        tensors = _tensors(CANDIDATES_FILE, self.request.payload)
        modality = self.cfg.modality
        images = tensors.get(modality)
        spec = self.config.model.spec(modality)
        if set(tensors) != {modality} or images is None or tuple(images.shape[1:]) != spec.input_shape:
            raise RefusedError(f"{CANDIDATES_FILE} must hold one {modality} pool of shape (N, {spec.input_shape})")
        if images.dtype != torch.float16 or not bool(torch.isfinite(images).all()):
            raise RefusedError(f"{CANDIDATES_FILE} must hold finite float16 images")
        return images


def _round(step: _Step) -> StepReply:
    request, paths = step.request, step.paths
    if not 1 <= request.round <= request.rounds:
        raise RefusedError(f"round {request.round} is outside 1..{request.rounds}")
    done = paths.root / "rounds" / f"round-{request.round:03d}"
    base = payload_digest(request.payload)
    if (done / "reply.json").is_file():
        kept = json.loads((done / "reply.json").read_text())
        if kept.get("base_sha256") == base:
            logger.info("round %d already trained from these weights: sending the same reply", request.round)
            payload = {WEIGHTS_FILE: (done / WEIGHTS_FILE).read_bytes()}
            return step.reply(payload, num_examples=int(kept["num_examples"]), metrics=kept["metrics"])
    weights = _weights(request.payload)
    rcfg = round_config(step.config, request.rounds, request.local_steps, request.local_epochs)
    optimizer_dir = paths.root / "rounds" / "optimizer"
    fingerprint = f"{request.run_id}/{request.stage_index}/{step.cfg.site}"
    optimizer_state = None
    try:
        previous = load_checkpoint(optimizer_dir, fingerprint)
        if previous is not None and previous.epoch == request.round - 1:
            optimizer_state = previous.optimizer
    except CheckpointError as err:
        logger.warning("optimizer state of the last round is unusable (%s); this round starts a fresh one", err)
    step.events.emit("round_started", stage=request.stage_index, round=request.round)
    result = train_round(
        config=rcfg,
        modality=step.cfg.modality,
        train_data=step.dataset(rcfg),
        incoming=step.incoming,
        global_weights=weights,
        round_index=request.round,
        epochs_per_round=request.local_epochs,
        run_id=request.run_id,
        device=step.device,
        optimizer_state=optimizer_state,
        events=step.events.progress,
    )
    save_checkpoint(optimizer_dir, Checkpoint(request.round, fingerprint, {}, result.optimizer_state, {}))
    metrics = {"loss": result.loss, "seconds": result.seconds}
    if result.replay_loss is not None:
        metrics["replay_loss"] = result.replay_loss
    payload = {WEIGHTS_FILE: st_save(result.weights, metadata={"format": "pt"})}
    done.mkdir(parents=True, exist_ok=True)
    (done / WEIGHTS_FILE).write_bytes(payload[WEIGHTS_FILE])
    kept = {"base_sha256": base, "num_examples": result.num_examples, "metrics": metrics}
    (done / "reply.json").write_text(json.dumps(kept))
    step.events.emit("round_finished", stage=request.stage_index, round=request.round, loss=result.loss)
    return step.reply(payload, num_examples=result.num_examples, metrics=metrics)


def _stats(step: _Step) -> StepReply:
    started = time.perf_counter()
    data = step.dataset()
    stats = site_sufficient_stats(step.config, step.cfg.modality, data, _weights(step.request.payload), step.device)
    count = len(data)  # type: ignore[arg-type]  # map-style datasets define __len__
    seconds = time.perf_counter() - started
    return step.reply({STATS_FILE: st_save(stats.to_tensors())}, num_examples=count, metrics={"seconds": seconds})


def _gate(step: _Step, candidates: torch.Tensor) -> Verdicts:
    verdicts = gate_verdicts(
        config=step.config,
        modality=step.cfg.modality,
        weights=_weights(step.request.payload),
        candidates=candidates,
        real_data=step.dataset(),
        device=step.device,
    )
    step.events.emit("gate", stage=step.request.stage_index, checked=len(verdicts.passed), blocked=verdicts.blocked)
    return verdicts


def _invert(step: _Step) -> StepReply:
    request, cfg = step.request, step.cfg
    if request.num_images < 1:
        raise RefusedError("an inversion step must ask for at least one image")
    images, metrics = synthesize_candidates(
        config=step.config,
        modality=cfg.modality,
        weights=_weights(request.payload),
        stats=step.pooled().to_stats(),
        num_images=request.num_images,
        stage_index=request.stage_index,
        device=step.device,
        events=step.events.progress,
    )
    own = _gate(step, images)
    payload = {CANDIDATES_FILE: st_save({cfg.modality: images})}
    (step.paths.root / CANDIDATES_FILE).write_bytes(payload[CANDIDATES_FILE])
    (step.paths.root / "verdicts.json").write_text(json.dumps(own.passed))
    count = int(images.shape[0])
    return step.reply(payload, num_examples=count, metrics=metrics, verdicts=own.passed)


def _finalize(step: _Step) -> StepReply:
    request, cfg, paths = step.request, step.cfg, step.paths
    candidates = torch.zeros(0, *step.config.model.spec(cfg.modality).input_shape, dtype=torch.float16)
    verdicts = dict(request.verdicts)
    if CANDIDATES_FILE in request.payload:
        own = paths.root / CANDIDATES_FILE
        if not own.is_file() or own.read_bytes() != request.payload[CANDIDATES_FILE]:
            raise RefusedError("the candidates to release are not the ones this site synthesised; refusing to sign")
        candidates = step.candidates()
        verdicts[cfg.site] = json.loads((paths.root / "verdicts.json").read_text())  # its own, as it found them
    elif cfg.site not in verdicts:
        verdicts[cfg.site] = []
    for site, answer in verdicts.items():
        if len(answer) != candidates.shape[0]:
            raise RefusedError(f"site {site} sent {len(answer)} verdicts for {candidates.shape[0]} candidates")
    passed = [all(v[i] for v in verdicts.values()) for i in range(candidates.shape[0])]
    members, audit = step.split()
    files = consortium_artifact(
        config=step.config,
        modality=cfg.modality,
        weights=_weights(request.payload),
        pooled_stats=step.pooled().to_stats(),
        incoming=step.incoming,
        candidates=candidates,
        passed=passed,
        blocked_by_site={site: sum(not x for x in v) for site, v in sorted(verdicts.items())},
        run_id=request.run_id,
        stage_index=request.stage_index,
        site=cfg.site,
        real_data=members,
        audit=audit,
        device=step.device,
        signer=lambda data: sign_bytes(step.key, data),
        metrics={"consortium_sites": float(len(verdicts)), "rounds": float(request.rounds)},
    )
    artifact = decode_artifact(files, public_key=step.key.public_key(), require_signature=True)
    if artifact.manifest.contains_real_data:
        raise RefusedError("the stage produced an artifact with real images; it does not leave the site")
    privacy = artifact.manifest.privacy
    if privacy is not None:
        step.events.emit("privacy", stage=request.stage_index, decision=privacy.decision)
        held = hold_message(privacy)
        if held is not None:  # nothing is stored as finished: a retry signs again (under the site's new settings)
            raise RefusedError(held)
    write_artifact_dir(files, paths.artifact)
    result = {"artifact_sha256": artifact.sha256, "parent_sha256": request.parent_sha256, "consortium": True}
    paths.result.write_text(json.dumps(result, indent=2))
    step.events.emit("stage_signed", stage=request.stage_index, released=sum(passed), checked=len(passed))
    return step.reply({}, files=files, num_examples=sum(passed))


_STEPS = {"round": _round, "stats": _stats, "invert": _invert, "finalize": _finalize}


def run_site_step(cfg: SiteConfig, request: StepRequest, private_key: PrivateKey, events: SiteEvents) -> StepReply:
    """Run one consortium step on this site's data and return the signed reply.

    Raises:
        RefusedError: policy or verification refusal (wrong site, modality, parent, payload, step).
        ConfigError, StageError, SiteDataError, ArtifactError: the step cannot run (reported as failed).
    """
    if request.site != cfg.site:
        raise RefusedError(f"request addressed to site {request.site!r}, this is site {cfg.site!r}")
    if request.modality is not None and request.modality != cfg.modality:
        raise RefusedError(f"the plan asks for modality {request.modality!r}; this site holds {cfg.modality!r}")
    if request.step not in (*_STEPS, "gate"):
        raise RefusedError(f"unknown consortium step {request.step!r}")
    config = resolve_stage_config(cfg, request.as_stage_request())
    paths = stage_paths(cfg, request.run_id, request.stage_index)
    with stage_lock(cfg):
        paths.root.mkdir(parents=True, exist_ok=True)
        step = _Step(
            cfg, request, config, paths, _incoming(cfg, request, paths), private_key, events, resolve_device(cfg.device)
        )
        if request.step == "gate":
            verdicts = _gate(step, step.candidates())
            return step.reply({}, verdicts=verdicts.passed, metrics={"seconds": verdicts.seconds})
        return _STEPS[request.step](step)
