"""One consortium step on a site, independent of Flower: verify, run the method step, sign a receipt.

A consortium stage (DESIGN §7) asks each of its sites for a sequence of steps (`invcoss_core.protocol.STEPS`).
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

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch.utils.data import Dataset

from invcoss_core.artifact import Artifact, decode_artifact, read_artifact_files, sha256_hex, write_artifact_dir
from invcoss_core.config import StageConfig
from invcoss_core.consortium import (
    consortium_artifact,
    gate_verdicts,
    round_config,
    site_sufficient_stats,
    synthesize_candidates,
    train_round,
)
from invcoss_core.protocol import (
    CANDIDATES_FILE,
    STATS_FILE,
    WEIGHTS_FILE,
    Receipt,
    StageRequest,
    StepReply,
    StepRequest,
    payload_digest,
)
from invcoss_core.signing import PrivateKey, sign_bytes
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


def _as_stage_request(request: StepRequest, files: Mapping[str, bytes]) -> StageRequest:
    return StageRequest(
        run_id=request.run_id,
        stage_index=request.stage_index,
        site=request.site,
        modality=request.modality,
        profile=request.profile,
        settings=request.settings,
        attempt=request.attempt,
        parent_sha256=request.parent_sha256,
        parent_site=request.parent_site,
        parent_parent_sha256=request.parent_parent_sha256,
        parent_public_key=request.parent_public_key,
        files=dict(files),
    )


def _incoming(cfg: SiteConfig, request: StepRequest, paths: StagePaths) -> Artifact | None:
    """The verified parent artifact: from the request, or as kept on disk from an earlier step (re-verified)."""
    stored = paths.root / "incoming"
    files = request.files
    if not files and request.stage_index > 1:
        if not (stored / "manifest.json").is_file():
            raise RefusedError(f"stage {request.stage_index}: this site does not hold the parent artifact yet")
        files = read_artifact_files(stored)
    artifact = verify_parent(cfg, _as_stage_request(request, files))
    if request.files and artifact is not None:
        write_artifact_dir(request.files, stored)
    return artifact


def _sign(private_key: PrivateKey, receipt: Receipt) -> tuple[bytes, bytes]:
    data = receipt.to_bytes()
    return data, sign_bytes(private_key, data)


def _reply(
    private_key: PrivateKey,
    request: StepRequest,
    payload: Mapping[str, bytes],
    *,
    num_examples: int = 0,
    metrics: Mapping[str, float] | None = None,
    verdicts: list[bool] | None = None,
    files: Mapping[str, bytes] | None = None,
) -> StepReply:
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
    data, signature = _sign(private_key, receipt)
    return StepReply(status="ok", payload=dict(payload), files=dict(files or {}), receipt=data, signature=signature)


def _round(
    cfg: SiteConfig,
    request: StepRequest,
    config: StageConfig,
    paths: StagePaths,
    incoming: Artifact | None,
    private_key: PrivateKey,
    events: SiteEvents,
) -> StepReply:
    if not 1 <= request.round <= request.rounds:
        raise RefusedError(f"round {request.round} is outside 1..{request.rounds}")
    done = paths.root / "rounds" / f"round-{request.round:03d}"
    base = payload_digest(request.payload)
    if (done / "reply.json").is_file():
        kept = json.loads((done / "reply.json").read_text())
        if kept.get("base_sha256") == base:
            logger.info("round %d already trained from these weights: sending the same reply", request.round)
            payload = {WEIGHTS_FILE: (done / WEIGHTS_FILE).read_bytes()}
            return _reply(
                private_key, request, payload, num_examples=int(kept["num_examples"]), metrics=kept["metrics"]
            )
    weights = _weights(request.payload)
    rcfg = round_config(config, request.rounds, request.local_steps, request.local_epochs)
    device = resolve_device(cfg.device)
    dataset = _dataset(cfg, rcfg)
    optimizer_dir = paths.root / "rounds" / "optimizer"
    fingerprint = f"{request.run_id}/{request.stage_index}/{cfg.site}"
    optimizer_state = None
    try:
        previous = load_checkpoint(optimizer_dir, fingerprint)
        if previous is not None and previous.epoch == request.round - 1:
            optimizer_state = previous.optimizer
    except CheckpointError as err:
        logger.warning("optimizer state of the last round is unusable (%s); this round starts a fresh one", err)
    events.emit("round_started", stage=request.stage_index, round=request.round)
    result = train_round(
        config=rcfg,
        modality=cfg.modality,
        train_data=dataset,
        incoming=incoming,
        global_weights=weights,
        round_index=request.round,
        epochs_per_round=request.local_epochs,
        run_id=request.run_id,
        device=device,
        optimizer_state=optimizer_state,
        events=events.progress,
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
    events.emit("round_finished", stage=request.stage_index, round=request.round, loss=result.loss)
    return _reply(private_key, request, payload, num_examples=result.num_examples, metrics=metrics)


def _dataset(cfg: SiteConfig, config: StageConfig) -> Dataset[torch.Tensor]:
    from invcoss_core.data import load_site_dataset

    return load_site_dataset(
        cfg.data_dir, cfg.modality, config.model.spec(cfg.modality), config.data, split="train", seed=config.seed
    )


def _candidates(payload: Mapping[str, bytes], modality: str, config: StageConfig) -> torch.Tensor:
    tensors = _tensors(CANDIDATES_FILE, payload)
    images = tensors.get(modality)
    spec = config.model.spec(modality)
    if set(tensors) != {modality} or images is None or tuple(images.shape[1:]) != spec.input_shape:
        raise RefusedError(f"{CANDIDATES_FILE} must hold one {modality} pool of shape (N, {spec.input_shape})")
    if images.dtype != torch.float16 or not bool(torch.isfinite(images).all()):
        raise RefusedError(f"{CANDIDATES_FILE} must hold finite float16 images")
    return images


def run_site_step(cfg: SiteConfig, request: StepRequest, private_key: PrivateKey, events: SiteEvents) -> StepReply:
    """Run one consortium step on this site's data and return the signed reply.

    Raises:
        RefusedError: policy or verification refusal (wrong site, modality, parent, payload).
        ConfigError, StageError, SiteDataError, ArtifactError: the step cannot run (reported as failed).
    """
    if request.site != cfg.site:
        raise RefusedError(f"request addressed to site {request.site!r}, this is site {cfg.site!r}")
    if request.modality is not None and request.modality != cfg.modality:
        raise RefusedError(f"the plan asks for modality {request.modality!r}; this site holds {cfg.modality!r}")
    config = resolve_stage_config(cfg, _as_stage_request(request, {}))
    paths = stage_paths(cfg, request.run_id, request.stage_index)
    device = resolve_device(cfg.device)
    with stage_lock(cfg):
        paths.root.mkdir(parents=True, exist_ok=True)
        incoming = _incoming(cfg, request, paths)
        started = time.perf_counter()
        if request.step == "round":
            return _round(cfg, request, config, paths, incoming, private_key, events)
        if request.step == "stats":
            data = _dataset(cfg, config)
            stats = site_sufficient_stats(config, cfg.modality, data, _weights(request.payload), device)
            payload = {STATS_FILE: st_save(stats.to_tensors())}
            seconds = time.perf_counter() - started
            count = len(data)  # type: ignore[arg-type]  # map-style datasets define __len__
            return _reply(private_key, request, payload, num_examples=count, metrics={"seconds": seconds})
        if request.step == "invert":
            return _invert(cfg, request, config, paths, private_key, events, device)
        if request.step == "gate":
            verdicts = gate_verdicts(
                config=config,
                modality=cfg.modality,
                weights=_weights(request.payload),
                candidates=_candidates(request.payload, cfg.modality, config),
                real_data=_dataset(cfg, config),
                device=device,
            )
            events.emit("gate", stage=request.stage_index, checked=len(verdicts.passed), blocked=verdicts.blocked)
            return _reply(private_key, request, {}, verdicts=verdicts.passed, metrics={"seconds": verdicts.seconds})
        if request.step == "finalize":
            return _finalize(cfg, request, config, paths, incoming, private_key, events, device)
    raise RefusedError(f"unknown consortium step {request.step!r}")


def _invert(
    cfg: SiteConfig,
    request: StepRequest,
    config: StageConfig,
    paths: StagePaths,
    private_key: PrivateKey,
    events: SiteEvents,
    device: torch.device,
) -> StepReply:
    if request.num_images < 1:
        raise RefusedError("an inversion step must ask for at least one image")
    weights = _weights(request.payload)
    width, depth = config.model.hidden_size, config.model.num_layers
    try:
        pooled = SufficientStats.from_tensors(_tensors(STATS_FILE, request.payload), cfg.modality, depth, width)
    except ValueError as err:
        raise RefusedError(f"pooled statistics refused: {err}") from None
    images, metrics = synthesize_candidates(
        config=config,
        modality=cfg.modality,
        weights=weights,
        stats=pooled.to_stats(),
        num_images=request.num_images,
        stage_index=request.stage_index,
        device=device,
        events=events.progress,
    )
    own = gate_verdicts(
        config=config,
        modality=cfg.modality,
        weights=weights,
        candidates=images,
        real_data=_dataset(cfg, config),
        device=device,
    )
    payload = {CANDIDATES_FILE: st_save({cfg.modality: images})}
    (paths.root / CANDIDATES_FILE).write_bytes(payload[CANDIDATES_FILE])
    events.emit("gate", stage=request.stage_index, checked=len(own.passed), blocked=own.blocked)
    return _reply(
        private_key, request, payload, num_examples=int(images.shape[0]), metrics=metrics, verdicts=own.passed
    )


def _finalize(
    cfg: SiteConfig,
    request: StepRequest,
    config: StageConfig,
    paths: StagePaths,
    incoming: Artifact | None,
    private_key: PrivateKey,
    events: SiteEvents,
    device: torch.device,
) -> StepReply:
    weights = _weights(request.payload)
    width, depth = config.model.hidden_size, config.model.num_layers
    try:
        pooled = SufficientStats.from_tensors(_tensors(STATS_FILE, request.payload), cfg.modality, depth, width)
    except ValueError as err:
        raise RefusedError(f"pooled statistics refused: {err}") from None
    candidates = torch.zeros(0, *config.model.spec(cfg.modality).input_shape, dtype=torch.float16)
    if CANDIDATES_FILE in request.payload:
        own = paths.root / CANDIDATES_FILE
        if not own.is_file() or own.read_bytes() != request.payload[CANDIDATES_FILE]:
            raise RefusedError("the candidates to release are not the ones this site synthesised; refusing to sign")
        candidates = _candidates(request.payload, cfg.modality, config)
    if cfg.site not in request.verdicts:
        raise RefusedError("finalize must carry this site's own verdicts too")
    for site, verdicts in request.verdicts.items():
        if len(verdicts) != candidates.shape[0]:
            raise RefusedError(f"site {site} sent {len(verdicts)} verdicts for {candidates.shape[0]} candidates")
    passed = [all(v[i] for v in request.verdicts.values()) for i in range(candidates.shape[0])]
    files = consortium_artifact(
        config=config,
        modality=cfg.modality,
        weights=weights,
        pooled_stats=pooled.to_stats(),
        incoming=incoming,
        candidates=candidates,
        passed=passed,
        blocked_by_site={site: sum(not x for x in v) for site, v in sorted(request.verdicts.items())},
        run_id=request.run_id,
        stage_index=request.stage_index,
        site=cfg.site,
        real_data=_dataset(cfg, config),
        device=device,
        signer=lambda data: sign_bytes(private_key, data),
        metrics={"consortium_sites": float(len(request.verdicts)), "rounds": float(request.rounds)},
    )
    artifact = decode_artifact(files, public_key=private_key.public_key(), require_signature=True)
    if artifact.manifest.contains_real_data:
        raise RefusedError("the stage produced an artifact with real images; it does not leave the site")
    write_artifact_dir(files, paths.artifact)
    result = {"artifact_sha256": artifact.sha256, "parent_sha256": request.parent_sha256, "consortium": True}
    paths.result.write_text(json.dumps(result, indent=2))
    events.emit("stage_signed", stage=request.stage_index, released=sum(passed), checked=len(passed))
    return _reply(private_key, request, {}, files=files, num_examples=sum(passed))
