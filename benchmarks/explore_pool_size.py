"""Exploration: does a larger synthetic pool close `invcoss`'s CT gap to the real buffer?

Run `small-mri45` (5 seeds, results/HISTORY.md): after the MRI stage `invcoss` has lost more CT reconstruction than
`real_buffer` (CT rise +0.034 vs +0.004) while MRI matches; both keep 5 % of a stage's training samples, which is
102 images for CT and 512 for MRI. This runs `invcoss bench` with one extra method, `invcoss_pool4x`: the full
method with `[inversion] num_images` fixed to 408 per stage (4 × 102; for MRI it is 408 instead of 512, which
only matters after the MRI stage). Everything else — the shared CT stage of each seed, the data order, the
evaluation — is the benchmark's, so its stage JSONs compare with `invcoss`'s seed by seed.

The extra method is registered in this process only; the product's method list is unchanged. Every argument is
passed to `invcoss bench`:

    python benchmarks/explore_pool_size.py --profile small --data SAMPLES --out OUT --methods invcoss_pool4x \\
        --seeds 1 --no-figures --threads 2
"""

from __future__ import annotations

from exploration import bench_main, register

from invcoss_core.evaluation.settings import MethodSpec

POOL_IMAGES = 408  # 4 × the 102 images a 5 % share of the small profile's 2048 CT training samples gives

register(
    MethodSpec(
        "invcoss_pool4x",
        "inversion",
        f"InvCoSS with {POOL_IMAGES} synthetic images per stage (exploration: pool size)",
        {"inversion": {"num_images": POOL_IMAGES}},
        ablation=True,
    )
)

if __name__ == "__main__":
    bench_main()
