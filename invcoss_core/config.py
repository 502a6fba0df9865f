"""Typed configuration: pydantic v2 models, named profiles and TOML loading with precise errors."""

from __future__ import annotations

import math
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MODALITIES: tuple[str, ...] = ("ct", "mri", "pathology", "xray")
ProfileName = Literal["tiny", "small", "base"]
ReplayName = Literal["none", "real_buffer", "ewc", "inversion", "pixel_inversion"]
PROFILES: tuple[str, ...] = ("tiny", "small", "base")
WeightsDtype = Literal["float32", "float16", "bfloat16"]  # how a hand-off stores its floating weights
_ATOMIC_KEYS = ("modalities",)  # an override's `model.modalities` replaces the preset's set, it does not add to it


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the file and key."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModalitySpec(_Frozen):
    """How one modality is tokenised: the model's input shape for it."""

    spatial_dims: Literal[2, 3]  # 2: X-ray, pathology tiles, slices; 3: CT / MRI sub-volumes
    in_channels: int = Field(ge=1, le=4)  # 1 for grey-level images, 3 for RGB pathology
    img_size: tuple[int, ...]  # model input size per spatial axis, e.g. (16, 16) or (16, 16, 16)
    patch_size: tuple[int, ...]  # ViT patch size per spatial axis; must divide img_size

    @model_validator(mode="after")
    def _shapes_agree(self) -> ModalitySpec:
        if len(self.img_size) != self.spatial_dims or len(self.patch_size) != self.spatial_dims:
            raise ValueError(
                f"img_size {self.img_size} and patch_size {self.patch_size} need {self.spatial_dims} entries "
                f"(spatial_dims={self.spatial_dims})"
            )
        for size, patch in zip(self.img_size, self.patch_size):
            if patch <= 0 or size <= 0 or size % patch:
                raise ValueError(f"patch_size {self.patch_size} must divide img_size {self.img_size}")
        return self

    @property
    def num_patches(self) -> int:
        """Number of tokens one image becomes."""
        return math.prod(s // p for s, p in zip(self.img_size, self.patch_size))

    @property
    def patch_dim(self) -> int:
        """Pixels per patch times channels: the length of one reconstruction target."""
        return self.in_channels * math.prod(self.patch_size)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample tensor: (C, *img_size)."""
        return (self.in_channels, *self.img_size)


class ModelConfig(_Frozen):
    """Multi-modal MAE: a shared ViT encoder, per-modality tokenizers and heads, a shared decoder."""

    hidden_size: int = Field(32, gt=0)  # encoder width
    num_layers: int = Field(2, gt=0)  # encoder transformer blocks
    num_heads: int = Field(2, gt=0)
    mlp_dim: int = Field(64, gt=0)
    decoder_hidden_size: int = Field(32, gt=0)
    decoder_layers: int = Field(1, gt=0)
    decoder_heads: int = Field(2, gt=0)
    decoder_mlp_dim: int = Field(64, gt=0)
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0)
    norm_pix_loss: bool = True  # MAE's normalised-pixel target (per-patch mean/var)
    modalities: dict[str, ModalitySpec] = Field(default_factory=lambda: _tiny_modalities())

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.decoder_hidden_size % self.decoder_heads:
            raise ValueError(
                f"decoder_hidden_size {self.decoder_hidden_size} must be divisible by "
                f"decoder_heads {self.decoder_heads}"
            )
        if not self.modalities:
            raise ValueError("modalities must name at least one modality")
        return self

    def spec(self, modality: str) -> ModalitySpec:
        """The ModalitySpec of `modality`.

        Raises:
            ConfigError: if the model has no tokenizer for it.
        """
        try:
            return self.modalities[modality]
        except KeyError:
            raise ConfigError(f"unknown modality {modality!r}; this model knows {sorted(self.modalities)}") from None


class TrainConfig(_Frozen):
    """One stage's optimisation: AdamW, warm-up + cosine, replay balance."""

    epochs: int = Field(2, gt=0)
    batch_size: int = Field(8, gt=0)
    lr: float = Field(1.5e-3, gt=0)  # peak learning rate after warm-up
    min_lr: float = Field(1e-5, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)  # share of the stage's steps spent warming up
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = Field(1.0, gt=0)  # max global grad norm; None disables clipping
    amp: bool = True  # autocast on CUDA (bf16); ignored on CPU
    steps_per_epoch: int | None = Field(None, gt=0)  # None: one pass over the real data
    replay_batch_size: int = Field(8, gt=0)
    distill_weight: float = Field(1.0, ge=0)  # weight of the replay feature-distillation loss
    replay_mae_weight: float = Field(0.0, ge=0)  # ablation: MAE loss on replay batches (0 = off, as designed)
    mixup: bool = True  # intra-modal mixup on replay batches, per-sample lambda ~ U(0, 1)
    num_workers: int = Field(0, ge=0)
    stats_batches: int | None = Field(None, gt=0)  # batches of the last epoch that feed the statistics; None = all

    @model_validator(mode="after")
    def _lr_order(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} must not exceed lr {self.lr}")
        return self


class ReplayConfig(_Frozen):
    """Which replay strategy a stage uses and its parameters."""

    strategy: ReplayName = "none"
    buffer_fraction: float = Field(0.05, gt=0, le=1)  # real_buffer: share of the stage's data kept
    cluster_fraction: float = Field(0.01, gt=0, le=1)  # real_buffer: k-means clusters as a share of N
    kmeans_iters: int = Field(25, gt=0)
    ewc_lambda: float = Field(100.0, ge=0)
    ewc_batches: int = Field(8, gt=0)  # batches used to estimate the diagonal Fisher

    @model_validator(mode="after")
    def _buffer_vs_clusters(self) -> ReplayConfig:
        if self.cluster_fraction > self.buffer_fraction:
            raise ValueError(
                f"cluster_fraction {self.cluster_fraction} must not exceed buffer_fraction "
                f"{self.buffer_fraction} (each cluster keeps at least one sample)"
            )
        return self


class InversionConfig(_Frozen):
    """Model inversion into synthetic replay images (InvUNet generator or pixels)."""

    num_images: int | None = Field(None, gt=0)  # per stage; None: image_fraction of the stage's training set
    image_fraction: float = Field(0.05, gt=0, le=1)
    min_images: int = Field(8, gt=0)
    batch_size: int = Field(16, gt=0)
    iterations: int = Field(60, gt=0)  # optimisation steps of the first batch (of every batch for pixel_inversion)
    # Steps of each later batch: the warm generator amortises. Measured (small profile, real CT): later batches end
    # at the first batch's final L_inv (1.36) after 5 steps (1.33–1.40), 10 (1.25–1.34) or 15 (1.27–1.33) — at the
    # level of an under-trained first batch; the small preset now trains G far longer (600 + 60, see there).
    iterations_per_batch: int = Field(6, gt=0)
    # 5e-3, not the paper's 2e-4: with tens (not thousands) of steps per batch, 2e-4 left G nearly where it
    # started (L_inv 2.46 → 2.20 in 60 steps vs → 1.13 at 1e-2 on real pathology crops, tiny profile).
    lr_generator: float = Field(5e-3, gt=0)
    lr_latent: float = Field(0.05, gt=0)
    lr_pixels: float = Field(0.05, gt=0)  # pixel_inversion only (Adam on the pixels' logits)
    latent_dim: int = Field(32, gt=0)  # z, injected at the InvUNet bottleneck
    base_channels: int = Field(8, gt=0)  # InvUNet width at full resolution (3D cost grows with it, ~linearly)
    levels: int = Field(2, ge=1, le=5)  # InvUNet down-sampling steps; every img_size axis must divide by 2**levels
    noise_channels: int = Field(4, gt=0)  # channels of the fixed per-image noise the main branch encodes
    jitter: bool = True  # random circular shift (< one patch) before the frozen model, against patch-grid artefacts
    alpha_task: float = Field(1.0, ge=0)
    # L_norm is standardised per channel and averaged over layers. 3, not 1: at 1 L_task (easiest on flat images)
    # won and the pools came out low-contrast and far from the real data. Measured on the small profile's seed-0
    # models (102 CT / 512 MRI images): nearest-pool cosine of held-out real images CT 0.80 -> 0.84, MRI 0.84 -> 0.85;
    # CT per-image pixel sd 0.045 -> 0.116 (real 0.085). 10 gave no more (0.844).
    alpha_norm: float = Field(3.0, ge=0)
    alpha_img: float = Field(0.1, ge=0)  # total variation
    alpha_rep: float = Field(0.1, ge=0)  # repulsion from the features of images already generated
    pool_size: int = Field(256, gt=0)  # features kept for the repulsion pool (the most recent ones)

    @model_validator(mode="after")
    def _some_loss(self) -> InversionConfig:
        if self.alpha_task == 0 and self.alpha_norm == 0:
            raise ValueError("alpha_task and alpha_norm are both 0: set at least one so the inversion sees the model")
        return self


class GateConfig(_Frozen):
    """Privacy gate: synthetic images too close to a real training image never leave the site."""

    # Defaults from measurements on the real sample crops (see invcoss_core/inversion/gate.py): the gate relies on
    # pixel correlation; the feature cosine only backs it up against near-exact copies.
    pixel_threshold: float = Field(0.9, gt=0, le=1)  # max Pearson correlation to any real image
    feature_threshold: float = Field(0.99999, gt=0, le=1)  # max cosine of real-mean-centred encoder features
    action: Literal["regenerate", "drop"] = "regenerate"
    max_regenerate_rounds: int = Field(2, ge=0)  # then the images still blocked are dropped
    chunk_size: int = Field(256, gt=0)  # real images compared at a time (bounds the gate's memory)
    # Disguised copies (invcoss_core/inversion/disguise.py): best pixel correlation with any real image after undoing
    # a flip, a shift of up to copy_max_shift pixels and a crop of copy_scales of the side; None turns it off.
    copy_threshold: float | None = Field(0.9, gt=0, le=1)
    copy_max_shift: int = Field(2, ge=0)
    copy_scales: tuple[float, ...] = (0.75, 0.8125, 0.875)
    copy_candidates: int = Field(8, gt=0)  # real images per synthetic image searched at full resolution


class DataConfig(_Frozen):
    """How a site's image folder becomes training samples."""

    strict: bool = False  # True: any unreadable file stops the stage; False: skip and count
    samples_per_volume: int = Field(32, gt=0)  # sub-volumes / slices / patches drawn per image file
    val_fraction: float = Field(0.2, ge=0, lt=1)  # held-out subjects for evaluation
    max_samples: int | None = Field(None, gt=0)


class PrivacyConfig(_Frozen):
    """Privacy audit of the hand-off (invcoss_core/privacy) and the policy that may hold it on the site."""

    # Share of the site's training subjects kept out of training as the audit's non-members (by subject, seeded by
    # the run seed); 0 turns the audit off. Fewer than 2 subjects: the audit is reported as not measured.
    audit_fraction: float = Field(0.15, ge=0, lt=1)
    audit_samples: int = Field(256, gt=0)  # at most this many member and non-member samples are attacked (time)
    mask_repeats: int = Field(4, gt=0)  # random masks per sample whose losses are averaged (less mask noise)
    max_mia_auc: float = Field(0.60, ge=0.5, le=1)  # calibrated loss-attack AUC above which the hand-off is held
    # Operator override: hand off even above max_mia_auc; recorded in the signed manifest ("released_by_operator").
    release_above_max: bool = False
    # Differentially private training (DP-SGD, invcoss_core/privacy/dp.py): the Gaussian noise's standard deviation
    # relative to the per-sample clipping norm; None trains without DP. The (ε, δ) it gives goes into the manifest.
    dp_noise_multiplier: float | None = Field(None, gt=0)
    dp_max_grad_norm: float = Field(1.0, gt=0)  # each real sample's gradient is clipped to this L2 norm
    dp_delta: float = Field(1e-5, gt=0, lt=1)  # the δ at which ε is reported; keep it below 1 / training samples
    dp_microbatch: int = Field(16, gt=0)  # per-sample gradients computed this many at a time (memory vs speed)


class StageConfig(_Frozen):
    """Everything one stage needs; a profile preset plus TOML overrides."""

    profile: ProfileName = "tiny"
    seed: int = 0
    # Data-parallel training processes at the site (torch.distributed): one per GPU with NCCL, or CPU processes
    # with gloo; train.batch_size is the global batch and must divide by it. Site-local: site.toml `[stage]`.
    devices: int = Field(1, gt=0)
    # The dtype of the weights in this stage's hand-off artifact (recorded in its manifest): "float16" or
    # "bfloat16" halve weights.safetensors; the next stage loads them into its float32 model. Synthetic pools are
    # float16 in every case. Measured in docs/results/real-sizes/handoff.md.
    handoff_weights: WeightsDtype = "float32"
    model: ModelConfig = Field(default_factory=lambda: ModelConfig())
    train: TrainConfig = Field(default_factory=lambda: TrainConfig())
    replay: ReplayConfig = Field(default_factory=lambda: ReplayConfig())
    inversion: InversionConfig = Field(default_factory=lambda: InversionConfig())
    gate: GateConfig = Field(default_factory=lambda: GateConfig())
    data: DataConfig = Field(default_factory=lambda: DataConfig())
    privacy: PrivacyConfig = Field(default_factory=lambda: PrivacyConfig())

    @model_validator(mode="after")
    def _batch_per_device(self) -> StageConfig:
        if self.privacy.dp_noise_multiplier is not None and self.devices > 1:
            raise ValueError(
                "privacy.dp_noise_multiplier (DP-SGD) runs in one process: set devices = 1 (or remove "
                "privacy.dp_noise_multiplier)"
            )
        if self.train.batch_size % self.devices:
            raise ValueError(
                f"train.batch_size {self.train.batch_size} is the global batch of {self.devices} devices and must "
                "divide by it: set train.batch_size to a multiple of devices"
            )
        return self


def _tiny_modalities() -> dict[str, ModalitySpec]:
    return {
        "ct": ModalitySpec(spatial_dims=3, in_channels=1, img_size=(16, 16, 16), patch_size=(4, 4, 4)),
        "mri": ModalitySpec(spatial_dims=3, in_channels=1, img_size=(16, 16, 16), patch_size=(4, 4, 4)),
        "pathology": ModalitySpec(spatial_dims=2, in_channels=3, img_size=(16, 16), patch_size=(4, 4)),
        "xray": ModalitySpec(spatial_dims=2, in_channels=1, img_size=(16, 16), patch_size=(4, 4)),
    }


def _modalities(size2d: int, patch2d: int, size3d: int, patch3d: int) -> dict[str, dict[str, Any]]:
    vol = {"spatial_dims": 3, "in_channels": 1, "img_size": (size3d,) * 3, "patch_size": (patch3d,) * 3}
    return {
        "ct": vol,
        "mri": vol,
        "pathology": {"spatial_dims": 2, "in_channels": 3, "img_size": (size2d,) * 2, "patch_size": (patch2d,) * 2},
        "xray": {"spatial_dims": 2, "in_channels": 1, "img_size": (size2d,) * 2, "patch_size": (patch2d,) * 2},
    }


# Presets: the code defaults above are `tiny`; larger profiles override only what differs.
_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "small": {
        "model": {
            "hidden_size": 128,
            "num_layers": 4,
            "num_heads": 4,
            "mlp_dim": 512,
            "decoder_hidden_size": 64,
            "decoder_layers": 2,
            "decoder_heads": 4,
            "decoder_mlp_dim": 256,
            "modalities": _modalities(size2d=32, patch2d=4, size3d=16, patch3d=4),
        },
        "train": {"epochs": 20, "batch_size": 64, "replay_batch_size": 32, "lr": 1e-3},
        "inversion": {
            "batch_size": 32,
            # 600 + 60, not 100 + 6: CT's 102 images are four batches, so G got 118 steps and its images stayed off
            # the real data (seed-0 CT model: pixel sd 0.062 vs 0.083 real, nearest-pool cosine of held-out real
            # images 0.717 vs 0.874 to the training set, pool self-similarity 0.659 vs 0.450, L_norm 0.41); at
            # 600 + 60: sd 0.082, cosine 0.771, self-similarity 0.473, L_norm 0.20, and the benchmark's CT
            # reconstruction loss after the last stage rose +0.014 instead of +0.034 (five seeds, buffer +0.004;
            # run small-mri45-inv600, docs/results/HISTORY.md). Cost: the CT inversion took 67 s instead of 11 s
            # alone on 2 CPU threads; with three or four runs sharing two cores CT 187 s instead of 37 s, MRI 381 s
            # instead of 84 s.
            # `pixel_inversion` runs `iterations` on every batch: its bench run keeps 100 (see bench settings).
            "iterations": 600,
            "iterations_per_batch": 60,
            "latent_dim": 64,
            "base_channels": 16,
        },
        "data": {"samples_per_volume": 128},
    },
    "base": {
        "model": {
            "hidden_size": 768,
            "num_layers": 12,
            "num_heads": 12,
            "mlp_dim": 3072,
            "decoder_hidden_size": 512,
            "decoder_layers": 8,
            "decoder_heads": 16,
            "decoder_mlp_dim": 2048,
            "modalities": _modalities(size2d=224, patch2d=16, size3d=96, patch3d=16),
        },
        "train": {"epochs": 100, "batch_size": 64, "replay_batch_size": 32, "lr": 1.5e-4, "num_workers": 4},
        "inversion": {
            "batch_size": 32,
            # The small preset's 600 + 60, not the 200 + 12 this had: at `small`, 100 + 6 left the generator
            # under-trained and the first batch's steps were what counted (see there). Not measured at this size:
            # the InvUNet here is wider and deeper and the images larger, so it may need more; not a tuned value.
            "iterations": 600,
            "iterations_per_batch": 60,
            "latent_dim": 128,
            "base_channels": 32,
            "levels": 3,
        },
        "data": {"samples_per_volume": 256, "max_samples": 2048},  # samples are held in memory: 96³ ≈ 3.5 MB each
    },
}


def deep_merge(base: dict[str, Any], override: dict[str, Any], atomic_keys: Collection[str] = ()) -> dict[str, Any]:
    """`override` on top of `base`, merging nested tables key by key (neither input is changed).

    Args:
        base: the lower layer, e.g. a profile preset or the plan's defaults.
        override: the upper layer; its values win.
        atomic_keys: keys whose tables replace the lower table whole instead of merging into it.
    Returns:
        the merged mapping.
    """
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in atomic_keys:
            merged[key] = deep_merge(merged[key], value, atomic_keys)
        else:
            merged[key] = value
    return merged


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem, each naming the key, under a header naming the file.

    Args:
        err: pydantic's error for one validated mapping.
        source: where the mapping came from (a file path, or e.g. "stage 2 of the plan").
    Returns:
        a multi-line message for a ConfigError.
    """
    lines = [f"invalid configuration in {source}:"]
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{key}': check its spelling against the documented keys")
        elif item["type"] == "missing":
            lines.append(f"  - '{key}' is required")
        else:
            lines.append(f"  - '{key}': {item['msg']}")
    return "\n".join(lines)


def preset(profile: str) -> dict[str, Any]:
    """The raw override dictionary of a named profile.

    Raises:
        ConfigError: for an unknown profile name.
    """
    if profile not in _PRESETS:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return deep_merge({"profile": profile}, _PRESETS[profile], _ATOMIC_KEYS)


def build_config(
    profile: str = "tiny", overrides: dict[str, Any] | None = None, source: str = "<overrides>"
) -> StageConfig:
    """Validate a profile preset with optional overrides into a StageConfig.

    Args:
        profile: preset name (`tiny`, `small`, `base`); an override's `profile` key wins.
        overrides: nested mapping in the StageConfig layout, e.g. ``{"train": {"epochs": 3}}``.
        source: where the overrides came from, used in error messages (a file path).

    Raises:
        ConfigError: naming the offending key and the source.
    """
    overrides = dict(overrides or {})
    profile = str(overrides.get("profile", profile))
    merged = deep_merge(preset(profile), overrides, _ATOMIC_KEYS)
    try:
        return StageConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file.

    Raises:
        ConfigError: when the file is missing or is not valid TOML (with the parser's position).
    """
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None


def load_config(path: Path | None, profile: str = "tiny", overrides: dict[str, Any] | None = None) -> StageConfig:
    """Load a StageConfig from a TOML file (layout of StageConfig) over a profile preset.

    Args:
        path: TOML file or None for the preset alone.
        profile: preset used when the file does not set `profile`.
        overrides: applied last (e.g. command-line options).

    Raises:
        ConfigError: naming the file and the key that is wrong.
    """
    data: dict[str, Any] = read_toml(path) if path is not None else {}
    if overrides:
        data = deep_merge(data, overrides, _ATOMIC_KEYS)
    return build_config(profile, data, source=str(path) if path else "<defaults>")
