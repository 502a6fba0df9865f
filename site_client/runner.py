"""One stage on a site, independent of Flower: check policy, verify the incoming artifact, train, hand off.

Trust on the site side: the incoming artifact must verify with the producing site's key as sent by the
coordinator (which the site reaches over TLS checked against the federation CA; a key pinned locally in
`trust.pinned_keys_dir` must match), its manifest must be the announced one (sha256) and the expected link of
the run (run id, stage index, parent digest, producing site), and it must carry no real images. Policy: the site
refuses `real_buffer` replay, for the stage it is asked to run and for anything it receives.

State lives in `work_dir/runs/<run_id>/stage-<k>/` (epoch checkpoints, the finished artifact, result.json), so a
new ClientApp process for a retried message resumes from the last epoch, and a repeated request for a finished
stage with the same parent returns the same artifact without training again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from cryptography.exceptions import UnsupportedAlgorithm

from invcoss_core.artifact import (
    Artifact,
    ArtifactError,
    check_lineage,
    decode_artifact,
    read_artifact_files,
)
from invcoss_core.common.protocol import StageReply, StageRequest
from invcoss_core.common.signing import (
    PrivateKey,
    SigningKeyError,
    load_public_key,
    parse_public_key,
    public_key_openssh,
    sign_bytes,
)
from invcoss_core.config import ConfigError, StageConfig, build_config, deep_merge
from invcoss_core.privacy import PrivacyReport, hold_message, split_for_audit
from invcoss_core.replay import ReplayError, replay_class
from invcoss_core.training import StageError, run_stage
from site_client.config import SiteConfig
from site_client.metrics import SiteEvents

logger = logging.getLogger(__name__)

SITE_ONLY_PRIVACY = frozenset({"max_mia_auc", "release_above_max"})  # `privacy` keys only site.toml may set
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class RefusedError(Exception):
    """The site refuses a request (verification or policy); the message says why."""


@dataclass(frozen=True)
class StagePaths:
    """Where one stage of one run keeps its state on the site."""

    root: Path

    @property
    def artifact(self) -> Path:
        return self.root / "artifact"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def result(self) -> Path:
        return self.root / "result.json"

    @property
    def config(self) -> Path:
        return self.root / "stage-config.json"


def stage_paths(cfg: SiteConfig, run_id: str, stage_index: int) -> StagePaths:
    """The stage folder of (run, stage) in the site's work dir.

    Raises:
        RefusedError: for a run id that is not a plain name (it becomes a folder name).
    """
    if not RUN_ID.match(run_id) or ".." in run_id:
        raise RefusedError(f"run id {run_id!r} is not a plain name")
    return StagePaths(cfg.work_dir / "runs" / run_id / f"stage-{stage_index:02d}")


def resolve_stage_config(cfg: SiteConfig, request: StageRequest) -> StageConfig:
    """The coordinator's stage settings with the site's local `[stage]` overrides on top, policy-checked.

    Raises:
        RefusedError: for a replay strategy that would ship real images.
        ConfigError: for invalid settings.
    """
    settings = dict(request.settings)
    privacy = settings.get("privacy")
    if isinstance(privacy, dict) and set(privacy) & SITE_ONLY_PRIVACY:
        # Releasing a held hand-off, or loosening what holds it, is the site operator's decision alone.
        logger.warning(
            "ignoring the coordinator's privacy.%s: only this site's [stage.privacy] sets them",
            ", privacy.".join(sorted(set(privacy) & SITE_ONLY_PRIVACY)),
        )
        settings["privacy"] = {k: v for k, v in privacy.items() if k not in SITE_ONLY_PRIVACY}
    config = build_config(
        request.profile,
        deep_merge(settings, cfg.stage),
        source=f"stage {request.stage_index} settings (coordinator + site [stage])",
    )
    try:
        ships_real = replay_class(config.replay.strategy).ships_real_data
    except ReplayError as err:
        raise ConfigError(str(err)) from None
    if ships_real:
        raise RefusedError(
            f"replay strategy {config.replay.strategy!r} would send real images off the site; this site refuses it"
        )
    return config


def verify_incoming(cfg: SiteConfig, request: StageRequest) -> Artifact | None:
    """Verify the parent artifact a stage request carries (None for stage 1).

    Raises:
        RefusedError: naming what failed (missing key, pinned-key mismatch, signature, hashes, announced digest,
            replayed or reordered stage, wrong parent, wrong producing site, real images).
    """
    k = request.stage_index
    if k == 1:
        if request.files or request.parent_sha256:
            raise RefusedError("stage 1 must not come with a parent artifact")
        return None
    if not request.files:
        raise RefusedError(f"stage {k} request carries no parent artifact")
    if not request.parent_public_key or not request.parent_site:
        raise RefusedError(f"stage {k} request does not say which site produced the parent, or its key")
    try:
        key = parse_public_key(request.parent_public_key.encode(), source=f"key of site {request.parent_site}")
        pinned_dir = cfg.trust.pinned_keys_dir
        if pinned_dir is not None and (pinned_dir / f"{request.parent_site}.pub").is_file():
            pinned = load_public_key(pinned_dir / f"{request.parent_site}.pub")
            if public_key_openssh(pinned) != public_key_openssh(key):
                raise RefusedError(
                    f"the coordinator sent a key for site {request.parent_site} that differs from "
                    "the key pinned on this site"
                )
        artifact = decode_artifact(
            request.files,
            public_key=key,
            require_signature=True,
            source=f"incoming stage {k - 1} artifact from site {request.parent_site}",
        )
        if artifact.sha256 != request.parent_sha256:
            raise RefusedError(
                f"the incoming artifact's manifest sha256 {artifact.sha256[:16]}… is not the announced parent "
                f"{(request.parent_sha256 or 'none')[:16]}…"
            )
        check_lineage(
            artifact,
            run_id=request.run_id,
            stage_index=k - 1,
            parent_sha256=request.parent_parent_sha256,
            site=request.parent_site,
        )
    except (ArtifactError, SigningKeyError, UnsupportedAlgorithm) as err:
        raise RefusedError(f"incoming artifact refused: {err}") from None
    if artifact.manifest.contains_real_data:
        raise RefusedError("incoming artifact contains real images (real_buffer); this site refuses it")
    return artifact


@contextlib.contextmanager
def stage_lock(cfg: SiteConfig) -> Iterator[None]:
    """One stage at a time per site work dir."""
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    with open(cfg.work_dir / "stage.lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def resolve_device(name: str) -> torch.device:
    """`auto` → CUDA when present, else CPU.

    Raises:
        ConfigError: when CUDA is configured but absent.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"site.toml asks for device {name!r} but no CUDA device is available")
    return torch.device(name)


def _reuse(cfg: SiteConfig, paths: StagePaths, request: StageRequest, own_key: PrivateKey) -> StageReply | None:
    if not paths.result.is_file() or not (paths.artifact / "manifest.json").is_file():
        return None
    try:
        result = json.loads(paths.result.read_text())
        files = read_artifact_files(paths.artifact)
        artifact = decode_artifact(files, public_key=own_key.public_key(), require_signature=True)
    except (OSError, ValueError, ArtifactError) as err:
        logger.warning("stage output of an earlier attempt is unusable (%s); running the stage again", err)
        return None
    if result.get("parent_sha256") != request.parent_sha256 or artifact.sha256 != result.get("artifact_sha256"):
        raise RefusedError(
            f"stage {request.stage_index} of run {request.run_id} was already run on this site from another parent "
            f"({str(result.get('parent_sha256'))[:16]}…); refusing a different parent (replay or fork)"
        )
    return StageReply(
        status="ok",
        files=files,
        artifact_sha256=artifact.sha256,
        reused=True,
        resumed_from_epoch=int(result.get("resumed_from_epoch", 0)),
        metrics={k: float(v) for k, v in result.get("metrics", {}).items()},
        epoch_losses=[float(x) for x in result.get("epoch_losses", [])],
    )


def run_site_stage(cfg: SiteConfig, request: StageRequest, private_key: PrivateKey, events: SiteEvents) -> StageReply:
    """Run (or resume, or reuse) the requested stage on this site's data and return the signed artifact.

    Raises:
        RefusedError: policy or verification refusal.
        ConfigError, StageError, SiteDataError, ArtifactError: the stage cannot run (reported as failed).
    """
    from invcoss_core.data import load_site_dataset

    if request.site != cfg.site:
        raise RefusedError(f"request addressed to site {request.site!r}, this is site {cfg.site!r}")
    if request.modality is not None and request.modality != cfg.modality:
        raise RefusedError(f"the plan asks for modality {request.modality!r}; this site holds {cfg.modality!r}")
    config = resolve_stage_config(cfg, request)
    incoming = verify_incoming(cfg, request)
    paths = stage_paths(cfg, request.run_id, request.stage_index)
    with stage_lock(cfg):
        reused = _reuse(cfg, paths, request, private_key)
        if reused is not None:
            logger.info("stage %d already finished from this parent: sending the same artifact", request.stage_index)
            return reused
        paths.root.mkdir(parents=True, exist_ok=True)
        paths.config.write_text(config.model_dump_json(indent=2))
        started = time.perf_counter()
        spec = config.model.spec(cfg.modality)
        dataset = load_site_dataset(cfg.data_dir, cfg.modality, spec, config.data, split="train", seed=config.seed)
        train_data, audit = split_for_audit(dataset, config.privacy.audit_fraction, config.seed)
        result = run_stage(
            config=config,
            modality=cfg.modality,
            train_data=train_data,
            incoming=incoming,
            run_id=request.run_id,
            site=cfg.site,
            out_dir=paths.artifact,
            work_dir=paths.work,
            device=resolve_device(cfg.device),
            signer=lambda data: sign_bytes(private_key, data),
            events=events.progress,
            audit=audit,
        )
        if result.artifact.manifest.contains_real_data:
            raise RefusedError("the stage produced an artifact with real images; it does not leave the site")
        privacy = result.artifact.manifest.privacy
        if privacy is not None:
            events.emit(
                "privacy", stage=request.stage_index, decision=privacy.decision, figures=privacy_metrics(privacy)
            )
            held = hold_message(privacy)
            if held is not None:  # no result.json: a retry runs the stage again (under the site's new settings)
                raise RefusedError(held)
        seconds = time.perf_counter() - started
        metrics = {
            **result.metrics,
            "stage_seconds": seconds,
            "train_samples": float(len(train_data)),
            **(privacy_metrics(privacy) if privacy is not None else {}),
        }
        summary = {
            "artifact_sha256": result.artifact.sha256,
            "parent_sha256": request.parent_sha256,
            "resumed_from_epoch": result.resumed_from_epoch,
            "epoch_losses": result.epoch_losses,
            "metrics": metrics,
        }
        paths.result.write_text(json.dumps(summary, indent=2))
        if result.resumed_from_epoch:
            events.emit("stage_resumed", stage=request.stage_index, epoch=result.resumed_from_epoch)
        gate = result.artifact.manifest.privacy_gate
        if gate is not None:
            events.emit("gate", stage=request.stage_index, checked=gate.checked, blocked=gate.blocked)
        return StageReply(
            status="ok",
            files=result.files,
            artifact_sha256=result.artifact.sha256,
            resumed_from_epoch=result.resumed_from_epoch,
            metrics=metrics,
            epoch_losses=result.epoch_losses,
        )


_DECISION_CODE = {"not_measured": -1.0, "released": 0.0, "held": 1.0, "released_by_operator": 2.0}


def privacy_metrics(report: PrivacyReport) -> dict[str, float]:
    """The audit's headline figures as stage metrics (run state, site metrics); a figure not measured is absent.

    Absent, not NaN: the metrics travel as JSON (run.json, the reply's metric record), where NaN has no spelling.
    """
    pool = report.synthetic_pool
    figures: dict[str, float | None] = {
        "privacy_decision": _DECISION_CODE[report.decision],
        "privacy_audit_subjects": float(report.audit_subjects),
        "privacy_loss_auc": report.model_loss.auc if report.model_loss else None,
        "privacy_calibrated_auc": report.calibrated_loss.auc if report.calibrated_loss else None,
        "privacy_calibrated_tpr_1pct_fpr": report.calibrated_loss.tpr_at_1pct_fpr if report.calibrated_loss else None,
        "privacy_pool_pixel_auc": pool.pixel.auc if pool else None,
        "privacy_pool_feature_auc": pool.feature.auc if pool else None,
        "privacy_audit_seconds": report.seconds,
    }
    return {k: v for k, v in figures.items() if v is not None}


__all__ = [
    "RefusedError",
    "StageError",
    "privacy_metrics",
    "resolve_stage_config",
    "run_site_stage",
    "stage_paths",
    "verify_incoming",
]
