"""The replay-strategy interface of the stage loop, and the shared pool-sampling base."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch.utils.data import Dataset

from invcoss_core.artifact import Artifact, GateSummary
from invcoss_core.common.events import EventSink, discard
from invcoss_core.config import StageConfig
from invcoss_core.models import MultiModalMAE


class ReplayError(RuntimeError):
    """A replay strategy cannot run with what it was given (missing pool, wrong artifact)."""


@dataclass
class ReplayContext:
    """What a strategy sees of the stage it serves."""

    config: StageConfig
    modality: str  # this stage's (real) modality
    student: MultiModalMAE  # the model being trained
    teacher: MultiModalMAE | None  # frozen copy of the incoming model; None in a first stage
    incoming: Artifact | None
    device: torch.device
    events: EventSink = discard


@dataclass(frozen=True)
class ReplayBatch:
    """One single-modality batch of replay images, (B, C, *img_size) float32 on the stage's device.

    objective: "distill" (mixup + feature distillation to the frozen previous model: the continual path) or
    "mae" (masked reconstruction, as on current data: the joint-training reference).
    """

    modality: str
    images: torch.Tensor
    objective: Literal["distill", "mae"] = "distill"


@dataclass
class ReplayOutcome:
    """What a strategy adds to the outgoing artifact after the stage."""

    synthetic: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> float16 pool (accumulated)
    extras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    gate: GateSummary | None = None
    seconds: float = 0.0  # time spent producing the replay (inversion, k-means, Fisher)
    metrics: dict[str, float] = field(default_factory=dict)
    previews: dict[str, bytes] = field(default_factory=dict)  # modality -> PNG of this stage's synthetic images


class ReplayStrategy(ABC):
    """Decides what earlier-modality data the stage loop replays and what the stage hands on.

    The loop calls `begin_stage` once, `sample_batch` / `penalty` every step, `end_stage` once after training.
    """

    name: ClassVar[str]
    ships_real_data: ClassVar[bool] = False  # True: the hand-off would contain real images

    def __init__(self) -> None:
        self.ctx: ReplayContext | None = None

    def begin_stage(self, ctx: ReplayContext) -> None:
        """Take in the incoming artifact and the models."""
        self.ctx = ctx

    def sample_batch(self, step: int, generator: torch.Generator) -> ReplayBatch | None:
        """The replay batch for optimizer step `step`, or None when there is nothing to replay."""
        return None

    def penalty(self, model: MultiModalMAE) -> torch.Tensor | None:
        """A regulariser added to every step's loss (EWC), or None."""
        return None

    @abstractmethod
    def end_stage(
        self, ctx: ReplayContext, real_data: Dataset[torch.Tensor], stats: Mapping[str, torch.Tensor]
    ) -> ReplayOutcome:
        """Produce what travels on: pools, extra tensors, gate summary.

        Args:
            ctx: the same context as `begin_stage`, with the trained student.
            real_data: this stage's real training samples (stay on the site).
            stats: the feature statistics recorded for this stage's modality (see `invcoss_core.stats`).
        """


class PoolReplay(ReplayStrategy):
    """Replays image pools of earlier modalities (synthetic or, for the baseline, real), cycling modalities."""

    pool_source: ClassVar[str] = "synthetic"  # "synthetic" or the name of an extras file

    def __init__(self) -> None:
        super().__init__()
        self.pools: dict[str, torch.Tensor] = {}

    def incoming_pools(self, incoming: Artifact | None) -> dict[str, torch.Tensor]:
        """The pools carried by the incoming artifact for this strategy."""
        if incoming is None:
            return {}
        if self.pool_source == "synthetic":
            return dict(incoming.synthetic)
        return dict(incoming.extras.get(self.pool_source, {}))

    def begin_stage(self, ctx: ReplayContext) -> None:
        super().begin_stage(ctx)
        pools = self.incoming_pools(ctx.incoming)
        self.pools = {m: p.float() for m, p in pools.items() if m != ctx.modality and p.shape[0] > 0}
        if ctx.incoming is not None and ctx.incoming.manifest.stage_index >= 1 and not self.pools:
            raise ReplayError(
                f"replay '{self.name}' found no earlier-modality pool in the incoming artifact "
                f"(its replay was '{ctx.incoming.manifest.replay}'); start the run with the same replay strategy"
            )

    def sample_batch(self, step: int, generator: torch.Generator) -> ReplayBatch | None:
        if not self.pools or self.ctx is None:
            return None
        names = sorted(self.pools)
        modality = names[step % len(names)]
        pool = self.pools[modality]
        size = min(self.ctx.config.train.replay_batch_size, pool.shape[0])
        idx = torch.randperm(pool.shape[0], generator=generator)[:size]
        return ReplayBatch(modality=modality, images=pool[idx].to(self.ctx.device))

    @staticmethod
    def accumulate(old: Mapping[str, torch.Tensor], modality: str, new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Earlier pools plus this stage's, as float16 (a re-visited modality's pool is replaced)."""
        pools = {m: p.to(torch.float16) for m, p in old.items() if m != modality}
        pools[modality] = new.detach().to("cpu", torch.float16)
        return pools
