"""The synthesis loop: optimise InvUNet + latents (or pixels) against a frozen model, batch by batch.

One short loop serves both parameterisations:
- ``generator`` (InvCoSS): a randomly initialised InvUNet G and latent codes z, Adam on G (lr_generator) and z
  (lr_latent). G stays warm across batches — each batch draws fresh z and ε, but G and its optimizer state carry
  over — so later batches need only `iterations_per_batch` steps instead of `iterations` (amortisation);
- ``pixels`` (the paper's "w/o generator" ablation, DeepInversion style): Adam on the pixels' logits, every
  batch from scratch for `iterations` steps.
Each step runs the frozen model once (masked encoder pass with block-input hooks, then the decoder), which gives
all four terms: L_task from the decoder, L_norm from the hooked block inputs, L_rep from the encoder latent and
L_img from the images. After each batch its features join the repulsion pool P.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch

from invcoss_core.common.events import EventSink, ProgressEvent, discard
from invcoss_core.config import InversionConfig
from invcoss_core.inversion.invunet import InvUNet
from invcoss_core.inversion.losses import (
    TERM_NAMES,
    InversionTerms,
    batch_token_stats,
    norm_loss,
    repulsion_loss,
    task_loss,
    tv_loss,
)
from invcoss_core.models import MultiModalMAE
from invcoss_core.stats import capture_block_inputs, modality_stats

logger = logging.getLogger(__name__)

Method = Literal["generator", "pixels"]

__all__ = [
    "InversionError",
    "Method",
    "SynthesisResult",
    "Synthesizer",
    "frozen",
    "images_needed",
    "mean_pairwise_cosine",
    "pixel_inversion",
    "synthesize",
]


class InversionError(RuntimeError):
    """The inversion cannot run or diverged; the message says what to change."""


@dataclass(frozen=True)
class SynthesisResult:
    """What one synthesis call produced.

    images: (N, C, *img_size) float16 on the CPU, values in [0, 1].
    features: (N, D) float32 frozen-encoder features of the images (`model.embed`), on the CPU.
    history: per optimisation step, one list per term name (task, norm, img, rep, total); batches concatenated.
    batch_starts: index into the history lists where each batch begins.
    seconds: wall-clock time of the call; steps: optimisation steps run.
    """

    images: torch.Tensor
    features: torch.Tensor
    history: dict[str, list[float]]
    batch_starts: list[int]
    seconds: float
    steps: int
    method: Method
    final: dict[str, float] = field(default_factory=dict)  # per term: mean over batches of the last step's value

    @property
    def images_per_second(self) -> float:
        """Synthetic images produced per second of wall-clock time."""
        return self.images.shape[0] / self.seconds if self.seconds > 0 else 0.0


@contextmanager
def frozen(model: MultiModalMAE) -> Iterator[MultiModalMAE]:
    """Eval mode and no parameter gradients inside the context; the previous flags and mode come back after.

    Backward passes through a frozen model then compute input gradients only, not weight gradients.
    """
    flags = [p.requires_grad for p in model.parameters()]
    training = model.training
    model.requires_grad_(False).eval()
    try:
        yield model
    finally:
        for param, flag in zip(model.parameters(), flags):
            param.requires_grad_(flag)
        model.train(training)


def images_needed(config: InversionConfig, train_size: int) -> int:
    """Synthetic images for a stage: `num_images`, else image_fraction of the training set, at least min_images."""
    if config.num_images is not None:
        return config.num_images
    return max(config.min_images, round(config.image_fraction * train_size))


@dataclass(frozen=True)
class _Batch:
    """One optimised batch: images (B, C, *S) float32, `embed` features (B, D), the masked-pass features of its
    last step (B, D) that join the repulsion pool, and the (steps, 5) term log."""

    images: torch.Tensor
    features: torch.Tensor
    pool_features: torch.Tensor
    log: torch.Tensor


class Synthesizer:
    """Stateful synthesis for one modality of one frozen model: G, its optimizer and the pool stay warm.

    Args:
        model: the trained model to invert; it is frozen (eval, no weight gradients) while `run` is active.
        modality: the modality whose tokenizer shapes the images.
        stats: recorded feature statistics holding `<modality>.block<i>.mean/var` (`invcoss_core.stats`).
        config: the inversion settings.
        method: "generator" (InvUNet + z) or "pixels".
        generator: the only source of randomness (G's initialisation, z, ε, masks, jitter).
        device: where to optimise; None uses the model's device.
        events: receives one `inversion` ProgressEvent per batch.
        amp: bfloat16 autocast on CUDA (ignored elsewhere).
    Raises:
        KeyError: when `stats` holds no statistics for `modality`.
    """

    def __init__(
        self,
        model: MultiModalMAE,
        modality: str,
        stats: Mapping[str, torch.Tensor],
        config: InversionConfig,
        *,
        method: Method = "generator",
        generator: torch.Generator,
        device: torch.device | str | None = None,
        events: EventSink = discard,
        amp: bool = True,
    ) -> None:
        if method not in ("generator", "pixels"):
            raise ValueError(f"method must be 'generator' or 'pixels', got {method!r}")
        self.model = model
        self.modality = modality
        self.spec = model.spec(modality)
        self.config = config
        self.method: Method = method
        self.generator = generator
        self.device = torch.device(device) if device is not None else model.device
        self.events = events
        self.amp = amp and self.device.type == "cuda"
        mean, var = modality_stats(stats, modality, len(model.encoder.blocks))
        self.ref_mean = mean.to(self.device, torch.float32)
        self.ref_var = var.to(self.device, torch.float32)
        self.pool = torch.zeros(0, model.cfg.hidden_size, device=self.device)
        self.net: InvUNet | None = None
        self.net_optimizer: torch.optim.Optimizer | None = None
        if method == "generator":
            with torch.random.fork_rng(devices=[]):
                # Module init draws from the global stream: seed it from our generator, leave the caller's alone.
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
                self.net = InvUNet(
                    spatial_dims=self.spec.spatial_dims,
                    out_channels=self.spec.in_channels,
                    img_size=self.spec.img_size,
                    latent_dim=config.latent_dim,
                    base_channels=config.base_channels,
                    levels=config.levels,
                    noise_channels=config.noise_channels,
                ).to(self.device)
            self.net_optimizer = torch.optim.Adam(self.net.parameters(), lr=config.lr_generator)
        self.batches_done = 0

    # --- one step ----------------------------------------------------------------------------------------------

    def _jitter(self, x: torch.Tensor) -> torch.Tensor:
        """Circularly shift the batch by less than one patch per axis, so no fixed patch grid gets imprinted."""
        if not self.config.jitter:
            return x
        shifts = [int(torch.randint(0, p, (1,), generator=self.generator)) for p in self.spec.patch_size]
        return torch.roll(x, shifts=shifts, dims=tuple(range(2, x.dim())))

    def loss_terms(self, images: torch.Tensor, captured: list[torch.Tensor]) -> InversionTerms:
        """The four terms for a batch, from one masked pass of the frozen model.

        Args:
            images: (B, C, *img_size) in [0, 1], with the graph to the optimised parameters.
            captured: the list `capture_block_inputs` fills (cleared here before the pass).
        Returns:
            InversionTerms with scalar tensors.
        """
        model = self.model
        x = self._jitter(images)
        noise = model.masking_noise(x.shape[0], self.modality, self.generator, self.device)
        captured.clear()
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            enc = model.forward_encoder(x, self.modality, noise=noise)
            pred = model.forward_decoder(enc.latent, enc.ids_restore, self.modality)
        task = task_loss(pred, model.patchify(x, self.modality), enc.mask, model.cfg.norm_pix_loss)
        mean, var = batch_token_stats(captured)
        captured.clear()
        norm = norm_loss(mean, var, self.ref_mean, self.ref_var)
        # (B, D) visible-token mean, like `embed` but under the mask (no extra encoder pass); the repulsion pool
        # keeps the same kind of feature from each batch's last step.
        features = enc.latent[:, 1:].float().mean(dim=1)
        rep = repulsion_loss(features, self.pool)
        return InversionTerms(task=task, norm=norm, img=tv_loss(images), rep=rep, features=features.detach())

    # --- one batch ---------------------------------------------------------------------------------------------

    def _batch_parameters(self, size: int) -> tuple[list[torch.optim.Optimizer], torch.Tensor, torch.Tensor]:
        """Fresh per-batch parameters: (optimizers, tensor optimised, fixed input), drawn from the generator."""
        cfg = self.config
        if self.net is not None and self.net_optimizer is not None:
            noise = self.net.input_noise(size, self.generator, self.device)
            z = torch.randn(size, cfg.latent_dim, generator=self.generator).to(self.device).requires_grad_(True)
            return [self.net_optimizer, torch.optim.Adam([z], lr=cfg.lr_latent)], z, noise
        logits = torch.randn(size, *self.spec.input_shape, generator=self.generator).to(self.device)
        logits.requires_grad_(True)
        return [torch.optim.Adam([logits], lr=cfg.lr_pixels)], logits, torch.empty(0)

    def _images(self, params: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.net is not None:
            return self.net(noise, params)
        return torch.sigmoid(params)

    def iterations_for(self, batch_index: int) -> int:
        """Steps of the `batch_index`-th batch of this synthesizer's life (0-based): amortised after the first."""
        if self.method == "generator" and batch_index > 0:
            return self.config.iterations_per_batch
        return self.config.iterations

    def _run_batch(self, size: int, captured: list[torch.Tensor]) -> _Batch:
        """Optimise one batch of `size` images from fresh latents (or pixels)."""
        optimizers, params, noise = self._batch_parameters(size)
        steps = self.iterations_for(self.batches_done)
        log = []
        pool_features = torch.zeros(0)
        for _ in range(steps):
            images = self._images(params, noise)
            terms = self.loss_terms(images, captured)
            total = terms.total(self.config)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            total.backward()
            for opt in optimizers:
                opt.step()
            log.append(terms.stacked(total))
            if terms.features is not None:
                pool_features = terms.features
        with torch.no_grad():
            images = self._images(params, noise).float()
            features = self.model.embed(images, self.modality)
        captured.clear()
        self.batches_done += 1
        return _Batch(images, features, pool_features, torch.stack(log).cpu())

    # --- the loop ----------------------------------------------------------------------------------------------

    def run(self, num_images: int) -> SynthesisResult:
        """Synthesise `num_images` images in batches of `config.batch_size`.

        Returns:
            SynthesisResult (float16 images on the CPU, their features, per-term history, timing).
        Raises:
            ValueError: for a non-positive `num_images`.
            InversionError: when a loss becomes NaN or inf.
        """
        if num_images < 1:
            raise ValueError(f"num_images must be positive, got {num_images}")
        cfg = self.config
        sizes = [min(cfg.batch_size, num_images - start) for start in range(0, num_images, cfg.batch_size)]
        planned = sum(self.iterations_for(self.batches_done + i) for i in range(len(sizes)))
        images_out: list[torch.Tensor] = []
        features_out: list[torch.Tensor] = []
        logs: list[torch.Tensor] = []
        batch_starts: list[int] = []
        steps = done = 0
        start = time.perf_counter()
        with frozen(self.model), capture_block_inputs(self.model) as captured:
            for size in sizes:
                batch = self._run_batch(size, captured)
                log = batch.log
                if not bool(torch.isfinite(log).all()):
                    raise InversionError(
                        f"the {self.modality} inversion loss became non-finite in batch {self.batches_done}; "
                        "lower inversion.lr_generator / lr_latent / lr_pixels"
                    )
                batch_starts.append(steps)
                steps += log.shape[0]
                done += size
                images_out.append(batch.images.to("cpu", torch.float16))
                features_out.append(batch.features.cpu())
                logs.append(log)
                self.pool = torch.cat([self.pool, batch.pool_features.to(self.device)])[-cfg.pool_size :]
                last = dict(zip(TERM_NAMES, log[-1].tolist()))
                self.events(
                    ProgressEvent(
                        "inversion",
                        self.modality,
                        steps,
                        planned,
                        None,
                        {"images": float(done), **last, "images_per_second": done / (time.perf_counter() - start)},
                    )
                )
        seconds = time.perf_counter() - start
        table = torch.cat(logs)
        history = {name: table[:, i].tolist() for i, name in enumerate(TERM_NAMES)}
        ends = torch.stack([log[-1] for log in logs]).mean(dim=0).tolist()
        result = SynthesisResult(
            images=torch.cat(images_out),
            features=torch.cat(features_out),
            history=history,
            batch_starts=batch_starts,
            seconds=seconds,
            steps=steps,
            method=self.method,
            final=dict(zip(TERM_NAMES, ends)),
        )
        logger.info(
            "%s inversion (%s): %d images in %.1fs (%.2f img/s), final %s",
            self.modality,
            self.method,
            num_images,
            seconds,
            result.images_per_second,
            " ".join(f"{k}={v:.4g}" for k, v in result.final.items()),
        )
        return result


def synthesize(
    model: MultiModalMAE,
    modality: str,
    stats: Mapping[str, torch.Tensor],
    num_images: int,
    config: InversionConfig,
    *,
    generator: torch.Generator,
    device: torch.device | str | None = None,
    events: EventSink = discard,
) -> SynthesisResult:
    """Invert `model` into `num_images` images of `modality` with a fresh InvUNet and latent codes.

    Args:
        model: trained model (frozen while this runs).
        stats: recorded feature statistics with the modality's `block<i>.mean/var` entries.
        num_images: how many images (see `images_needed` for the stage default).
        generator: the source of all randomness; device: where to optimise (default: the model's device).
    Returns:
        SynthesisResult with (N, C, *img_size) float16 images in [0, 1].
    Raises:
        KeyError: no statistics for `modality`. InversionError: a non-finite loss.
    """
    return Synthesizer(model, modality, stats, config, generator=generator, device=device, events=events).run(
        num_images
    )


def pixel_inversion(
    model: MultiModalMAE,
    modality: str,
    stats: Mapping[str, torch.Tensor],
    num_images: int,
    config: InversionConfig,
    *,
    generator: torch.Generator,
    device: torch.device | str | None = None,
    events: EventSink = discard,
) -> SynthesisResult:
    """The "w/o generator" ablation: the same losses, optimising each batch's pixels directly.

    Arguments, returns and errors as `synthesize`; every batch runs `config.iterations` steps.
    """
    return Synthesizer(
        model, modality, stats, config, method="pixels", generator=generator, device=device, events=events
    ).run(num_images)


def mean_pairwise_cosine(features: torch.Tensor) -> float:
    """Mean cosine similarity over distinct pairs of rows of `features` (N, D): a diversity measure (lower = more
    diverse).

    Raises:
        ValueError: for fewer than two rows.
    """
    n = features.shape[0]
    if n < 2:
        raise ValueError("mean_pairwise_cosine needs at least two feature vectors")
    unit = torch.nn.functional.normalize(features.float(), dim=1)
    cos = unit @ unit.T
    return float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))
