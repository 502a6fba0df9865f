"""A consortium stage against one site holding all images: the same stage, FedAvg across K sites, side by side.

The stage's training images are shared by subject among K simulated sites; each round every site trains
`local_steps` steps from the round's global weights (`invcoss_core.consortium.train_round`, the code the site
client runs) and the coordinator's aggregation (`server.codec.fedavg`, Flower's `aggregate_arrayrecords`) averages
them, weighted by samples. The centralised reference is today's one-site stage (`run_stage`) on all training
images. "Same total optimiser steps" means K · rounds · local_steps = the centralised stage's steps (the same
compute); `--extra-rounds` adds runs with more rounds at the same local steps, to say how many FedAvg needs.

Measured per setting and seed: the held-out masked-reconstruction loss (subjects no site trained on; the model's own
decoder, fixed masks) and the frozen-encoder probes (kNN and linear balanced accuracy, cross-validated over
subjects), the training seconds of the slowest site per round (sites train in parallel in a real federation; here
they run one after another) and the bytes per round (weights down to and up from every site). Messages through a
real SuperLink add ~6-9 s of fixed overhead per step on top (docs/federation.md, "Limits").

    python benchmarks/bench_consortium.py --profile small --modality mri --steps 600 --rounds 5 \
        --sites 1,2,3 --seeds 2 --out docs/results/consortium
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from invcoss_core.config import StageConfig, build_config
from invcoss_core.consortium import initial_weights, round_config, train_round
from invcoss_core.data import TensorImages, default_samples_dir, fetch_samples, load_site_dataset
from invcoss_core.evaluation.data import load_bench_data
from invcoss_core.evaluation.evaluate import probe_model
from invcoss_core.evaluation.recon import decoder_state, own_decoder_loss
from invcoss_core.evaluation.settings import bench_settings
from invcoss_core.models import build_model
from invcoss_core.training import run_stage
from server.codec import fedavg


def _config(profile: str, seed: int, steps: int) -> StageConfig:
    settings = bench_settings(profile)
    return build_config(
        profile,
        {
            **settings.stage_config,
            "seed": seed,
            "train": {**settings.stage_config.get("train", {}), "epochs": 1, "steps_per_epoch": steps},
        },
    )


def _evaluate(weights: dict[str, torch.Tensor], config: StageConfig, bench: Any, modality: str) -> dict[str, Any]:
    settings = bench_settings(config.profile)
    model = build_model(config.model)
    model.load_state_dict(weights, strict=True)
    model.eval()
    recon = own_decoder_loss(model, decoder_state(weights), bench.modalities[modality].val, modality, settings.recon)
    probes = probe_model(model, [t for t in bench.tasks if t.modality == modality], settings.probes)
    return {"recon": recon.loss, "probes": probes}


def _sites(train: Any, k: int) -> list[TensorImages]:
    """The training samples shared by subject among k sites (round-robin over sorted subjects)."""
    subjects = sorted(set(train.subjects))
    if len(subjects) < k:
        raise SystemExit(f"{len(subjects)} training subjects cannot give {k} sites distinct subjects")
    owner = {s: i % k for i, s in enumerate(subjects)}
    images = train.tensors()
    return [TensorImages(images[[i for i, s in enumerate(train.subjects) if owner[s] == site]]) for site in range(k)]


def run_setting(
    config: StageConfig, train: Any, k: int, rounds: int, local_steps: int, modality: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """FedAvg across k sites; returns the final weights and the per-round costs."""
    sites = _sites(train, k)
    rcfg = round_config(config, rounds, local_steps, 1)
    weights = initial_weights(rcfg, None)
    states: list[Any] = [None] * k
    per_round = []
    for r in range(1, rounds + 1):
        results = []
        for i, data in enumerate(sites):
            result = train_round(
                config=rcfg,
                modality=modality,
                train_data=data,
                incoming=None,
                global_weights=weights,
                round_index=r,
                epochs_per_round=1,
                run_id="bench",
                device=torch.device("cpu"),
                optimizer_state=states[i],
            )
            states[i] = result.optimizer_state
            results.append(result)
        weights = fedavg([(res.weights, float(res.num_examples)) for res in results])
        model_bytes = len(st_save(weights))
        per_round.append(
            {
                "slowest_site_seconds": max(res.seconds for res in results),
                "bytes": 2 * k * model_bytes,
                "losses": [res.loss for res in results],
            }
        )
    return weights, {
        "sites": k,
        "site_samples": [len(s) for s in sites],
        "rounds": rounds,
        "local_steps": local_steps,
        "total_steps": k * rounds * local_steps,
        "round_seconds": statistics.mean(p["slowest_site_seconds"] for p in per_round),
        "parallel_seconds": sum(p["slowest_site_seconds"] for p in per_round),
        "bytes_per_round": per_round[0]["bytes"],
        "final_round_losses": per_round[-1]["losses"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="small")
    parser.add_argument("--modality", default="mri")
    parser.add_argument("--steps", type=int, default=600, help="the centralised stage's optimiser steps")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sites", default="1,2,3", help="K values; 1 is the centralised one-site stage")
    parser.add_argument("--extra-rounds", default="2", help="multiples of --rounds run at the same local steps (K=2)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    root = fetch_samples(default_samples_dir(), progress=False)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        config = _config(args.profile, seed, args.steps)
        bench = load_bench_data(root, config, (args.modality,), seed=0)
        spec = config.model.spec(args.modality)
        train = load_site_dataset(root, args.modality, spec, config.data, split="train", seed=0)
        for k in (int(x) for x in args.sites.split(",")):
            start = time.perf_counter()
            if k == 1:
                result = run_stage(config=config, modality=args.modality, train_data=train, run_id="bench")
                weights, cost = (
                    dict(result.artifact.weights),
                    {
                        "sites": 1,
                        "site_samples": [len(train)],
                        "rounds": 1,
                        "local_steps": args.steps,
                        "total_steps": args.steps,
                        "round_seconds": result.train_seconds,
                        "parallel_seconds": result.train_seconds,
                        "bytes_per_round": 0,
                    },
                )
            else:
                local = args.steps // (k * args.rounds)
                weights, cost = run_setting(config, train, k, args.rounds, local, args.modality)
            rows.append(
                {
                    "seed": seed,
                    **cost,
                    **_evaluate(weights, config, bench, args.modality),
                    "seconds": time.perf_counter() - start,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        for multiple in (int(x) for x in args.extra_rounds.split(",") if x):
            local = args.steps // (2 * args.rounds)
            start = time.perf_counter()
            weights, cost = run_setting(config, train, 2, args.rounds * multiple, local, args.modality)
            rows.append(
                {
                    "seed": seed,
                    **cost,
                    **_evaluate(weights, config, bench, args.modality),
                    "seconds": time.perf_counter() - start,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        (args.out / "results.json").write_text(
            json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2)
        )
    print(report(rows, args))


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """A markdown table: one line per setting, mean ± spread over seeds, and the gap to the centralised stage."""
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["sites"], row["rounds"]), []).append(row)
    central = {r["seed"]: r for r in rows if r["sites"] == 1}
    lines = [
        f"| sites | rounds | local steps | total steps | held-out recon ↓ | gap to 1 site (paired) | "
        f"{' | '.join(f'{t} linear / kNN' for t in sorted(rows[0]['probes']))} | s per round (slowest site) | "
        "training s, sites in parallel | bytes per round |",
        "|" + "---|" * (9 + len(rows[0]["probes"])),
    ]

    def ms(values: list[float], digits: int = 3) -> str:
        mean = statistics.mean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{mean:.{digits}f} ± {spread:.{digits}f}"

    for (k, rounds), group in sorted(groups.items()):
        gaps = [g["recon"] - central[g["seed"]]["recon"] for g in group if g["seed"] in central]
        probes = " | ".join(
            " / ".join(ms([100 * g["probes"][t][kind] for g in group], 1) for kind in ("linear", "knn"))
            for t in sorted(group[0]["probes"])
        )
        lines.append(
            f"| {k} | {rounds} | {group[0]['local_steps']} | {group[0]['total_steps']} | "
            f"{ms([g['recon'] for g in group])} | {ms(gaps) if k > 1 or rounds > 1 else '–'} | {probes} | "
            f"{ms([g['round_seconds'] for g in group], 1)} | {ms([g['parallel_seconds'] for g in group], 1)} | "
            f"{group[0]['bytes_per_round']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
