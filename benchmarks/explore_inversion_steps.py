"""Exploration: does a longer-optimised generator close `invcoss`'s CT gap to the real buffer?

Run `small-mri45` (5 seeds, results/HISTORY.md): after the MRI stage `invcoss` has lost more CT reconstruction than
`real_buffer` (CT rise +0.034 vs +0.004); four times the pool did not help (`explore_pool_size.py`). The small
profile optimises the InvUNet for 100 steps on its first batch and 6 on each later one — for CT's 102 images (four
batches) 118 steps in all. On seed 0's CT model those images stay off the real data: pixel sd 0.062 (held-out real
0.083), nearest-pool cosine of held-out real images 0.717 (nearest real training image 0.874), pool self-similarity
0.659 (real 0.450), L_norm 0.406. With 600 + 60 per batch (780 steps, 66 s on 2 CPU threads): sd 0.082, cover 0.771,
self-similarity 0.473, L_norm 0.200 (`invcoss_inv600`).

Result (seeds 0–4, run `small-mri45-inv600`): CT rise +0.014 instead of +0.034, earlier-modality
reconstruction no longer separable from the buffer's; 600 + 60 is now the `small` preset's setting, so with the
current code `invcoss_inv600` and `invcoss` are the same configuration (kept for reproducing the folder).

This runs `invcoss bench` with that one extra method. Everything else — the shared CT stage of each seed, the data
order, the evaluation — is the benchmark's, so its stage JSONs compare with `invcoss`'s seed by seed. The method
is registered in this process only; the product's method list is unchanged. Every argument is passed to
`invcoss bench`:

    python benchmarks/explore_inversion_steps.py --profile small --data SAMPLES --out OUT \\
        --methods invcoss_inv600 --ablation-seeds 3 --shard 0/3 --no-figures --threads 1
"""

from __future__ import annotations

from exploration import bench_main, register

from invcoss_core.evaluation.settings import MethodSpec

ITERATIONS, PER_BATCH = 600, 60

register(
    MethodSpec(
        "invcoss_inv600",
        "inversion",
        f"InvCoSS with the generator optimised {ITERATIONS} steps on its first batch, {PER_BATCH} on each later one "
        "(exploration: inversion steps)",
        {"inversion": {"iterations": ITERATIONS, "iterations_per_batch": PER_BATCH}},
        ablation=True,
    )
)

if __name__ == "__main__":
    bench_main()
