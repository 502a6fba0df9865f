"""The prepared GPU check: one command, one JSON — is the `base` profile ready for the GPU it runs on?

Sections, each timed in this one process on the device given:
- `stage`: the stage loop (`train_stage`: AdamW, clipping, masking, loss read-backs every 25 steps) on the `base`
  model at `base` input sizes (96³ CT, 224² pathology), with bf16 autocast on and off (`train.amp`): ms per step,
  samples/s, the model's training FLOPs per sample (counted with `torch.utils.flop_counter`: forward + backward)
  and the model FLOPs utilisation (MFU) against the device's dense peak for that precision (table below, or
  --peak-tflops-bf16/--peak-tflops-fp32).
- `loader`: the input pipeline (benchmarks/bench_input_pipeline.py: real sample volumes, 96³/224² random crops with
  augmentation, our float16 cache and MONAI's CacheDataset) with 0 and N workers, against the stage's samples/s.
- `inversion`: peak device memory of a 3-D (96³) inversion batch, InvUNet generator vs pixel-space, same batch.

    python benchmarks/gpu/check.py --data DIR --json check.json      # on a GPU machine: ≤ 8 minutes
    python benchmarks/gpu/check.py --smoke [--data DIR]              # CPU, tiny sizes, seconds: checks the code paths

On a device lent through the device tool (no network): `bash benchmarks/gpu/check.sh` (see there).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the sibling benchmark modules

from bench_input_pipeline import build_variant, load_group, measure
from bench_inversion import _PeakMemory

from invcoss_core.common.events import ProgressEvent
from invcoss_core.config import StageConfig, build_config
from invcoss_core.data import TensorImages
from invcoss_core.inversion.synthesize import Synthesizer
from invcoss_core.replay import NoReplay
from invcoss_core.stats import FeatureStatsRecorder
from invcoss_core.training.precision import training_precision
from invcoss_core.training.stage import record_statistics, seeded_model, train_stage

# Dense peak TFLOP/s by device name: (bf16 tensor cores, fp32 without TF32). NVIDIA datasheets (SXM parts).
PEAKS: dict[str, tuple[float, float]] = {
    "H200": (989.4, 66.9),
    "H100": (989.4, 66.9),
    "A100": (312.0, 19.5),
    "L40S": (362.0, 91.6),
}


def peak_tflops(device: torch.device, args: argparse.Namespace) -> dict[str, float | None]:
    """The device's dense peak per precision (None where unknown: the CPU, an unlisted GPU without overrides)."""
    known: tuple[float | None, float | None] = (None, None)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = next((v for k, v in PEAKS.items() if k in name), (None, None))
    return {"bfloat16": args.peak_tflops_bf16 or known[0], "float32": args.peak_tflops_fp32 or known[1]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage_config(profile: str, batch: int, steps: int, amp: bool) -> StageConfig:
    """`profile`'s model at its own input sizes, one epoch of `steps` plain MAE steps (statistics: first batch)."""
    data = build_config(profile).model_dump()
    data["train"].update(
        {"batch_size": batch, "epochs": 1, "num_workers": 0, "stats_batches": 1, "steps_per_epoch": steps, "amp": amp}
    )
    return StageConfig.model_validate(data)


def flops_per_sample(cfg: StageConfig, modality: str, device: torch.device, precision: str) -> float:
    """Training FLOPs (forward + backward) per sample of the model, counted on `device` with batch 2."""
    from torch.utils.flop_counter import FlopCounterMode

    model = seeded_model(cfg, "flops").to(device)
    x = torch.rand(2, *cfg.model.spec(modality).input_shape, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        model(x, modality).loss.backward()
    return float(counter.get_total_flops()) / 2


def time_steps(cfg: StageConfig, modality: str, device: torch.device, warmup: int) -> float:
    """Seconds per step of `train_stage` between its loss read-backs after `warmup` steps and at its last step."""
    spec = cfg.model.spec(modality)
    batch, steps = cfg.train.batch_size, cfg.train.steps_per_epoch or 1
    data = TensorImages(torch.rand(batch * steps, *spec.input_shape))
    student = seeded_model(cfg, "check").to(device)
    reads: list[tuple[int, float]] = []

    def on_event(event: ProgressEvent) -> None:
        if "loss" in event.metrics:  # one per read-back; each read-back waits for the queued steps
            reads.append((event.step, time.perf_counter()))

    train_stage(
        config=cfg,
        modality=modality,
        train_data=data,
        student=student,
        teacher=None,
        replay=NoReplay(),
        device=device,
        checkpoint_dir=None,
        fingerprint="gpu-check",
        stage_index=1,
        events=on_event,
        check_every=warmup,
    )
    first, last = reads[0], reads[-1]
    if last[0] <= first[0]:
        raise SystemExit(f"{steps} steps leave no timed window after step {first[0]}: raise --steps")
    return (last[1] - first[1]) / (last[0] - first[0])


def stage_section(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    peaks = peak_tflops(device, args)
    rows = []
    for modality in ("ct", "pathology"):
        for amp in (True, False):
            cfg = stage_config(args.profile, args.batch, args.steps, amp)
            precision = training_precision(device, amp)
            flops = flops_per_sample(cfg, modality, device, precision)
            seconds = time_steps(cfg, modality, device, args.warmup)
            rate = args.batch / seconds
            peak = peaks[precision]
            rows.append(
                {
                    "modality": modality,
                    "input_shape": list(cfg.model.spec(modality).input_shape),
                    "amp": amp,
                    "precision": precision,
                    "batch": args.batch,
                    "ms_per_step": 1e3 * seconds,
                    "steps_per_s": 1 / seconds,
                    "samples_per_s": rate,
                    "train_gflops_per_sample": flops / 1e9,
                    "achieved_tflops": flops * rate / 1e12,
                    "peak_tflops": peak,
                    "mfu": flops * rate / (peak * 1e12) if peak else None,
                }
            )
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for row in rows:  # AMP on against off, same modality, same run
        off = next(r for r in rows if r["modality"] == row["modality"] and not r["amp"])
        row["speed_vs_amp_off"] = row["samples_per_s"] / off["samples_per_s"]
    return rows


def loader_section(args: argparse.Namespace, stage: list[dict[str, Any]]) -> dict[str, Any]:
    if args.data is None:
        return {"skipped": "no --data folder given (the real sample volumes)"}
    out: dict[str, Any] = {}
    workers = [0, args.workers]
    for group, modality in (("3d", "ct"), ("2d", "pathology")):
        items, images, prepare_s = load_group(args.data, group, args.max_items)
        if not items:
            out[group] = {"skipped": f"no {group} images in {args.data}"}
            continue
        consumed = max(r["samples_per_s"] for r in stage if r["modality"] == modality)
        rows = []
        for variant in ("ours", "monai-cache"):
            dataset, cache_bytes = build_variant(variant, items, images, Path("."))
            for w in workers:
                row = measure(dataset, w, args.loader_batch, args.loader_seconds, args.loader_max_batches)
                rows.append(
                    {
                        "variant": variant,
                        "workers": w,
                        "cache_mib": cache_bytes / 2**20,
                        "samples_per_s": row["samples_per_s"],
                        "vs_stage_consumption": row["samples_per_s"] / consumed,
                    }
                )
            del dataset
        out[group] = {
            "images": len(items),
            "prepare_seconds_per_image": prepare_s,
            "stage_consumes_samples_per_s": consumed,
            "rows": rows,
        }
    return out


def inversion_section(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    cfg = build_config(args.profile)
    cfg = cfg.model_copy(update={"inversion": cfg.inversion.model_copy(update={"iterations": args.inversion_steps})})
    model = seeded_model(cfg, "inversion-check").to(device).eval()
    spec = cfg.model.spec("ct")
    recorder = FeatureStatsRecorder(model, "ct")
    record_statistics(model, recorder, TensorImages(torch.rand(4, *spec.input_shape)), 2, "ct", device, 0)
    stats = recorder.result()
    rows = []
    for method in ("generator", "pixels"):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with _PeakMemory(device) as memory:
            start = time.perf_counter()
            Synthesizer(
                model, "ct", stats, cfg.inversion, method=method, generator=torch.Generator().manual_seed(0)
            ).run(args.inversion_batch)
            sync(device)
            seconds = time.perf_counter() - start
        rows.append(
            {
                "method": method,
                "input_shape": list(spec.input_shape),
                "batch": args.inversion_batch,
                "iterations": args.inversion_steps,
                "seconds": seconds,
                "peak_mib": memory.peak_mib,
            }
        )
    rows[0]["memory_vs_pixels"] = rows[0]["peak_mib"] / max(rows[1]["peak_mib"], 1e-6)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="the sample folder (loader section)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", default="base", choices=("tiny", "small", "base"))
    parser.add_argument("--batch", type=int, default=64, help="stage batch (the base preset's)")
    parser.add_argument("--steps", type=int, default=60, help="stage steps per setting")
    parser.add_argument("--warmup", type=int, default=20, help="untimed first steps (and the read-back interval)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--loader-batch", type=int, default=16)
    parser.add_argument("--loader-seconds", type=float, default=6.0)
    parser.add_argument("--loader-max-batches", type=int, default=400)
    parser.add_argument("--max-items", type=int, default=None, help="images per loader group (default: all)")
    parser.add_argument("--inversion-batch", type=int, default=32, help="the base preset's inversion batch")
    parser.add_argument("--inversion-steps", type=int, default=5)
    parser.add_argument("--peak-tflops-bf16", type=float, default=None)
    parser.add_argument("--peak-tflops-fp32", type=float, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any device: checks every path quickly")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.profile, args.batch, args.steps, args.warmup = "tiny", 4, 6, 2
        args.workers, args.loader_batch, args.loader_seconds, args.loader_max_batches = 1, 2, 0.2, 2
        args.max_items, args.inversion_batch, args.inversion_steps = args.max_items or 1, 2, 2
    device = torch.device(args.device)
    started = time.perf_counter()
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "profile": args.profile,
        "smoke": args.smoke,
        "bf16_native": bool(device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)),
    }
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    out["stage"] = stage_section(args, device)
    timings["stage"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["loader"] = loader_section(args, out["stage"])
    timings["loader"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["inversion"] = inversion_section(args, device)
    timings["inversion"] = time.perf_counter() - t0
    out["seconds"] = {**timings, "total": time.perf_counter() - started}
    text = json.dumps(out, indent=2)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    main()
