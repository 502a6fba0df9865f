"""Seeded Lloyd's k-means in torch (k-means++ seeding), used by the MedCoSS real buffer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KMeansResult:
    """centroids (K, D), labels (N,), distances (N,) squared distance of each point to its centroid."""

    centroids: torch.Tensor
    labels: torch.Tensor
    distances: torch.Tensor


def kmeans(points: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> KMeansResult:
    """Cluster `points` (N, D) into `k` clusters.

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
