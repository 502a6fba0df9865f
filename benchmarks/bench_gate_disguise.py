"""The privacy gate against disguised copies, on the real sample crops: catch rate per transform, false blocks.

For each modality, the training split's crops are the gate's real set (what a site compares against); a seeded
subset of them is planted after each disguise (flip, shift, intensity, noise, crop-and-resize) and scored; the
validation split's crops (other subjects, never trained on) measure the false-block rate. The copy search is
pixel-only, so no model is needed; the plain nearest-neighbour correlation (the gate's `pixel` measure) is
reported beside it, at the same thresholds, side by side in one run.

    python benchmarks/bench_gate_disguise.py --profile small --out docs/results/privacy/gate.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from invcoss_core.config import GateConfig, build_config
from invcoss_core.data import default_samples_dir, load_site_dataset
from invcoss_core.inversion.disguise import DISGUISES, copy_similarity, disguise
from invcoss_core.inversion.gate import _standardise


def plain_correlation(images: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(N,) nearest-real Pearson correlation (the gate's pixel measure)."""
    best = torch.full((images.shape[0],), -1.0)
    a = _standardise(images)
    for chunk in real.split(512):
        best = torch.maximum(best, (a @ _standardise(chunk).T).amax(dim=1))
    return best


def score(images: torch.Tensor, real: torch.Tensor, gate: GateConfig) -> tuple[torch.Tensor, float]:
    """(N,) disguised-copy scores of `images` against `real` under the gate's settings, and the seconds taken."""
    started = time.perf_counter()
    best, _ = copy_similarity(
        images,
        lambda: iter(real.split(gate.chunk_size)),
        lambda i: real[i],
        max_shift=gate.copy_max_shift,
        scales=gate.copy_scales,
        candidates_per_image=gate.copy_candidates,
    )
    return best, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="small")
    parser.add_argument("--modalities", default="ct,mri,pathology")
    parser.add_argument("--real", type=int, default=1000, help="training crops in the gate's real set")
    parser.add_argument("--planted", type=int, default=40, help="copies planted per disguise")
    parser.add_argument("--held-out", type=int, default=200, help="validation crops scored for false blocks")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = build_config(args.profile)
    gate = config.gate
    results: dict[str, object] = {"profile": args.profile, "copy_threshold": gate.copy_threshold, "modalities": {}}
    for modality in args.modalities.split(","):
        spec = config.model.spec(modality)
        train = load_site_dataset(default_samples_dir(), modality, spec, config.data, "train", config.seed).tensors()
        val = load_site_dataset(default_samples_dir(), modality, spec, config.data, "val", config.seed).tensors()
        g = torch.Generator().manual_seed(0)
        real = train[torch.randperm(train.shape[0], generator=g)[: args.real]]
        held = val[torch.randperm(val.shape[0], generator=g)[: args.held_out]]
        sources = real[torch.randperm(real.shape[0], generator=g)[: args.planted]]

        row: dict[str, object] = {"real": int(real.shape[0]), "planted": int(sources.shape[0])}
        thr = gate.copy_threshold or 1.0
        for name in sorted(DISGUISES):
            planted = disguise(sources, name, g).to(torch.float16).float()
            copy, seconds = score(planted, real, gate)
            plain = plain_correlation(planted, real)
            row[name] = {
                "caught_copy_search": round(float(((copy > thr) | (plain > gate.pixel_threshold)).float().mean()), 4),
                "caught_plain_pixel": round(float((plain > gate.pixel_threshold).float().mean()), 4),
                "copy_min": round(float(copy.min()), 4),
                "copy_median": round(float(copy.median()), 4),
                "seconds_per_image": round(seconds / planted.shape[0], 4),
            }
        copy, seconds = score(held, real, gate)
        plain = plain_correlation(held, real)
        row["held_out"] = {
            "images": int(held.shape[0]),
            "subjects": "validation split (never trained on)",
            "false_block_copy_search": round(float(((copy > thr) | (plain > gate.pixel_threshold)).float().mean()), 4),
            "false_block_plain_pixel": round(float((plain > gate.pixel_threshold).float().mean()), 4),
            "copy_quantiles_50_90_99_100": [
                round(float(q), 4) for q in copy.quantile(torch.tensor([0.5, 0.9, 0.99, 1.0]))
            ],
            "seconds_per_image": round(seconds / held.shape[0], 4),
        }
        results["modalities"][modality] = row  # type: ignore[index]
        print(modality, json.dumps(row, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
