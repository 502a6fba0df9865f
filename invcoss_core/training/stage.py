"""The one stage-training loop: MAE on the current modality, replay of earlier ones, checkpoints, hand-off."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from invcoss_core.artifact import Artifact, decode_artifact, encode_artifact, write_artifact_dir
from invcoss_core.common.events import EventSink, ProgressEvent, discard
from invcoss_core.config import StageConfig
from invcoss_core.models import MultiModalMAE, build_model
from invcoss_core.privacy import NO_AUDIT, AuditInputs, DPSummary, audit_handoff, not_measured
from invcoss_core.privacy.dp import DPStep, PoissonBatches, collate_or_empty, dp_summary, secret_generator
from invcoss_core.replay import ReplayContext, ReplayStrategy, build_replay
from invcoss_core.seeding import derive_seed
from invcoss_core.stats import FeatureStatsRecorder, merge_stats
from invcoss_core.training import distributed
from invcoss_core.training.checkpoint import Checkpoint, load_checkpoint, remove_checkpoint, save_checkpoint
from invcoss_core.training.losses import feature_distillation, intra_modal_mixup
from invcoss_core.training.outcome import (
    NonFiniteLossError,
    RoundWindow,
    StageError,
    StageResult,
    TrainOutcome,
)
from invcoss_core.training.precision import autocast, training_precision
from invcoss_core.training.schedule import lr_at

logger = logging.getLogger(__name__)


def seeded_model(config: StageConfig, *parts: int | str) -> MultiModalMAE:
    """Build the model with weights initialised from a seed, without touching the global RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "init", *parts))
        return build_model(config.model)


def prepare_models(
    config: StageConfig, incoming: Artifact | None, device: torch.device
) -> tuple[MultiModalMAE, MultiModalMAE | None]:
    """Student (incoming encoder, fresh decoder) and frozen teacher (the incoming model) for a stage.

    Raises:
        StageError: when the incoming artifact was trained with another architecture.
    """
    stage = 1 if incoming is None else incoming.manifest.stage_index + 1
    student = seeded_model(config, stage)
    teacher = None
    if incoming is not None:
        if incoming.manifest.architecture != config.model:
            raise StageError(
                f"the incoming artifact was trained with profile {incoming.manifest.profile!r} and another "
                f"architecture; run this stage with --profile {incoming.manifest.profile} and the same model settings"
            )
        student.load_state_dict(incoming.weights, strict=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(config.seed, "decoder", stage))
            student.decoder.reset_parameters()  # MedCoSS: carry the encoder, re-initialise the decoder
        teacher = seeded_model(config, stage)
        teacher.load_state_dict(incoming.weights, strict=True)
        teacher.requires_grad_(False).eval().to(device)
    return student.to(device), teacher


def stage_fingerprint(config: StageConfig, modality: str, incoming: Artifact | None, run_id: str, n: int) -> str:
    """What a stage's epoch checkpoints are keyed by (`load_checkpoint`): its inputs, `n` training samples."""
    blob = json.dumps(
        {
            "config": config.model_dump(mode="json"),
            "modality": modality,
            "incoming": incoming.sha256 if incoming else None,
            "run_id": run_id,
            "samples": n,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def stage_schedule(config: StageConfig, n: int) -> tuple[int, int, int]:
    """(batch size, steps per epoch, total steps) of a stage on `n` training samples."""
    tc = config.train
    batch_size = min(tc.batch_size, n)
    steps_per_epoch = tc.steps_per_epoch or max(1, n // batch_size)
    return batch_size, steps_per_epoch, steps_per_epoch * tc.epochs


def stage_dp_summary(config: StageConfig, n: int) -> DPSummary | None:
    """The DP-SGD guarantee of a whole stage's schedule on `n` real samples (None: `privacy` asks for no DP)."""
    pc = config.privacy
    if pc.dp_noise_multiplier is None:
        return None
    batch_size, _, total_steps = stage_schedule(config, n)
    return dp_summary(pc.dp_noise_multiplier, pc.dp_max_grad_norm, batch_size / n, total_steps, pc.dp_delta)


def _check_finite(value: float, what: str, epoch: int, steps: str) -> float:
    if value != value or value in (float("inf"), float("-inf")):
        raise NonFiniteLossError(
            f"{what} became {value} at epoch {epoch}, {steps}; the stage stopped without handing anything on. "
            "Lower train.lr, keep train.grad_clip on, or check the input data with `invcoss data check`."
        )
    return value


def default_check_every(device: torch.device) -> int:
    """Steps between reading the losses back: every step on the CPU (free), every 25 on an accelerator.

    Reading a loss on a GPU waits until the queued steps have run, so the host cannot queue the next step's kernels
    meanwhile; at the small inputs of the `small` geometry the base model's steps are bound by that host time.
    A non-finite loss is then found at most 24 steps late — still before any checkpoint or hand-off is written.
    What this gains per step on a GPU is not measured yet (benchmarks/bench_gpu_step.py measures it).
    """
    return 1 if device.type == "cpu" else 25


def _autocast(device: torch.device, enabled: bool) -> torch.autocast:
    return autocast(device, training_precision(device, enabled))  # bf16 where the GPU supports it, else float32


def train_stage(
    *,
    config: StageConfig,
    modality: str,
    train_data: Dataset[torch.Tensor],
    student: MultiModalMAE,
    teacher: MultiModalMAE | None,
    replay: ReplayStrategy,
    device: torch.device,
    checkpoint_dir: Path | None,
    fingerprint: str,
    stage_index: int,
    events: EventSink = discard,
    check_every: int | None = None,
    round_window: RoundWindow | None = None,
) -> TrainOutcome:
    """Optimise `student` for the configured epochs, resuming from a matching checkpoint.

    The losses are summed on the device and read back (checked for NaN/inf, reported to `events`) every
    `check_every` steps and at each epoch's end; None: `default_check_every(device)`.

    With a `round_window` (one FedAvg round of a consortium stage) only its epochs [first, stop) of the stage's
    schedule run, from the student's current weights and the window's optimizer state; no checkpoint is read and
    no statistics are recorded (the coordinator asks for them once the rounds are over).

    Returns:
        TrainOutcome: recorded feature statistics (empty for a round), per-epoch history, epoch resumed from,
        training seconds, images seen, the optimizer state.
    Raises:
        NonFiniteLossError: on a NaN/inf loss.
    """
    tc = config.train
    ranks = distributed.current()  # a data-parallel rank (see distributed.py), or None for one process
    n = len(train_data)  # type: ignore[arg-type]
    batch_size, steps_per_epoch, total_steps = stage_schedule(config, n)
    warmup = int(tc.warmup_fraction * total_steps)
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in student.named_parameters():
        (
            no_decay
            if param.ndim <= 1
            or name.endswith(("cls_token", "position_embeddings", "mask_token"))
            or ".pos_embed." in name
            else decay
        ).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr,
        betas=tc.betas,
        fused=device.type == "cuda",  # one kernel per parameter group instead of several per parameter
    )
    history: dict[str, list[float]] = {"loss": [], "replay": []}
    start_epoch, stop_epoch = 0, tc.epochs
    if round_window is not None:
        start_epoch, stop_epoch = round_window.first, round_window.stop
        if round_window.optimizer_state is not None:
            optimizer.load_state_dict(round_window.optimizer_state)
    elif checkpoint_dir is not None:
        ckpt = load_checkpoint(checkpoint_dir, fingerprint)
        if ckpt is not None:
            student.load_state_dict(ckpt.model, strict=True)
            optimizer.load_state_dict(ckpt.optimizer)
            history = ckpt.history
            start_epoch = ckpt.epoch
            logger.info("resuming %s stage from its checkpoint after epoch %d", modality, start_epoch)
    recorder = FeatureStatsRecorder(student, modality)
    every = check_every or default_check_every(device)
    pc = config.privacy
    dp_step: DPStep | None = None
    dp: DPSummary | None = None
    dp = stage_dp_summary(config, n)
    if dp is not None:  # DP-SGD on the real images (privacy/dp.py); one process only
        dp_step = DPStep(
            model=student,
            modality=modality,
            max_grad_norm=dp.max_grad_norm,
            noise_multiplier=dp.noise_multiplier,
            expected_batch=float(batch_size),
            noise_generator=secret_generator(),
            microbatch=pc.dp_microbatch,
        )
        dp_sampling = secret_generator()
        if dp.delta * n >= 1:
            logger.warning(
                "privacy.dp_delta %g is not below 1 / %d training samples: the guarantee is weak; lower it",
                dp.delta,
                n,
            )
    seen = 0
    started = time.perf_counter()
    for epoch in range(start_epoch, stop_epoch):
        student.train()
        generator = torch.Generator().manual_seed(derive_seed(config.seed, stage_index, modality, epoch))
        sampler = RandomSampler(
            train_data,  # type: ignore[arg-type]  # map-style datasets define __len__
            replacement=False,
            num_samples=steps_per_epoch * batch_size,
            generator=generator,
        )
        if dp is None:
            loader = DataLoader(
                train_data,
                batch_sampler=distributed.rank_batches(sampler, batch_size, ranks),  # a rank: its slice of each batch
                num_workers=tc.num_workers,
                pin_memory=device.type == "cuda",
            )
        else:  # Poisson batches (the accountant's assumption), drawn from a secret generator
            loader = DataLoader(
                train_data,
                batch_sampler=PoissonBatches(n, dp.sample_rate, steps_per_epoch, dp_sampling),
                collate_fn=collate_or_empty,
                num_workers=tc.num_workers,
            )
        last_epoch = epoch == tc.epochs - 1 and round_window is None
        loss_sum = replay_sum = 0.0
        replay_steps = 0
        # Sums since the last read-back, on the device: [MAE loss, replay loss, total loss].
        window = torch.zeros(3, device=device, dtype=torch.float64)
        window_first = 0
        replay_what = "the replay loss"
        epoch_start = time.perf_counter()
        for step_in_epoch, batch in enumerate(loader):
            step = epoch * steps_per_epoch + step_in_epoch
            lr = lr_at(step, total_steps, warmup, tc.lr, tc.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            x = None if batch is None else batch.to(device, non_blocking=True)  # None: an empty Poisson batch
            rows = batch_size if dp_step is None else (0 if x is None else x.shape[0])
            noise = distributed.shard(student.masking_noise(rows, modality, generator, device), ranks)
            # DP: statistics are recorded in one pass after training (the per-sample pass is vmapped).
            record = (
                dp_step is None
                and ranks is None
                and last_epoch
                and (tc.stats_batches is None or step_in_epoch < tc.stats_batches)
            )
            replay_loss: torch.Tensor | None = None
            with _autocast(device, tc.amp):
                if dp_step is not None:  # sets each parameter's .grad to the clipped, noised real-image gradient
                    loss = dp_step(x, noise)
                elif record:
                    assert x is not None  # only Poisson batches are ever empty
                    with recorder.recording():
                        loss = student(x, modality, noise=noise).loss
                else:
                    assert x is not None
                    loss = student(x, modality, noise=noise).loss
                total = loss
                rbatch = replay.sample_batch(step, generator)
                if rbatch is not None and rbatch.objective == "mae":
                    rnoise = student.masking_noise(rbatch.images.shape[0], rbatch.modality, generator, device)
                    replay_loss = student(rbatch.images, rbatch.modality, noise=rnoise).loss
                    total = total + replay_loss
                    replay_what = "the replay MAE loss"
                elif rbatch is not None and teacher is not None:
                    images = intra_modal_mixup(rbatch.images, generator) if tc.mixup else rbatch.images
                    rnoise = student.masking_noise(images.shape[0], rbatch.modality, generator, device)
                    replay_loss = feature_distillation(student, teacher, images, rbatch.modality, rnoise)
                    total = total + tc.distill_weight * replay_loss
                    if tc.replay_mae_weight > 0:
                        total = total + tc.replay_mae_weight * student(images, rbatch.modality, noise=rnoise).loss
                    replay_what = "the replay distillation loss"
                penalty = replay.penalty(student)
                if penalty is not None:
                    total = total + penalty
            window[0] += loss.detach().double()
            window[2] += total.detach().double()
            if replay_loss is not None:
                window[1] += replay_loss.detach().double()
                replay_steps += 1
            if (step_in_epoch + 1) % every == 0 or step_in_epoch + 1 == steps_per_epoch:
                # One read-back for the window, before this step's update (at check_every=1: every step's).
                steps = (
                    f"step {step_in_epoch}"
                    if window_first == step_in_epoch
                    else f"one of steps {window_first}-{step_in_epoch}"
                )
                mae_w, replay_w, total_w = distributed.average_(window, ranks).tolist()
                loss_sum += _check_finite(mae_w, "the MAE loss", epoch + 1, steps)
                replay_sum += _check_finite(replay_w, replay_what, epoch + 1, steps)
                _check_finite(total_w, "the total loss", epoch + 1, steps)
                window.zero_()
                window_first = step_in_epoch + 1
                events(
                    ProgressEvent(
                        "train",
                        modality,
                        step + 1,
                        total_steps,
                        epoch + 1,
                        {"loss": loss_sum / (step_in_epoch + 1), "lr": lr},
                    )
                )
            if total.requires_grad:  # DP without replay: the noised gradient is all there is
                total.backward()
            distributed.average_gradients(student, ranks)
            if tc.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(student.parameters(), tc.grad_clip)
            optimizer.step()
            seen += 0 if x is None else x.shape[0]
        history["loss"].append(loss_sum / steps_per_epoch)
        if replay_steps:
            history["replay"].append(replay_sum / replay_steps)
        epoch_seconds = time.perf_counter() - epoch_start
        if checkpoint_dir is not None and distributed.is_main(ranks):
            save_checkpoint(
                checkpoint_dir,
                Checkpoint(epoch + 1, fingerprint, student.state_dict(), optimizer.state_dict(), history),
            )
        logger.info("%s epoch %d/%d: loss %.4f", modality, epoch + 1, tc.epochs, history["loss"][-1])
        events(
            ProgressEvent(
                "train",
                modality,
                (epoch + 1) * steps_per_epoch,
                total_steps,
                epoch + 1,
                {
                    "epoch_loss": history["loss"][-1],
                    "images_per_second": steps_per_epoch * batch_size / max(epoch_seconds, 1e-9),
                },
            )
        )
    seconds = time.perf_counter() - started
    if round_window is not None or not distributed.is_main(ranks):
        # A FedAvg round records nothing (the coordinator asks for statistics after the last round); of several
        # ranks, rank 0 records the statistics.
        stats: dict[str, torch.Tensor] = {}
    else:
        if recorder.count == 0:
            # Resumed after the last epoch finished, or rank 0 of several: record the statistics in one extra pass.
            record_statistics(student, recorder, train_data, batch_size, modality, device, config.seed)
        stats = recorder.result()
    return TrainOutcome(
        stats=stats,
        history=history,
        resumed_from_epoch=start_epoch if round_window is None else 0,
        seconds=seconds,
        seen=seen * distributed.world_size(ranks),
        optimizer_state=optimizer.state_dict(),
        dp=dp,
    )


@torch.no_grad()
def record_statistics(
    model: MultiModalMAE,
    recorder: FeatureStatsRecorder,
    data: Dataset[torch.Tensor],
    batch_size: int,
    modality: str,
    device: torch.device,
    seed: int,
) -> None:
    """Feed `data` once through the masked encoder to fill `recorder` (no parameter updates)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "stats", modality))
    model.eval()
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False):
        x = batch.to(device)
        with recorder.recording():
            model.forward_encoder(x, modality, noise=model.masking_noise(x.shape[0], modality, generator, device))


@distributed.data_parallel  # config.devices > 1 or torchrun: train on several ranks, rank 0 hands off
def run_stage(
    *,
    config: StageConfig,
    modality: str,
    train_data: Dataset[torch.Tensor],
    incoming: Artifact | None = None,
    run_id: str = "local",
    site: str = "local",
    out_dir: Path | None = None,
    work_dir: Path | None = None,
    device: torch.device | str = "cpu",
    signer: Callable[[bytes], bytes] | None = None,
    events: EventSink = discard,
    replay: ReplayStrategy | None = None,
    check_every: int | None = None,
    audit: AuditInputs | None = None,
) -> StageResult | None:
    """Train one continual stage and produce its hand-off artifact.

    Args:
        config: profile + overrides; `config.replay.strategy` picks the replay unless `replay` is given;
            `config.devices` > 1 (or a torchrun launch) trains on data-parallel ranks (`distributed.data_parallel`)
            and every caller gets rank 0's result.
        modality: this stage's modality; `train_data` yields (C, *img_size) float32 samples of it in [0, 1].
        incoming: the previous stage's verified artifact (None for the first stage).
        out_dir: where the artifact directory is written (atomically); None keeps it in memory only.
        work_dir: site-local folder for epoch checkpoints; a rerun with the same inputs resumes from it.
        signer: signs manifest.json (the site's key).
        events: progress sink (CLI progress bar, site metrics).
        check_every: steps between loss read-backs (NaN check, progress); None: every step on the CPU, every 25
            on an accelerator (`default_check_every`).
        audit: the held-out audit subjects' samples: the hand-off is attacked before it is signed (manifest
            `privacy`); None: no audit.
    Returns:
        StageResult with the artifact's files and training figures.
    Raises:
        StageError: for an unknown modality, an empty dataset, an architecture mismatch, a non-finite loss or a lost
            rank of a multi-process stage.
    """
    device = torch.device(device)
    config.model.spec(modality)
    n = len(train_data)  # type: ignore[arg-type]
    if n == 0:
        raise StageError(f"no training samples for modality {modality!r}; check the site data folder")
    stage_index = 1 if incoming is None else incoming.manifest.stage_index + 1
    student, teacher = prepare_models(config, incoming, device)
    strategy = replay or build_replay(config)
    ctx = ReplayContext(
        config=config,
        modality=modality,
        student=student,
        teacher=teacher,
        incoming=incoming,
        device=device,
        events=events,
    )
    strategy.begin_stage(ctx)
    fingerprint = stage_fingerprint(config, modality, incoming, run_id, n)
    checkpoint_dir = Path(work_dir) / "checkpoint" if work_dir is not None else None
    trained = train_stage(
        config=config,
        modality=modality,
        train_data=train_data,
        student=student,
        teacher=teacher,
        replay=strategy,
        device=device,
        checkpoint_dir=checkpoint_dir,
        fingerprint=fingerprint,
        stage_index=stage_index,
        events=events,
        check_every=check_every,
    )
    if not distributed.is_main(distributed.current()):
        return None  # rank 0 alone produces the replay and the artifact
    stats, history, resumed, train_seconds, seen = (
        trained.stats,
        trained.history,
        trained.resumed_from_epoch,
        trained.seconds,
        trained.seen,
    )
    student.eval()
    outcome = strategy.end_stage(ctx, train_data, stats)
    privacy = None
    if audit is not None:  # after the pool exists, before the manifest is signed
        pool = outcome.synthetic.get(modality)
        privacy = audit_handoff(
            config=config,
            modality=modality,
            student=student,
            incoming_model=teacher,
            members=train_data,
            inputs=audit,
            pool=pool,
            dp=trained.dp,
        )
    elif trained.dp is not None:  # no audit asked for: the manifest still records the DP guarantee
        privacy = not_measured(NO_AUDIT, config.privacy, trained.dp)
    modalities = [*(incoming.manifest.modalities if incoming else []), modality]
    metrics = {
        "final_loss": history["loss"][-1],
        "train_seconds": train_seconds,
        "replay_seconds": outcome.seconds,
        "images_per_second": seen / train_seconds if train_seconds > 0 else 0.0,
        "epochs": float(config.train.epochs),
        **outcome.metrics,
    }
    files = encode_artifact(
        run_id=run_id,
        stage_index=stage_index,
        site=site,
        modalities=modalities,
        profile=config.profile,
        replay=strategy.name,
        parent_sha256=incoming.sha256 if incoming else None,
        architecture=config.model,
        weights={k: v.detach().cpu() for k, v in student.state_dict().items()},
        stats=merge_stats(incoming.stats if incoming else {}, stats),
        synthetic=outcome.synthetic,
        extras=outcome.extras,
        privacy_gate=outcome.gate,
        metrics=metrics,
        signer=signer,
        precision=training_precision(device, config.train.amp),
        weights_dtype=config.handoff_weights,
        privacy=privacy,
    )
    artifact = decode_artifact(files, source=f"stage {stage_index} output")
    if out_dir is not None:
        write_artifact_dir(files, Path(out_dir))
        for name, png in outcome.previews.items():  # beside the artifact: its directory holds manifest files only
            Path(out_dir).with_name(f"{Path(out_dir).name}.preview-{name}.png").write_bytes(png)
    if checkpoint_dir is not None:
        remove_checkpoint(checkpoint_dir)
    return StageResult(
        files=files,
        artifact=artifact,
        out_dir=Path(out_dir) if out_dir is not None else None,
        epoch_losses=history["loss"],
        replay_losses=history["replay"],
        train_seconds=train_seconds,
        replay_seconds=outcome.seconds,
        images_per_second=metrics["images_per_second"],
        resumed_from_epoch=resumed,
        metrics=metrics,
        previews=dict(outcome.previews),
    )


def load_student(artifact: Artifact, device: torch.device | str = "cpu") -> MultiModalMAE:
    """Rebuild the model an artifact describes, with its weights, in eval mode."""
    model = build_model(artifact.manifest.architecture)
    model.load_state_dict(artifact.weights, strict=True)
    return model.to(device).eval()


__all__ = [
    "NonFiniteLossError",
    "RoundWindow",
    "StageError",
    "StageResult",
    "TrainOutcome",
    "default_check_every",
    "load_student",
    "prepare_models",
    "run_stage",
    "stage_dp_summary",
    "train_stage",
]
