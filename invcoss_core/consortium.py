"""A consortium stage's method steps (several sites of one modality), independent of Flower.

DESIGN §7. A stage that names several sites runs FedAvg rounds on one shared model, then one site inverts the
aggregated model and every site gates the candidates against its own real images:

1. `initial_weights` — the coordinator builds round 1's model from the parent artifact (MedCoSS: carried encoder,
   re-initialised decoder), exactly as a one-site stage would.
2. `train_round` — each site trains its share of the stage's schedule (one `RoundWindow` of `train_stage`) on its
   real images + the replay of the incoming artifact, from the round's global weights.
3. `site_sufficient_stats` — after the last round each site records count / sum / sum of squares of the final
   model's block inputs on its images (content-keyed masks, so the pooled values equal the union's exactly).
4. `synthesize_candidates` — the inversion site inverts the final model against the pooled statistics.
5. `gate_verdicts` — every site answers pass / block per candidate against its own real images (no scores).
6. `consortium_artifact` — the inversion site signs the stage's artifact with the images every site passed.

Aggregation itself is Flower's FedAvg on the coordinator; nothing here aggregates weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from invcoss_core.artifact import Artifact, GateSummary, encode_artifact
from invcoss_core.common.events import EventSink, discard
from invcoss_core.config import StageConfig
from invcoss_core.inversion.gate import RealReference, gate_blocks
from invcoss_core.inversion.synthesize import Synthesizer
from invcoss_core.models import MultiModalMAE, build_model
from invcoss_core.privacy import NO_AUDIT, AuditInputs, audit_handoff, not_measured
from invcoss_core.replay import PoolReplay, ReplayContext, ReplayStrategy, build_replay
from invcoss_core.replay.inversion import InversionReplay, PixelInversionReplay
from invcoss_core.seeding import derive_seed
from invcoss_core.stats import SufficientStats, merge_stats, record_sufficient_stats
from invcoss_core.training.precision import training_precision
from invcoss_core.training.stage import (
    RoundWindow,
    StageError,
    prepare_models,
    stage_dp_summary,
    stage_fingerprint,
    train_stage,
)

__all__ = [
    "INVERTING_STRATEGIES",
    "RoundResult",
    "Verdicts",
    "consortium_artifact",
    "gate_verdicts",
    "initial_weights",
    "load_weights",
    "pool_sufficient_stats",
    "round_config",
    "site_sufficient_stats",
    "synthesize_candidates",
    "train_round",
]

INVERTING_STRATEGIES = ("inversion", "pixel_inversion")


def round_config(config: StageConfig, rounds: int, local_steps: int | None, local_epochs: int) -> StageConfig:
    """The stage settings a round trains under: `rounds × local_epochs` epochs of `local_steps` steps each.

    With `local_steps` None an epoch is one pass over the site's own images (sites of different sizes then take
    different numbers of steps per round, as in FedAvg with local epochs).
    """
    train = config.train.model_copy(update={"epochs": rounds * local_epochs, "steps_per_epoch": local_steps})
    return config.model_copy(update={"train": train})


def load_weights(config: StageConfig, weights: Mapping[str, torch.Tensor], device: torch.device) -> MultiModalMAE:
    """The model of `config` with `weights` (strict keys), on `device`.

    Raises:
        StageError: when the weights do not fit the architecture (a site with other model settings).
    """
    model = build_model(config.model)
    try:
        model.load_state_dict(dict(weights), strict=True)
    except RuntimeError as err:
        raise StageError(
            f"the round's weights do not fit this site's model settings ({str(err).splitlines()[0]}); "
            "sites of one stage must not override [stage] model settings"
        ) from None
    return model.to(device)


def initial_weights(config: StageConfig, incoming: Artifact | None) -> dict[str, torch.Tensor]:
    """Round 1's global weights: the stage's student as a one-site stage would start it (CPU tensors)."""
    student, _ = prepare_models(config, incoming, torch.device("cpu"))
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


@dataclass(frozen=True)
class RoundResult:
    """One site's contribution to one FedAvg round."""

    weights: dict[str, torch.Tensor]  # the locally trained state dict (CPU)
    num_examples: int  # the site's real training samples: FedAvg's weight
    loss: float  # mean MAE loss of the round's steps
    replay_loss: float | None
    seconds: float
    optimizer_state: dict[str, Any]  # kept on the site for its next round


def train_round(
    *,
    config: StageConfig,
    modality: str,
    train_data: Dataset[torch.Tensor],
    incoming: Artifact | None,
    global_weights: Mapping[str, torch.Tensor],
    round_index: int,
    epochs_per_round: int,
    run_id: str,
    device: torch.device,
    optimizer_state: dict[str, Any] | None = None,
    events: EventSink = discard,
) -> RoundResult:
    """Train round `round_index` (1-based) of a consortium stage on this site's images plus replay.

    Args:
        config: `round_config(...)` of the stage: its epochs cover all rounds, so the learning-rate schedule
            runs over the whole stage and this round trains epochs [(r-1)·E, r·E).
        incoming: the verified parent artifact (replay pools, the frozen teacher); None in a run's first stage.
        global_weights: the round's aggregated model (round 1: `initial_weights`).
        optimizer_state: the site's AdamW state after its last round (None: fresh, e.g. after a missed round).
    Returns:
        RoundResult with the trained weights and FedAvg's sample count.
    Raises:
        StageError: for an empty dataset, weights of another architecture, or a non-finite loss.
    """
    n = len(train_data)  # type: ignore[arg-type]
    if n == 0:
        raise StageError(f"no training samples for modality {modality!r}; check the site data folder")
    stage_index = 1 if incoming is None else incoming.manifest.stage_index + 1
    _, teacher = prepare_models(config, incoming, device)
    student = load_weights(config, global_weights, device)
    strategy = build_replay(config)
    strategy.begin_stage(
        ReplayContext(
            config=config, modality=modality, student=student, teacher=teacher, incoming=incoming, device=device
        )
    )
    first = (round_index - 1) * epochs_per_round
    trained = train_stage(
        config=config,
        modality=modality,
        train_data=train_data,
        student=student,
        teacher=teacher,
        replay=strategy,
        device=device,
        checkpoint_dir=None,
        fingerprint=stage_fingerprint(config, modality, incoming, run_id, n),
        stage_index=stage_index,
        events=events,
        round_window=RoundWindow(first, first + epochs_per_round, optimizer_state),
    )
    losses = trained.history["loss"]
    replay = trained.history["replay"]
    return RoundResult(
        weights={k: v.detach().to("cpu").clone() for k, v in student.state_dict().items()},
        num_examples=n,
        loss=sum(losses) / len(losses),
        replay_loss=sum(replay) / len(replay) if replay else None,
        seconds=trained.seconds,
        optimizer_state=trained.optimizer_state,
    )


def site_sufficient_stats(
    config: StageConfig,
    modality: str,
    data: Dataset[torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    device: torch.device,
) -> SufficientStats:
    """Count, sum and sum of squares of the final model's block inputs on this site's images."""
    model = load_weights(config, weights, device)
    return record_sufficient_stats(model, data, modality, device, batch_size=config.train.batch_size)


def pool_sufficient_stats(parts: Sequence[SufficientStats]) -> dict[str, torch.Tensor]:
    """The stage's feature statistics (mean, variance per block) from every site's sufficient statistics.

    Raises:
        ValueError: when there is nothing to pool or the parts do not match.
    """
    if not parts:
        raise ValueError("no site returned statistics")
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total.to_stats()


def synthesize_candidates(
    *,
    config: StageConfig,
    modality: str,
    weights: Mapping[str, torch.Tensor],
    stats: Mapping[str, torch.Tensor],
    num_images: int,
    stage_index: int,
    device: torch.device,
    events: EventSink = discard,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Invert the stage's final model against the pooled statistics (the inversion site's step).

    Returns:
        (N, C, *img_size) float16 candidate images on the CPU, and inversion metrics.
    Raises:
        StageError: when the stage's replay strategy does not invert.
    """
    if config.replay.strategy not in INVERTING_STRATEGIES:
        raise StageError(f"replay strategy {config.replay.strategy!r} does not synthesise images")
    method = (InversionReplay if config.replay.strategy == "inversion" else PixelInversionReplay).method
    model = load_weights(config, weights, device).eval()
    generator = torch.Generator().manual_seed(derive_seed(config.seed, "inversion", stage_index, modality))
    result = Synthesizer(
        model, modality, stats, config.inversion, method=method, generator=generator, device=device, events=events
    ).run(num_images)
    metrics = {
        "inversion_images": float(result.images.shape[0]),
        "inversion_seconds": result.seconds,
        "inversion_images_per_second": result.images_per_second,
        "inversion_steps": float(result.steps),
        **{f"inversion_final_{name}": value for name, value in result.final.items()},
    }
    return result.images, metrics


@dataclass(frozen=True)
class Verdicts:
    """One site's gate answer: `passed[i]` is False when candidate i is too close to one of its real images."""

    passed: list[bool]
    seconds: float

    @property
    def blocked(self) -> int:
        return sum(not p for p in self.passed)


def gate_verdicts(
    *,
    config: StageConfig,
    modality: str,
    weights: Mapping[str, torch.Tensor],
    candidates: torch.Tensor,
    real_data: Dataset[torch.Tensor],
    device: torch.device,
) -> Verdicts:
    """Check every candidate against this site's real images with the privacy gate's measures and thresholds.

    Only the verdicts leave the site: never a similarity score (it would tell how close a real image is).

    Raises:
        ValueError: for an empty real set or candidates of the wrong shape.
    """
    started = time.perf_counter()
    model = load_weights(config, weights, device).eval()
    if candidates.shape[0] == 0:
        return Verdicts([], time.perf_counter() - started)
    reference = RealReference(real_data, model, modality, config.gate.chunk_size, device)
    blocked = gate_blocks(candidates.float(), reference, config.gate)
    return Verdicts([not bool(b) for b in blocked], time.perf_counter() - started)


def consortium_artifact(
    *,
    config: StageConfig,
    modality: str,
    weights: Mapping[str, torch.Tensor],
    pooled_stats: Mapping[str, torch.Tensor],
    incoming: Artifact | None,
    candidates: torch.Tensor,
    passed: Sequence[bool],
    blocked_by_site: Mapping[str, int],
    run_id: str,
    stage_index: int,
    site: str,
    real_data: Dataset[torch.Tensor],
    device: torch.device,
    signer: Callable[[bytes], bytes] | None,
    metrics: Mapping[str, float] | None = None,
    audit: AuditInputs | None = None,
) -> dict[str, bytes]:
    """The stage's hand-off artifact: final weights, carried + pooled statistics, the candidates every site passed.

    Args:
        passed: per candidate, True when every site of the stage passed it.
        blocked_by_site: site -> candidates it blocked (the manifest's metrics say who blocked how many).
        real_data: the signing site's training images: EWC's Fisher, and the members of the privacy audit.
        audit: the signing site's audit subjects (`invcoss_core.privacy.split_for_audit`); None: no audit. The audit
            measures membership of this site's subjects only: the other sites keep their images to themselves.
    Returns:
        The artifact's files, signed by `signer` (the inversion site's key).
    Raises:
        ValueError: when `passed` does not have one verdict per candidate.
    """
    if len(passed) != candidates.shape[0]:
        raise ValueError(f"{len(passed)} verdicts for {candidates.shape[0]} candidates")
    strategy: ReplayStrategy = build_replay(config)
    extras: dict[str, dict[str, torch.Tensor]] = {}
    gate: GateSummary | None = None
    synthetic: dict[str, torch.Tensor] = {}
    outcome_metrics: dict[str, float] = {}
    if config.replay.strategy in INVERTING_STRATEGIES:
        keep = torch.tensor(list(passed), dtype=torch.bool)
        released = candidates[keep]
        if not isinstance(strategy, PoolReplay):
            raise StageError(f"replay strategy {strategy.name!r} has no synthetic pool")
        synthetic = strategy.accumulate(strategy.incoming_pools(incoming), modality, released)
        checked = int(candidates.shape[0])
        gate = GateSummary(
            checked=checked,
            blocked=checked - int(released.shape[0]),
            dropped=checked - int(released.shape[0]),
            threshold={
                "pixel": config.gate.pixel_threshold,
                "feature": config.gate.feature_threshold,
                **({"copy": config.gate.copy_threshold} if config.gate.copy_threshold is not None else {}),
            },
            max_similarity={},  # sites answer verdicts only: no similarity leaves a site
        )
        outcome_metrics["inversion_images"] = float(released.shape[0])
    else:
        model = load_weights(config, weights, device)
        _, teacher = prepare_models(config, incoming, device)
        ctx = ReplayContext(
            config=config, modality=modality, student=model, teacher=teacher, incoming=incoming, device=device
        )
        strategy.begin_stage(ctx)
        outcome = strategy.end_stage(ctx, real_data, pooled_stats)
        extras, synthetic, outcome_metrics = outcome.extras, outcome.synthetic, dict(outcome.metrics)
    for name, count in blocked_by_site.items():
        outcome_metrics[f"gate_blocked_by_{name}"] = float(count)
    privacy = None
    dp = stage_dp_summary(config, len(real_data))  # type: ignore[arg-type]  # this site's own DP-SGD guarantee
    if audit is not None:  # after the pool exists, before the manifest is signed (as in `run_stage`)
        student = load_weights(config, weights, device).eval()
        _, teacher = prepare_models(config, incoming, device)
        privacy = audit_handoff(
            config=config,
            modality=modality,
            student=student,
            incoming_model=teacher,
            members=real_data,
            inputs=audit,
            pool=synthetic.get(modality),
            dp=dp,
        )
    elif dp is not None:
        privacy = not_measured(NO_AUDIT, config.privacy, dp)
    return encode_artifact(
        run_id=run_id,
        stage_index=stage_index,
        site=site,
        modalities=[*(incoming.manifest.modalities if incoming else []), modality],
        profile=config.profile,
        replay=strategy.name,
        parent_sha256=incoming.sha256 if incoming else None,
        architecture=config.model,
        weights=weights,
        stats=merge_stats(incoming.stats if incoming else {}, pooled_stats),
        synthetic=synthetic,
        extras=extras,
        privacy_gate=gate,
        metrics={**dict(metrics or {}), **outcome_metrics},
        signer=signer,
        privacy=privacy,
        weights_dtype=config.handoff_weights,
        precision=training_precision(device, config.train.amp),
    )
