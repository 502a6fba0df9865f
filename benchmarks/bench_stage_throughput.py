"""Stage-loop throughput: our `train_stage` vs a bare PyTorch loop over the same model and batch size.

Both run in this process, alternated several times; the table shows images/s of each and their ratio
(goal >= 0.95). The bare loop does the same optimisation step (AdamW, grad clipping at the configured norm,
MAE loss on the same modality) with no data loader, schedule, checks, statistics or progress events.

    python benchmarks/bench_stage_throughput.py --profile small --modality ct
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import Dataset

from invcoss_core.config import StageConfig, build_config
from invcoss_core.data import TensorImages
from invcoss_core.replay import NoReplay
from invcoss_core.training.stage import seeded_model, train_stage


def bare_loop(cfg: StageConfig, modality: str, batch: torch.Tensor, steps: int, device: torch.device) -> float:
    """Images per second of the plainest correct loop."""
    model = seeded_model(cfg, "bench").to(device).train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.train.lr, betas=cfg.train.betas, weight_decay=cfg.train.weight_decay
    )
    x = batch.to(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = model(x, modality).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * x.shape[0] / (time.perf_counter() - start)


def our_loop(cfg: StageConfig, modality: str, data: Dataset[torch.Tensor], device: torch.device) -> float:
    """Images per second of the project's stage loop (statistics recorded in its last epoch, as in a stage)."""
    model = seeded_model(cfg, "bench").to(device)
    replay = NoReplay()
    start = time.perf_counter()
    seen = train_stage(
        config=cfg,
        modality=modality,
        train_data=data,
        student=model,
        teacher=None,
        replay=replay,
        device=device,
        checkpoint_dir=None,
        fingerprint="bench",
        stage_index=1,
    ).seen
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="small", choices=["tiny", "small", "base"])
    parser.add_argument("--modality", default="ct")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per measurement")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of our loop (steps split across them)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    base = build_config(args.profile)
    steps_per_epoch = max(1, args.steps // args.epochs)
    cfg = build_config(
        args.profile, {"train": {"epochs": args.epochs, "steps_per_epoch": steps_per_epoch, "num_workers": 0}}
    )
    spec = cfg.model.spec(args.modality)
    bs = base.train.batch_size
    g = torch.Generator().manual_seed(0)
    data = TensorImages(torch.rand(bs * steps_per_epoch, *spec.input_shape, generator=g))
    batch = data.images[:bs]
    steps = steps_per_epoch * args.epochs
    torch.set_num_threads(torch.get_num_threads())
    bare_loop(cfg, args.modality, batch, 3, device)  # warm-up (allocator, kernels)
    ours, bare = [], []
    for _ in range(args.repeats):
        bare.append(bare_loop(cfg, args.modality, batch, steps, device))
        ours.append(our_loop(cfg, args.modality, data, device))
    b, o = statistics.median(bare), statistics.median(ours)
    print(
        f"profile={args.profile} modality={args.modality} batch={bs} steps={steps} device={device} "
        f"threads={torch.get_num_threads()} repeats={args.repeats}"
    )
    print(f"{'loop':<12}{'images/s (median)':>20}{'all runs':>40}")
    print(f"{'bare torch':<12}{b:>20.1f}{', '.join(f'{v:.1f}' for v in bare):>40}")
    print(f"{'invcoss':<12}{o:>20.1f}{', '.join(f'{v:.1f}' for v in ours):>40}")
    print(f"ratio invcoss/bare = {o / b:.3f} (goal >= 0.95)")


if __name__ == "__main__":
    main()
