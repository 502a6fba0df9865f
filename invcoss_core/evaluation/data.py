"""The benchmark's data: per-modality train / held-out images and the labelled probe tasks, loaded once.

Everything is loaded with one fixed `data_seed`, so every method and every training seed sees the same images,
the same held-out subjects and the same probe splits; seeds vary the training only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from invcoss_core.config import StageConfig
from invcoss_core.data import ProbeTaskTooSmallError, list_probe_tasks, load_probe_task, load_site_dataset

logger = logging.getLogger(__name__)

LEFT_OUT_NOTE = "probe task left out: "  # starts the BenchData note of a task too small for the inputs


class BenchDataError(ValueError):
    """The benchmark's data cannot be assembled (a modality or a requested probe task is missing)."""


@dataclass(frozen=True)
class ModalityData:
    """One modality's SSL images: `train` (N, C, *img_size) trains stages; `val` (M, ...) held-out subjects."""

    modality: str
    train: torch.Tensor
    val: torch.Tensor
    note: str = ""


@dataclass(frozen=True)
class ProbeTask:
    """One labelled probe task: x (N, C, *img_size), y (N,), train_mask (N,) bool (test = ~train_mask).

    folds: (K, N) int8 cross-validation folds (1 train, 0 test, -1 unused), the first equal to train_mask; None
    means the primary split only.
    """

    name: str
    modality: str
    x: torch.Tensor
    y: torch.Tensor
    train_mask: torch.Tensor
    classes: tuple[str, ...]
    pseudo: bool = False
    split_note: str = ""
    folds: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes of the task."""
        return len(self.classes)

    @property
    def num_folds(self) -> int:
        """Cross-validation folds available (1: the primary split only)."""
        return 1 if self.folds is None else int(self.folds.shape[0])

    def fold(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(train, test) sample indices of fold `k` (fold 0 is the primary split `train_mask`)."""
        rows = self.folds if self.folds is not None else self.train_mask.to(torch.int8)[None]
        flags = rows[k]
        return torch.nonzero(flags == 1)[:, 0], torch.nonzero(flags == 0)[:, 0]


@dataclass(frozen=True)
class BenchData:
    """All the data of one benchmark run."""

    modalities: dict[str, ModalityData]
    tasks: list[ProbeTask]
    source: str  # where it came from (a folder, or "synthetic" in tests)
    notes: list[str] = field(default_factory=list)

    def check(self, order: tuple[str, ...]) -> None:
        """Refuse data that lacks a modality of the plan or a task of a planned modality.

        Raises:
            BenchDataError: naming what is missing.
        """
        missing = [m for m in order if m not in self.modalities]
        if missing:
            raise BenchDataError(f"no images for modalities {missing} in {self.source}")
        if not any(t.modality in order for t in self.tasks):
            raise BenchDataError(f"no probe task for any of {list(order)} in {self.source}")


def load_bench_data(
    root: Path,
    config: StageConfig,
    order: tuple[str, ...],
    seed: int,
    tasks: tuple[str, ...] | None = None,
    max_per_class: int | None = None,
) -> BenchData:
    """Load the SSL images (train and held-out splits) and the probe tasks of the modalities in `order`.

    A task whose images are too small for the input size (`ProbeTaskTooSmallError`) is left out, with a warning
    and a note in `BenchData.notes` (starting with `LEFT_OUT_NOTE`), unless `tasks` names it.

    Args:
        root: a sample-data folder (`invcoss samples fetch`): `<modality>/` image folders and `labels/`.
        config: gives the model input shapes and the data settings (samples per volume, held-out share).
        order: the stage modalities.
        seed: the data seed (held-out subjects, sample positions, probe splits).
        tasks: probe task names; None takes every task of a modality in `order`.
        max_per_class: probe samples per class (None: the data package's default).

    Raises:
        BenchDataError: for a missing modality or an unknown requested task.
        SiteDataError: when a folder cannot be read, or a task named in `tasks` is too small for the input size.
    """
    root = Path(root)
    modalities: dict[str, ModalityData] = {}
    for modality in order:
        spec = config.model.spec(modality)
        train = load_site_dataset(root, modality, spec, config.data, split="train", seed=seed)
        val = load_site_dataset(root, modality, spec, config.data, split="val", seed=seed)
        modalities[modality] = ModalityData(
            modality, train.tensors(), val.tensors(), note=f"{train.report.summary()}; {val.report.summary()}"
        )
    available = {info.name: info for info in list_probe_tasks(root)}
    wanted = list(tasks) if tasks is not None else [n for n, i in available.items() if i.modality in order]
    unknown = [t for t in wanted if t not in available]
    if unknown:
        raise BenchDataError(f"unknown probe tasks {unknown}; {root} offers {sorted(available)}")
    probe_tasks = []
    notes = [m.note for m in modalities.values()]
    for name in wanted:
        info = available[name]
        if info.modality not in order:
            raise BenchDataError(f"probe task {name} is a {info.modality} task, but {info.modality} is not a stage")
        try:
            probe = load_probe_task(
                root, name, config.model.spec(info.modality), seed=seed, max_per_class=max_per_class
            )
        except ProbeTaskTooSmallError as err:
            if tasks is not None:  # asked for by name: the caller must know
                raise
            # Every task was wanted by default: score the others, and say which one is missing and why.
            logger.warning("left out: %s", err)
            notes.append(f"{LEFT_OUT_NOTE}{err}")
            continue
        probe_tasks.append(
            ProbeTask(
                name=name,
                modality=info.modality,
                x=probe.x,
                y=probe.y,
                train_mask=probe.train_mask,
                classes=tuple(probe.classes),
                pseudo=probe.pseudo,
                split_note=probe.split_note,
                folds=probe.folds,
            )
        )
    probe_tasks.sort(key=lambda t: (order.index(t.modality), t.name))
    return BenchData(modalities, probe_tasks, source=str(root), notes=notes)
