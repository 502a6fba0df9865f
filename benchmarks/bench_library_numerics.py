"""Our hand-written probes, k-means and statistics against scikit-learn / scipy, side by side on the bench's sizes.

"Ours" is the hand-written code: the current one where we kept it (linear probe, balanced accuracy, t quantile,
sign test) and, where the library replaced it (kNN probe, k-means: issue 31), the former torch code, kept below as
the reference; "library" is scikit-learn / scipy, through the product's own functions where they use it.
For each piece the same inputs go to ours and to the library, alternated `--repeats` times in this process; the
table prints the median seconds of each, their ratio (library / ours: below 1 the library is faster) and how well
the results agree. The sizes are those of `invcoss bench`: probe splits of the small profile's tasks (61-402 test
samples, at most 2000 per split, mean_centre features of width 2·128) and of the base profile (4000 per split,
width 2·768); k-means on a stage's mean-pooled features (small: 2048 / 6144 / 10240 samples of width 128, clusters
1 % of them, 25 iterations). Features are Gaussian class clusters with overlap, so that the probes are neither
trivial nor at chance.

    python benchmarks/bench_library_numerics.py [--repeats 5] [--out docs/results/library-numerics/results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import sklearn
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.preprocessing import StandardScaler

from invcoss_core.evaluation.metrics import sign_test_p, t975
from invcoss_core.evaluation.probes import balanced_accuracy, knn_predict, linear_predict
from invcoss_core.replay.kmeans import KMeansResult, kmeans


def features(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, dim) float32 features of `classes` overlapping Gaussian clusters and their (n,) labels.

    The cluster centres depend on (dim, classes) only, so a train and a test split drawn with two seeds share them.
    """
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(dim * 100 + classes)) * 0.12
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    return centres[y] + torch.randn(n, dim, generator=g), y


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median process CPU seconds (all threads) over `repeats` calls and the last result.

    CPU time, not wall time: this machine's cores are shared, and a neighbour's load inflates wall time at random;
    both sides of a row run alternately (`paired`), so drift hits them alike.
    """
    seconds, result = [], None
    for _ in range(repeats):
        start = time.process_time()
        result = fn()
        seconds.append(time.process_time() - start)
    return statistics.median(seconds), result


def paired(ours: Callable[[], Any], library: Callable[[], Any], repeats: int) -> tuple[float, Any, float, Any]:
    """Ours and the library called alternately `repeats` times: (ours seconds, result, library seconds, result)."""
    ours_times, lib_times = [], []
    ours_result = lib_result = None
    for _ in range(repeats):
        seconds, ours_result = timed(ours, 1)
        ours_times.append(seconds)
        seconds, lib_result = timed(library, 1)
        lib_times.append(seconds)
    return statistics.median(ours_times), ours_result, statistics.median(lib_times), lib_result


def torch_knn_predict(
    train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, num_classes: int, k: int
) -> torch.Tensor:
    """Our former kNN probe (torch, until issue 31): similarity-weighted vote of the k nearest under cosine.

    Args:
        train_f: (N, D) features; train_y: (N,) labels; test_f: (M, D).
    Returns:
        (M,) predicted labels. Ties go to the lower class id (deterministic).
    """
    a = F.normalize(train_f.double(), dim=1)
    b = F.normalize(test_f.double(), dim=1)
    k = min(k, a.shape[0])
    preds = []
    for start in range(0, b.shape[0], 1024):
        sim = b[start : start + 1024] @ a.T  # (m, N)
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, dtype=torch.float64)
        votes.scatter_add_(1, train_y[idx].long(), top.clamp_min(0.0) + 1e-9)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def torch_kmeans(points: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> KMeansResult:
    """Our former k-means (torch Lloyd, k-means++ seeding, until issue 31): `points` (N, D) into `k` clusters.

    Raises:
        ValueError: when k is not in [1, N].
    """
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= N; got k={k}, N={n}")
    points = points.float()
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [points[first]]
    d2 = (points - centroids[0]).pow(2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / n)
        nxt = int(torch.multinomial(probs, 1, generator=generator))
        centroids.append(points[nxt])
        d2 = torch.minimum(d2, (points - points[nxt]).pow(2).sum(1))
    c = torch.stack(centroids)
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        dist = torch.cdist(points, c).pow(2)
        new_labels = dist.argmin(1)
        if torch.equal(new_labels, labels) and _ > 0:
            break
        labels = new_labels
        for j in range(k):
            members = points[labels == j]
            if members.shape[0]:
                c[j] = members.mean(0)
    dist = torch.cdist(points, c).pow(2)
    labels = dist.argmin(1)
    return KMeansResult(centroids=c, labels=labels, distances=dist.gather(1, labels[:, None])[:, 0])


def sk_linear(
    train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, steps: int, weight_decay: float
) -> np.ndarray:
    """Our objective in scikit-learn's terms.

    Ours: Σ w_i·CE_i / Σ w_i + wd·|W|² with w = N / (K·n_c) (K classes of the task). scikit-learn's "balanced"
    weights are N / (P·n_c) (P classes present) and its objective ½|W|² + C·Σ w_i·CE_i: the same minimum at
    C = 1 / (2·wd·N).
    """
    scaler = StandardScaler().fit(train_f.double().numpy())
    y = train_y.numpy()
    # tol 1e-8: at scikit-learn's default 1e-4 it stops early and 0.3 % of the labels differ from ours.
    clf = LogisticRegression(C=1.0 / (2 * weight_decay * len(y)), class_weight="balanced", max_iter=steps, tol=1e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at the probe's iteration budget, as ours stops there
        clf.fit(scaler.transform(train_f.double().numpy()), y)
    return np.asarray(clf.predict(scaler.transform(test_f.double().numpy())))


PROBE_SIZES = (  # (name, n_train, n_test, feature width, classes, k, linear steps)
    ("small task", 800, 400, 256, 3, 10, 100),
    ("small cap", 2000, 2000, 256, 4, 10, 100),
    ("base cap", 4000, 4000, 1536, 4, 20, 200),
)


def probe_case(
    name: str, n_train: int, n_test: int, dim: int, classes: int, k: int, steps: int, repeats: int
) -> list[dict[str, Any]]:
    """kNN, linear probe and balanced accuracy: ours and the library on one task size."""
    train_f, train_y = features(n_train, dim, classes, seed=1)
    test_f, test_y = features(n_test, dim, classes, seed=2)
    size = {"n_train": n_train, "n_test": n_test, "dim": dim}
    ours_s, ours, lib_s, lib = paired(
        lambda: torch_knn_predict(train_f, train_y, test_f, classes, k),
        lambda: knn_predict(train_f, train_y, test_f, classes, k),
        repeats,
    )
    rows = [_row(f"kNN probe, {name}", ours_s, lib_s, ours.numpy(), lib.numpy(), test_y.numpy(), classes) | size]
    ours_s, ours, lib_s, lib = paired(
        lambda: linear_predict(train_f, train_y, test_f, classes, steps, 1e-3),
        lambda: sk_linear(train_f, train_y, test_f, steps, 1e-3),
        repeats,
    )
    rows.append(_row(f"linear probe, {name}", ours_s, lib_s, ours.numpy(), lib, test_y.numpy(), classes) | size)
    pred, truth = torch.as_tensor(lib), test_y.numpy()
    ours_s, ours_b, lib_s, lib_b = paired(
        lambda: balanced_accuracy(pred, test_y, classes), lambda: balanced_accuracy_score(truth, lib), repeats * 20
    )
    rows.append(
        {
            "piece": f"balanced accuracy, {name}",
            "ours_s": ours_s,
            "library_s": lib_s,
            "ratio": lib_s / ours_s,
            "agreement": f"|diff| {abs(ours_b - lib_b):.1e}",
        }
        | size
    )
    return rows


def _row(
    piece: str, ours_s: float, lib_s: float, ours: np.ndarray, lib: np.ndarray, truth: np.ndarray, classes: int
) -> dict[str, Any]:
    ours_acc = balanced_accuracy(torch.as_tensor(ours), torch.as_tensor(truth), classes)
    lib_acc = balanced_accuracy(torch.as_tensor(lib), torch.as_tensor(truth), classes)
    same = float((ours == lib).mean())
    return {
        "piece": piece,
        "ours_s": ours_s,
        "library_s": lib_s,
        "ratio": lib_s / ours_s,
        "agreement": f"{100 * same:.1f} % same labels; bal. acc {ours_acc:.4f} vs {lib_acc:.4f}",
        "same_labels": same,
        "ours_accuracy": ours_acc,
        "library_accuracy": lib_acc,
    }


def kmeans_case(modality: str, n: int, repeats: int) -> dict[str, Any]:
    """k-means with k-means++ seeding, 1 % of N clusters, 25 iterations: ours and scikit-learn's."""
    points, _ = features(n, 128, 8, seed=3)
    k = max(1, round(0.01 * n))
    ours_s, ours, lib_s, lib = paired(
        lambda: torch_kmeans(points, k, 25, torch.Generator().manual_seed(0)),
        lambda: kmeans(points, k, 25, torch.Generator().manual_seed(0)),
        repeats,
    )
    ours_inertia, lib_inertia = float(ours.distances.sum()), float(lib.distances.sum())
    return {
        "piece": f"k-means, {modality} N={n} k={k}",
        "ours_s": ours_s,
        "library_s": lib_s,
        "ratio": lib_s / ours_s,
        "agreement": f"inertia {ours_inertia:.5g} vs {lib_inertia:.5g}",
        "ours_inertia": ours_inertia,
        "library_inertia": lib_inertia,
    }


def statistics_rows(repeats: int) -> list[dict[str, Any]]:
    dfs = range(1, 41)
    ours_s, ours = timed(lambda: [t975(df) for df in dfs], repeats * 20)
    lib_s, lib = timed(lambda: [float(scipy.stats.t.ppf(0.975, df)) for df in dfs], repeats * 20)
    worst = max(abs(a - b) for a, b in zip(ours, lib))
    cases = [(losses, n) for n in range(1, 11) for losses in range(n + 1)]
    sign_s, sign = timed(lambda: [sign_test_p(losses, n) for losses, n in cases], repeats * 20)
    binom_s, binom = timed(
        lambda: [float(scipy.stats.binom.sf(losses - 1, n, 0.5)) for losses, n in cases], repeats * 20
    )
    return [
        {
            "piece": "t quantile 0.975, df 1-40",
            "ours_s": ours_s,
            "library_s": lib_s,
            "ratio": lib_s / ours_s,
            "agreement": f"max |diff| {worst:.4f} (table: 3 decimals, 2.042 beyond 30 df)",
        },
        {
            "piece": "sign test p, n 1-10",
            "ours_s": sign_s,
            "library_s": binom_s,
            "ratio": binom_s / sign_s,
            "agreement": f"max |diff| {max(abs(a - b) for a, b in zip(sign, binom)):.1e}",
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (scikit-learn uses its own pool)")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row for size in PROBE_SIZES for row in probe_case(*size, args.repeats)]
    rows += [kmeans_case(m, n, args.repeats) for m, n in (("ct", 2048), ("pathology", 6144), ("mri", 10240))]
    rows += statistics_rows(args.repeats)
    width = max(len(r["piece"]) for r in rows)
    print(f"{'piece':{width}}  {'ours s':>9}  {'library s':>9}  {'lib/ours':>8}  agreement")
    for r in rows:
        print(f"{r['piece']:{width}}  {r['ours_s']:9.5f}  {r['library_s']:9.5f}  {r['ratio']:8.2f}  {r['agreement']}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "command": "python benchmarks/bench_library_numerics.py " + f"--repeats {args.repeats} --out {args.out}",
            "torch": torch.__version__,
            "sklearn": sklearn.__version__,
            "scipy": scipy.__version__,
            "machine": platform.machine(),
            "torch_threads": args.threads,
        }
        clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
        args.out.write_text(json.dumps({"meta": meta, "rows": clean}, indent=2) + "\n")


if __name__ == "__main__":
    main()
