"""Does the training input pipeline keep a GPU fed at `base` sizes? Samples/s per worker and with N workers.

The pipeline measured: the real sample images read and preprocessed by our readers (`load_prepared_parts`: CT/MRI
resampled to 1.5 mm and windowed, pathology scaled), then per sample a random crop at the `base` input size (96³
from the CT and MRI volumes, 90 % centred on foreground; 224² from the pathology images) and augmentation (a random
flip per axis, a random 90° rotation in the last two axes, intensity × U(0.9, 1.1) + U(-0.1, 0.1), clipped to
[0, 1]). Side by side in one run, through a torch DataLoader with 0 (in the main process), 1, 2, … workers:

- `no-cache`: MONAI `Dataset`: every sample reads and preprocesses its image again, then crops and augments;
- `monai-cache`: MONAI `CacheDataset`: the preprocessed images cached in memory (float32), MONAI's random
  transforms (`RandSpatialCropd`, `RandFlipd`, `RandRotate90d`, `RandScaleIntensityd`, `RandShiftIntensityd`);
- `monai-persistent`: MONAI `PersistentDataset`: the preprocessed images cached on disk, loaded per sample;
- `ours`: our own cache (`CachedCrops` below): the preprocessed images as float16 in memory with a sample of their
  foreground voxel indices, crops as views, augmentation with torch ops, float32 out;
- `ours-fp16`: the same cache, but the workers cut, flip and turn in float16 and hand float16 to the trainer; the
  intensity scale and shift (two multiply-adds on the batch) are left to the training device, which is not
  timed here (the stage would cast the batch to float32 there; not wired into the stage yet).

The consumption it is compared with — what a ViT-B MAE step takes in at `base` sizes — is stated with its source:
(1) measured: the only GPU run of the base model (H100, docs/results/gpu-h100-partial and gpu-h100-short) took
78 ms a step at batch 64 (the `base` preset's batch), 822 samples/s, bound by the host's time per step, not by the
arithmetic; (2) the arithmetic bound: the model's training FLOPs per sample (counted with
`torch.utils.flop_counter` on this machine) at an assumed 40 % model-FLOPs utilisation of an H100 SXM's 989 TFLOP/s
dense bf16 (NVIDIA's datasheet figure). The goal: 4 workers ≥ 2 × consumption.

    python benchmarks/bench_input_pipeline.py --data ~/.cache/invcoss/samples --workers 0,1,2,4 --seconds 8 \
        --json docs/results/real-sizes/input-pipeline.json
    python benchmarks/bench_input_pipeline.py --data DIR --smoke        # seconds: tiny counts, no FLOP count
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from invcoss_core.config import ModalitySpec, build_config
from invcoss_core.data.dataset import load_prepared_parts, resolve_modality_folder
from invcoss_core.data.discovery import ImageSource, discover_images
from invcoss_core.data.errors import ImageReadError
from invcoss_core.data.preprocess import foreground_threshold, pad_value
from invcoss_core.data.sampling import FOREGROUND_PROBABILITY, fit_size

GROUPS: dict[str, tuple[str, ...]] = {"3d": ("ct", "mri"), "2d": ("pathology",)}
H100_BF16_DENSE_TFLOPS = 989.4  # NVIDIA H100 SXM datasheet, dense (no sparsity)
ASSUMED_MFU = 0.40
MEASURED_STEP_S_BATCH64 = 0.078  # docs/results/gpu-h100-short: base model, batch 64, host-bound


@dataclass(frozen=True)
class Item:
    """One image (or one region of a whole slide) of the sample folder, with how it is preprocessed."""

    source: ImageSource
    part: int
    modality: str
    spec: ModalitySpec


def load_group(data: Path, group: str, max_items: int | None = None) -> tuple[list[Item], list[np.ndarray], float]:
    """A group's images (each region of a whole slide an item of its own), preprocessed once.

    Returns:
        the items, their preprocessed images (`prepare`), and the mean seconds to read and preprocess one.
    """
    cfg = build_config("base").model
    items: list[Item] = []
    images: list[np.ndarray] = []
    started = time.perf_counter()
    for modality in GROUPS[group]:
        spec = cfg.spec(modality)
        found = discover_images(resolve_modality_folder(data, modality), group_dicom_series=spec.spatial_dims == 3)
        for source in found.sources:
            if max_items is not None and len(items) >= max_items:
                break
            try:
                parts = load_prepared_parts(source, modality, spec)
            except ImageReadError:
                continue
            for index, part in enumerate(parts[: None if max_items is None else max_items - len(items)]):
                items.append(Item(source, index, modality, spec))
                images.append(fit_size(part.array, spec.img_size, pad_value(part.kind)).astype(np.float32))
    return items, images, (time.perf_counter() - started) / max(1, len(items))


def prepare(item: Item) -> np.ndarray:
    """The deterministic part: read, preprocess, pad to at least the input size; (C, *spatial) float32."""
    prepared = load_prepared_parts(item.source, item.modality, item.spec)[item.part]
    return fit_size(prepared.array, item.spec.img_size, pad_value(prepared.kind)).astype(np.float32)


def augment(x: torch.Tensor, rng: np.random.Generator, intensity: bool = True) -> torch.Tensor:
    """Random flips per spatial axis, a random 90° turn in the last two axes, intensity scale and shift; (C, ...)."""
    dims = [d for d in range(1, x.dim()) if rng.random() < 0.5]
    if dims:
        x = torch.flip(x, dims)
    x = torch.rot90(x, int(rng.integers(4)), dims=(x.dim() - 2, x.dim() - 1))
    if not intensity:
        return x.contiguous()
    scale, shift = 1 + rng.uniform(-0.1, 0.1), rng.uniform(-0.1, 0.1)
    return (x * scale + shift).clamp_(0, 1).contiguous()


class CachedCrops(Dataset[torch.Tensor]):
    """Our cache: preprocessed images as float16 plus a sample of each 3-D image's foreground voxels (crop centres).

    Item i is a fresh random crop of image i (the sampler draws images with replacement), float32 — or with
    `half_out`, float16 without the intensity augmentation (left to the training device).
    """

    def __init__(
        self, images: Sequence[np.ndarray], kinds: Sequence[str], size: Sequence[int], half_out: bool = False
    ) -> None:
        self.images = [torch.from_numpy(a).to(torch.float16) for a in images]
        self.size = tuple(int(s) for s in size)
        self.half_out = half_out
        rng = np.random.default_rng(0)
        self.foreground = [
            _some(np.flatnonzero(a[0] > foreground_threshold(kind)), rng) if a.ndim == 4 else np.zeros(0, np.int32)
            for a, kind in zip(images, kinds)
        ]
        self.calls = 0

    def __len__(self) -> int:
        return len(self.images)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.images) + sum(f.nbytes for f in self.foreground)

    def __getitem__(self, index: int) -> torch.Tensor:
        self.calls += 1
        rng = np.random.default_rng((torch.initial_seed() % 2**32, index, self.calls))
        image, points = self.images[index], self.foreground[index]
        spatial = image.shape[1:]
        highs = np.array(spatial) - np.array(self.size)
        if points.size and rng.random() < FOREGROUND_PROBABILITY:
            centre = np.array(np.unravel_index(points[rng.integers(points.size)], spatial))
            start = np.clip(centre - np.array(self.size) // 2, 0, highs)
        else:
            start = (rng.random(len(spatial)) * (highs + 1)).astype(np.int64)
        window = (slice(None), *(slice(int(s), int(s) + n) for s, n in zip(start, self.size)))
        if self.half_out:
            return augment(image[window], rng, intensity=False)
        return augment(image[window].float(), rng)


def _some(points: np.ndarray, rng: np.random.Generator, keep: int = 1 << 16) -> np.ndarray:
    """At most `keep` foreground voxel indices as int32 (a random one of them is a random foreground voxel)."""
    if points.size > keep:
        points = rng.choice(points, size=keep, replace=False)
    return points.astype(np.int32)


def _monai_transforms(size: Sequence[int]) -> Any:
    from monai.transforms import (
        Compose,
        Lambdad,
        MapTransform,
        RandFlipd,
        RandRotate90d,
        RandScaleIntensityd,
        RandShiftIntensityd,
        RandSpatialCropd,
    )

    class PrepareD(MapTransform):
        """{"item": Item} -> {"image": the preprocessed image} (deterministic: what the caches keep)."""

        def __init__(self) -> None:
            super().__init__(keys=["item"])

        def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
            return {"image": prepare(data["item"])}

    rank = len(size)
    random = [
        RandSpatialCropd(keys="image", roi_size=list(size), random_size=False),
        *(RandFlipd(keys="image", prob=0.5, spatial_axis=axis) for axis in range(rank)),
        RandRotate90d(keys="image", prob=0.75, max_k=3, spatial_axes=(rank - 2, rank - 1)),
        RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
        Lambdad(keys="image", func=lambda x: torch.as_tensor(x, dtype=torch.float32).clamp(0, 1)),
    ]
    return Compose([PrepareD(), *random])


class _Images(Dataset[torch.Tensor]):
    """A MONAI dataset of {"image": ...} dicts seen as a dataset of image tensors."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.as_tensor(self.inner[index]["image"])


def build_variant(name: str, items: list[Item], images: list[np.ndarray], cache_dir: Path) -> tuple[Dataset[Any], int]:
    """The dataset of one variant and the bytes its cache holds (in memory, or on disk for `monai-persistent`)."""
    from monai.data import CacheDataset, PersistentDataset
    from monai.data import Dataset as MonaiDataset

    size = items[0].spec.img_size
    data = [{"item": item} for item in items]
    if name in ("ours", "ours-fp16"):
        ours = CachedCrops(images, [item.modality for item in items], size, half_out=name == "ours-fp16")
        return ours, ours.nbytes
    transform = _monai_transforms(size)
    if name == "no-cache":
        return _Images(MonaiDataset(data, transform)), 0
    if name == "monai-cache":
        return _Images(CacheDataset(data, transform, cache_rate=1.0, num_workers=0, progress=False)), sum(
            a.nbytes for a in images
        )
    persistent = PersistentDataset(data, transform, cache_dir=cache_dir)
    for index in range(len(persistent)):  # fill the disk cache before timing
        persistent[index]
    return _Images(persistent), sum(f.stat().st_size for f in cache_dir.iterdir())


def measure(dataset: Dataset[Any], workers: int, batch: int, seconds: float, max_batches: int) -> dict[str, float]:
    """Samples/s through a DataLoader, timed from the first batch (worker start-up excluded) for `seconds`."""
    sampler = RandomSampler(dataset, replacement=True, num_samples=batch * (max_batches + 1))  # type: ignore[arg-type]
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    samples = 0
    for x in it:
        samples += int(x.shape[0])
        if time.perf_counter() - start >= seconds:
            break
    elapsed = time.perf_counter() - start
    del it
    return {"samples": samples, "seconds": elapsed, "samples_per_s": samples / elapsed if elapsed > 0 else 0.0}


def training_flops_per_sample(modality: str, batch: int = 2) -> float:
    """Model FLOPs of one MAE training step (forward + backward) per sample of the `base` model, counted on CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    from invcoss_core.models import build_model

    cfg = build_config("base").model
    model = build_model(cfg)
    spec = cfg.spec(modality)
    x = torch.rand(batch, *spec.input_shape)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x, modality).loss.backward()
    return float(counter.get_total_flops()) / batch


def consumption(flops: dict[str, float]) -> dict[str, Any]:
    """What a ViT-B MAE step consumes, samples/s: the measured host-bound rate and the FLOP bound (with sources)."""
    sustained = H100_BF16_DENSE_TFLOPS * 1e12 * ASSUMED_MFU
    return {
        "measured_h100_batch64_samples_per_s": 64 / MEASURED_STEP_S_BATCH64,
        "measured_source": "docs/results/gpu-h100-short (78 ms a step at batch 64, base model, host-bound)",
        "flops_per_sample": flops,
        "flop_bound_samples_per_s": {group: sustained / f for group, f in flops.items()},
        "flop_bound_source": f"H100 SXM {H100_BF16_DENSE_TFLOPS} TFLOP/s dense bf16 (datasheet) x assumed MFU "
        f"{ASSUMED_MFU}",
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    workers = [int(w) for w in args.workers.split(",")]
    variants = args.variants.split(",")
    out: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg()[0],
        "batch": args.batch,
        "seconds_per_setting": args.seconds,
        "groups": {},
    }
    for group in args.groups.split(","):
        items, images, prepare_s = load_group(args.data, group, args.max_items)
        if not items:
            raise SystemExit(f"no {group} images under {args.data}: fetch them with `invcoss samples fetch`")
        rows: list[dict[str, Any]] = []
        with tempfile.TemporaryDirectory(prefix="invcoss-persistent-") as tmp:
            for variant in variants:
                dataset, cache_bytes = build_variant(variant, items, images, Path(tmp))
                for w in workers if variant != "no-cache" else workers[:1]:
                    row = measure(dataset, w, args.batch, args.seconds, args.max_batches)
                    rows.append({"variant": variant, "workers": w, "cache_bytes": cache_bytes, **row})
                    print(
                        f"{group} {variant:<17} workers {w}: {row['samples_per_s']:8.1f} samples/s "
                        f"(cache {cache_bytes / 2**20:.0f} MiB)",
                        file=sys.stderr,
                    )
        shape = items[0].spec.input_shape
        out["groups"][group] = {
            "input_shape": list(shape),
            "images": len(items),
            "prepare_seconds_per_image": prepare_s,
            "prepared_voxels": [int(a.size) for a in images],
            "rows": rows,
        }
    if not args.smoke:
        flops = {g: training_flops_per_sample(GROUPS[g][0]) for g in out["groups"]}
        out["consumption"] = consumption(flops)
        out["goal"] = goal_table(out)
    return out


def goal_table(out: dict[str, Any]) -> list[dict[str, Any]]:
    """Per group and variant: 4 workers' rate (measured where 4 ran; and 4 × the 1-worker rate) vs 2 × consumption."""
    rows = []
    cons = out["consumption"]
    for group, result in out["groups"].items():
        targets = {
            "measured_h100_batch64": cons["measured_h100_batch64_samples_per_s"],
            "flop_bound": cons["flop_bound_samples_per_s"][group],
        }
        for variant in sorted({r["variant"] for r in result["rows"]}):
            by_workers = {r["workers"]: r["samples_per_s"] for r in result["rows"] if r["variant"] == variant}
            four = by_workers.get(4)
            per_worker = by_workers.get(1, by_workers.get(0, 0.0))
            rows.append(
                {
                    "group": group,
                    "variant": variant,
                    "measured_4_workers": four,
                    "projected_4_workers": 4 * per_worker,
                    **{f"ratio_4w_to_{k}": (4 * per_worker) / v for k, v in targets.items()},
                    **({f"measured_ratio_4w_to_{k}": four / v for k, v in targets.items()} if four else {}),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="sample folder (`invcoss samples fetch`)")
    parser.add_argument("--groups", default="3d,2d", help="3d: 96³ CT + MRI crops; 2d: 224² pathology crops")
    parser.add_argument("--variants", default="no-cache,monai-cache,monai-persistent,ours,ours-fp16")
    parser.add_argument("--workers", default="0,1,2,4")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per setting")
    parser.add_argument("--max-batches", type=int, default=400)
    parser.add_argument("--max-items", type=int, default=None, help="use only the first N images of a group")
    parser.add_argument("--smoke", action="store_true", help="a few batches per setting, no FLOP count")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.max_batches, args.batch = 0.5, 3, 4
        args.workers = args.workers if args.workers != "0,1,2,4" else "0,1"
    out = run(args)
    text = json.dumps(out, indent=2)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
