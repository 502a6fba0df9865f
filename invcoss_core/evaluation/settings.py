"""Typed benchmark settings per profile, and the methods the benchmark compares.

A profile's `BenchSettings` fixes everything that shapes the numbers — stage order, optimiser steps per stage,
the StageConfig overrides on top of the training profile, probe and reconstruction budgets — so that a named
profile reproduces. Methods differ only by replay strategy and a few config overrides (`METHODS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from invcoss_core.config import MODALITIES, ConfigError, ProfileName, StageConfig, build_config
from invcoss_core.evaluation.probes import ProbeSettings
from invcoss_core.evaluation.recon import ReconSettings


@dataclass(frozen=True)
class MethodSpec:
    """One compared method: its replay strategy and what it changes in the StageConfig.

    replay: a registered replay strategy name, or "joint" (one stage on every modality at once).
    ablation: True for the paper's ablations (they may run with fewer seeds).
    """

    name: str
    replay: str
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)
    ablation: bool = False

    @property
    def sequential(self) -> bool:
        """True for methods trained stage by stage (everything but `joint`)."""
        return self.replay != "joint"

    @property
    def uses_inversion(self) -> bool:
        """True when the method synthesises its replay by model inversion."""
        return self.replay in ("inversion", "pixel_inversion")


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec(
            "joint", "joint", "all modalities at once in one stage (the static reference; needs all data in one place)"
        ),
        MethodSpec("finetune", "none", "sequential training, no replay (lower bound)"),
        MethodSpec("real_buffer", "real_buffer", "MedCoSS: 5 % real buffer, k-means selected (ships real images)"),
        MethodSpec("ewc", "ewc", "elastic weight consolidation (data-free regulariser)"),
        MethodSpec("invcoss", "inversion", "InvCoSS: InvUNet inversion replay, full loss"),
        MethodSpec(
            "invcoss_no_rep",
            "inversion",
            "InvCoSS without repulsion (alpha_rep = 0)",
            {"inversion": {"alpha_rep": 0.0}},
            ablation=True,
        ),
        MethodSpec(
            "invcoss_no_img",
            "inversion",
            "InvCoSS without the image prior (alpha_img = 0)",
            {"inversion": {"alpha_img": 0.0}},
            ablation=True,
        ),
        MethodSpec(
            "pixel_inversion",
            "pixel_inversion",
            "inversion optimising pixels, no generator (paper: w/o generator)",
            ablation=True,
        ),
    )
}
CORE_METHODS: tuple[str, ...] = tuple(n for n, m in METHODS.items() if not m.ablation)


class BenchSettings(BaseModel):
    """Everything a benchmark profile fixes (see `bench_settings`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: ProfileName
    order: tuple[str, ...] = ("ct", "mri", "pathology")  # modality of each stage, in training order
    stage_steps: tuple[int, ...]  # optimiser steps of each stage (same length as `order`)
    epochs_per_stage: int = Field(4, gt=0)  # steps are split into this many epochs (checkpoints, statistics)
    joint_steps: int = Field(gt=0)  # steps of the single joint stage (each: a first-modality batch + one of another)
    seeds: int = Field(3, gt=0)  # seeds of the core methods
    ablation_seeds: int = Field(1, gt=0)  # seeds of the ablations (capped by `seeds`)
    data_seed: int = 0  # fixes the held-out subjects and probe splits: the same for every training seed
    stage_config: dict[str, Any] = Field(default_factory=dict)  # StageConfig overrides over the profile preset
    method_config: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per-method overrides (proposals)
    probe_tasks: tuple[str, ...] | None = None  # None: every task of a modality in `order`
    probe_max_per_class: int | None = Field(None, gt=0)  # None: the data package's default
    probes: ProbeSettings = Field(default_factory=ProbeSettings)
    recon: ReconSettings = Field(default_factory=ReconSettings)
    grid_images: int = Field(8, gt=0)  # images per row in the synthetic-vs-real grids

    @model_validator(mode="after")
    def _consistent(self) -> BenchSettings:
        if len(self.stage_steps) != len(self.order):
            raise ValueError(f"stage_steps {self.stage_steps} needs one entry per stage of order {self.order}")
        if len(self.order) < 2:
            raise ValueError("a continual benchmark needs at least two stages in `order`")
        if len(set(self.order)) != len(self.order):
            raise ValueError(f"order {self.order} repeats a modality")
        unknown = [m for m in self.order if m not in MODALITIES]
        if unknown:
            raise ValueError(f"unknown modalities {unknown} in order; choose from {', '.join(MODALITIES)}")
        if any(s <= 0 for s in self.stage_steps):
            raise ValueError(f"stage_steps must be positive: {self.stage_steps}")
        unknown_methods = sorted(set(self.method_config) - set(METHODS))
        if unknown_methods:
            raise ValueError(f"method_config names unknown methods {unknown_methods}")
        return self

    def seeds_for(self, method: str, seeds: int | None = None) -> int:
        """Seeds a method runs with: `seeds` (or the profile's) for core methods, fewer for ablations."""
        n = seeds or self.seeds
        return min(n, self.ablation_seeds) if METHODS[method].ablation else n

    def config_for(self, method: str, seed: int, stage: int) -> StageConfig:
        """The StageConfig of one method's stage (0-based `stage`; the joint stage uses `joint_steps`).

        Raises:
            ConfigError: when the overrides do not validate.
        """
        spec = METHODS[method]
        steps = self.joint_steps if not spec.sequential else self.stage_steps[stage]
        epochs = min(self.epochs_per_stage, steps)
        overrides = _merge(self.stage_config, spec.overrides)
        overrides = _merge(overrides, self.method_config.get(method, {}))
        replay = "none" if not spec.sequential else spec.replay
        overrides = _merge(
            overrides,
            {
                "seed": seed,
                "replay": {"strategy": replay},
                "train": {"epochs": epochs, "steps_per_epoch": max(1, steps // epochs)},
            },
        )
        if not spec.sequential:
            batch = overrides.get("train", {}).get("batch_size") or build_config(self.profile).train.batch_size
            overrides = _merge(overrides, {"train": {"replay_batch_size": batch}})
        return build_config(self.profile, overrides, source=f"bench profile {self.profile}, method {method}")

    def first_stage_config(self, seed: int) -> StageConfig:
        """The config of the shared first stage: the same for every sequential method (no replay yet)."""
        return self.config_for("finetune", seed, 0)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "modalities":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# --- profiles ---------------------------------------------------------------------------------------------------

_TINY = BenchSettings(
    profile="tiny",
    stage_steps=(24, 16, 16),
    epochs_per_stage=2,
    joint_steps=24,
    seeds=1,
    ablation_seeds=1,
    stage_config={
        "train": {"batch_size": 16, "replay_batch_size": 8, "lr": 2e-3},
        "data": {"samples_per_volume": 16, "max_samples": 96},
        "inversion": {"num_images": 8, "batch_size": 8, "iterations": 4, "iterations_per_batch": 2},
    },
    probe_max_per_class=16,
    probes=ProbeSettings(knn_k=5, linear_steps=20, max_samples=100, folds=2),
    recon=ReconSettings(max_train=64, max_test=32, masks_per_image=1, decoder_steps=12, decoder_batch=32),
    grid_images=4,
)

_SMALL = BenchSettings(
    profile="small",
    # The last stage is 3000 steps: at 1500 pathology steps `finetune`'s MRI reconstruction loss rose
    # +0.177 with a seed spread of 0.100 (per seed +0.126 / +0.292 / +0.113), under the 2x-spread criterion.
    # The first stage is trained to convergence: at 2000 steps the held-out CT loss was still falling (0.771; 0.658
    # at 6000, flat over the last 1000) and the CT probes' margin over a random encoder was half of what it became
    # (benchmarks/bench_stage_convergence.py) — too little learned for the probes to see it forgotten. The run
    # small-ras (docs/results/HISTORY.md) used (2000, 1500, 3000) in 5 epochs (`--stage-steps 2000,1500,3000
    # --epochs-per-stage 5`). The MRI stage is trained to convergence as well: at 1500 steps (run small-ct6k-fixed)
    # its held-out loss was 0.956 and the MRI probes gained +1.6 / -1.0 points over a random encoder, so their later
    # change was noise; at 4500 the loss is 0.879 and the gain +6.8 / +10.9 (run small-mri45).
    stage_steps=(6000, 4500, 3000),
    epochs_per_stage=6,
    # A joint step is one CT batch plus one batch of MRI or pathology in turn: 9000 steps give CT more batches than
    # converged its own stage and the later modalities at least their sequential stages' (4500 MRI, 4500 pathology;
    # runs small-ct6k-fixed used 6000 with MRI 1500, small-ras 2000: `--joint-steps N`).
    joint_steps=9000,
    seeds=3,
    ablation_seeds=1,
    stage_config={
        "train": {"batch_size": 64, "replay_batch_size": 32, "lr": 1e-3},
        "data": {"samples_per_volume": 2048},
    },
    # The pixels ablation optimises every batch for `iterations` steps: at the preset's 600 (set for the generator's
    # first batch) its MRI inversion alone would take ~9600 steps. 100 per batch gives it about the generator's
    # budget (CT 400 vs 780 steps, MRI 1600 vs 1500), as in run small-mri45 (docs/results/HISTORY.md; its stored
    # runs stay valid: `iterations_per_batch`, unused by pixels, keeps their 6 too).
    method_config={"pixel_inversion": {"inversion": {"iterations": 100, "iterations_per_batch": 6}}},
    # Every probe task is cross-validated over its subjects (or region cuts): with two or three subjects per task,
    # one held-out subject measured the shift between patients as much as the encoder.
    probes=ProbeSettings(knn_k=10, linear_steps=100, max_samples=2000, folds=5),
    # The refitted-decoder probe is off: in the forgetting check it could not tell the trained CT encoder from a
    # random one (held-out loss 0.919 vs 0.926) and did not move while the own-decoder loss rose 0.77 -> 1.11.
    recon=ReconSettings(max_test=1024, decoder_steps=0),
)

_BASE = BenchSettings(
    profile="base",
    stage_steps=(20000, 15000, 15000),
    epochs_per_stage=20,
    joint_steps=30000,
    seeds=3,
    ablation_seeds=3,
    stage_config={"data": {"samples_per_volume": 1024}},
    # As in `small`: the pixels ablation runs `iterations` on every batch, so 100 keeps it near the generator's
    # budget (the preset's 600 first-batch steps).
    method_config={"pixel_inversion": {"inversion": {"iterations": 100}}},
    probes=ProbeSettings(knn_k=20, linear_steps=200, max_samples=4000, folds=5),
    recon=ReconSettings(max_train=2048, max_test=1024, masks_per_image=2, decoder_steps=1000, decoder_batch=128),
)

_PROFILES: dict[str, BenchSettings] = {"tiny": _TINY, "small": _SMALL, "base": _BASE}


def bench_settings(profile: str, **changes: Any) -> BenchSettings:
    """The benchmark settings of a profile, optionally with top-level fields replaced (e.g. order=...).

    Raises:
        ConfigError: for an unknown profile or changes that do not validate.
    """
    if profile not in _PROFILES:
        raise ConfigError(f"unknown bench profile {profile!r}; choose one of {', '.join(_PROFILES)}")
    base = _PROFILES[profile]
    if not changes:
        return base
    try:
        return BenchSettings.model_validate({**base.model_dump(), **changes})
    except ValueError as err:
        raise ConfigError(f"invalid bench settings for profile {profile}: {err}") from None
