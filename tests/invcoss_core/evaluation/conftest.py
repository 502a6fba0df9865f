"""Fixtures of the evaluation tests: the real sample data (fetched once) and a small synthetic BenchData."""

from __future__ import annotations

import torch

from invcoss_core.config import StageConfig
from invcoss_core.evaluation.data import BenchData, ModalityData, ProbeTask
from tests.helpers import structured_images


def _task(name: str, modality: str, shape: tuple[int, ...], seed: int) -> ProbeTask:
    blobs = structured_images(12, shape, seed=seed, kind="blobs")
    stripes = structured_images(12, shape, seed=seed + 1, kind="stripes")
    x = torch.cat([blobs, stripes])
    y = torch.cat([torch.zeros(12, dtype=torch.long), torch.ones(12, dtype=torch.long)])
    train_mask = torch.arange(24) % 3 != 0
    return ProbeTask(name, modality, x, y, train_mask, ("blobs", "stripes"), split_note="every third sample tests")


def synthetic_bench_data(config: StageConfig, order: tuple[str, ...] = ("ct", "mri", "pathology")) -> BenchData:
    """Structured images per modality (different textures per modality) and one two-class task each."""
    modalities = {}
    tasks = []
    for i, modality in enumerate(order):
        shape = config.model.spec(modality).input_shape
        kind = "blobs" if i % 2 == 0 else "stripes"
        modalities[modality] = ModalityData(
            modality,
            structured_images(32, shape, seed=10 + i, kind=kind),
            structured_images(12, shape, seed=20 + i, kind=kind),
        )
        tasks.append(_task(f"{modality}_texture", modality, shape, seed=30 + 2 * i))
    return BenchData(modalities, tasks, source="synthetic")
