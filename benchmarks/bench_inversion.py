"""Inversion cost: InvUNet generator vs pixel-space inversion, 2D and 3D, side by side in one run.

Both variants optimise the same four losses against the same frozen model with the same batch size. How the
iterations count:
- "first batch" — equal iterations: both run `inversion.iterations` steps on their first batch (the generator
  starts cold). This is the per-step price of the generator.
- "run" — N images in batches: pixel-space inversion starts every batch from scratch (`iterations` steps each);
  the generator stays warm and runs `iterations_per_batch` steps on every later batch (amortisation). This is
  what a stage pays.
Each variant runs in a fresh subprocess and is timed after a 2-step warm-up batch. Peak memory: the rise above
the level after the model and statistics were loaded — on CPU of the resident set, sampled every 2 ms (see
`_PeakMemory`), on CUDA of `torch.cuda.max_memory_allocated`. It includes what the timed runs keep: the
output images and, for the generator, InvUNet with its Adam state. The frozen model is
trained briefly on structured images first, so the final L_inv values compare like with like (quality at the
iterations given), not a random network.

    python benchmarks/bench_inversion.py --profile small            # the numbers for the report
    python benchmarks/bench_inversion.py --quick                    # a short smoke run (tiny profile)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from invcoss_core.config import StageConfig, build_config
from invcoss_core.data import TensorImages
from invcoss_core.inversion.synthesize import Synthesizer, mean_pairwise_cosine
from invcoss_core.models import MultiModalMAE, build_model
from invcoss_core.training import load_student, run_stage

METHODS = ("generator", "pixels")


def _structured(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Smooth random images in [0, 1]: up-sampled coarse noise plus a few bright discs/balls."""
    g = torch.Generator().manual_seed(seed)
    c, *size = shape
    coarse = torch.rand(n, c, *[4] * len(size), generator=g)
    mode = "bilinear" if len(size) == 2 else "trilinear"
    x = torch.nn.functional.interpolate(coarse, size=tuple(size), mode=mode, align_corners=False)
    axes = torch.meshgrid(*[torch.linspace(0, 1, s) for s in size], indexing="ij")
    for _ in range(3):
        centre = torch.rand(n, len(size), generator=g)
        radius = 0.1 + 0.2 * torch.rand(n, generator=g)
        view = (n, *[1] * len(size))
        d2 = sum((axes[i][None] - centre[:, i].view(view)) ** 2 for i in range(len(size)))
        x = x + 0.5 * (d2 < radius.view(view) ** 2).float()[:, None]
    return (x / x.amax(dim=tuple(range(1, x.dim())), keepdim=True)).clamp(0, 1)


def _config(profile: str, quick: bool) -> StageConfig:
    overrides: dict[str, Any] = {"train": {"epochs": 1 if quick else 3}}
    if quick:
        overrides["inversion"] = {"iterations": 10, "iterations_per_batch": 3}
    return build_config(profile, overrides)


def prepare(cfg: StageConfig, modality: str, path: Path, samples: int) -> None:
    """Train the frozen model briefly on structured images and save its weights and statistics."""
    data = TensorImages(_structured(samples, cfg.model.spec(modality).input_shape, seed=0))
    result = run_stage(config=cfg, modality=modality, train_data=data)
    model = load_student(result.artifact)
    tensors = {f"w.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"s.{k}": v for k, v in result.artifact.stats.items()})
    save_file(tensors, str(path))


def _load(cfg: StageConfig, path: Path, device: torch.device) -> tuple[MultiModalMAE, dict[str, torch.Tensor]]:
    blob = load_file(str(path))
    model = build_model(cfg.model)
    model.load_state_dict({k[2:]: v for k, v in blob.items() if k.startswith("w.")}, strict=True)
    stats = {k[2:]: v for k, v in blob.items() if k.startswith("s.")}
    return model.to(device).eval(), stats


class _PeakMemory:
    """Peak memory of this process while the context is active, above its level on entry, in MiB.

    CUDA: `torch.cuda.max_memory_allocated`. CPU: the resident set size read from /proc/self/statm every 2 ms by a
    sampling thread (the process-lifetime `ru_maxrss` is useless here: importing torch and loading the model peak
    higher than a small inversion, so its rise would read 0); falls back to `ru_maxrss` off Linux.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._statm = Path("/proc/self/statm")
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss_mib(self) -> float:
        if self._statm.exists():
            return int(self._statm.read_text().split()[1]) * self._page / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux/BSD

    def _sample(self, base: float) -> None:
        while not self._stop.wait(0.002):
            self.peak_mib = max(self.peak_mib, self._rss_mib() - base)

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, args=(self._rss_mib(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20 - self._base
        else:
            self._stop.set()
            self._thread.join()


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One variant in this (fresh) process: a first-batch run and a full run, each from a fresh synthesizer."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _config(args.profile, args.quick)
    model, stats = _load(cfg, Path(args.model), device)
    inv = cfg.inversion
    out: dict[str, Any] = {"modality": args.modality, "method": args.method, "batch": inv.batch_size}
    # One image, one step: loads the libraries and code paths, whose pages would otherwise count as peak memory.
    Synthesizer(
        model,
        args.modality,
        stats,
        inv.model_copy(update={"iterations": 1}),
        method=args.method,
        generator=torch.Generator().manual_seed(2),
    ).run(1)
    gc.collect()
    # Memory is watched from before the warm-up: the allocator keeps what the warm-up freed, so a later start would
    # miss the working set. The warm-up (kernel selection, allocation) is a short batch of the same size, untimed.
    with _PeakMemory(device) as memory:
        Synthesizer(
            model,
            args.modality,
            stats,
            inv.model_copy(update={"iterations": 2}),
            method=args.method,
            generator=torch.Generator().manual_seed(1),
        ).run(inv.batch_size)
        for label, count in (("first", inv.batch_size), ("run", args.images)):
            synth = Synthesizer(
                model, args.modality, stats, inv, method=args.method, generator=torch.Generator().manual_seed(0)
            )
            start = time.perf_counter()
            result = synth.run(count)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            out[label] = {
                "images": count,
                "steps": result.steps,
                "seconds": seconds,
                "images_per_second": count / seconds,
                "final_total": result.final["total"],
                "final": result.final,
            }
            if label == "run" and count > 1:
                out[label]["pairwise_cosine"] = mean_pairwise_cosine(result.features)
            del synth, result
    out["peak_mib"] = memory.peak_mib
    out["threads"] = torch.get_num_threads()
    return out


def _run_variant(args: argparse.Namespace, modality: str, method: str, model_path: Path) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--profile",
        args.profile,
        "--modality",
        modality,
        "--method",
        method,
        "--model",
        str(model_path),
        "--images",
        str(args.images),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ] + (["--quick"] if args.quick else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{modality}/{method} worker failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="small", choices=("tiny", "small", "base"))
    parser.add_argument("--modalities", default="pathology,ct", help="comma list; one 2D and one 3D by default")
    parser.add_argument("--images", type=int, default=None, help="images per full run (default 8 batches)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="tiny profile, few iterations, 3 batches")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--modality", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.profile = "tiny"
    cfg = _config(args.profile, args.quick)
    if args.images is None:
        args.images = cfg.inversion.batch_size * (3 if args.quick else 8)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows: list[dict[str, Any]] = []
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for modality in args.modalities.split(","):
            model_path = Path(tmp) / f"{modality}.safetensors"
            prepare(cfg, modality, model_path, samples=64 if args.quick else 256)
            for method in METHODS:
                rows.append(_run_variant(args, modality, method, model_path))
    inv = cfg.inversion
    print(
        f"profile {args.profile} on {args.device}, batch {inv.batch_size}, iterations {inv.iterations} "
        f"(generator: {inv.iterations_per_batch} per later batch), {args.images} images per run, "
        f"threads {rows[0]['threads']}, load average at start {load:.1f}"
    )
    header = (
        f"{'modality':<10}{'method':<10}{'first img/s':>12}{'run img/s':>11}{'run steps':>10}"
        f"{'peak MiB':>10}{'L_inv first':>12}{'L_inv run':>10}{'pair cos':>9}"
    )
    print(header)
    for row in rows:
        first, run = row["first"], row["run"]
        print(
            f"{row['modality']:<10}{row['method']:<10}{first['images_per_second']:>12.2f}"
            f"{run['images_per_second']:>11.2f}{run['steps']:>10d}{row['peak_mib']:>10.1f}"
            f"{first['final_total']:>12.3f}{run['final_total']:>10.3f}{run.get('pairwise_cosine', float('nan')):>9.3f}"
        )
    print("ratios generator / pixels (throughput goal >= 2, 3D memory goal <= 0.25):")
    for modality in args.modalities.split(","):
        gen, pix = (next(r for r in rows if r["modality"] == modality and r["method"] == m) for m in METHODS)
        first = gen["first"]["images_per_second"] / pix["first"]["images_per_second"]
        run = gen["run"]["images_per_second"] / pix["run"]["images_per_second"]
        memory = gen["peak_mib"] / max(pix["peak_mib"], 1e-6)
        print(
            f"  {modality:<10} throughput first batch {first:.2f}  throughput run {run:.2f}  peak memory {memory:.2f}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"profile": args.profile, "device": args.device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
