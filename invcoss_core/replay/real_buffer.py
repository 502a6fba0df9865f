"""`real_buffer`: MedCoSS rehearsal — k-means on encoder features, keep the samples nearest each centroid.

It ships real images, so the federated site client refuses it; it exists for the local benchmark only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import torch
from torch.utils.data import DataLoader, Dataset

from invcoss_core.artifact import REAL_BUFFER
from invcoss_core.replay.base import PoolReplay, ReplayContext, ReplayOutcome
from invcoss_core.replay.kmeans import kmeans


def select_buffer(
    features: torch.Tensor, buffer_size: int, clusters: int, iters: int, generator: torch.Generator
) -> torch.Tensor:
    """Indices of `buffer_size` samples: the nearest ones to each of `clusters` k-means centroids.

    Args:
        features: (N, D) mean-pooled encoder features.
    Returns:
        (buffer_size,) int64 indices, unique.
    """
    n = features.shape[0]
    buffer_size = min(buffer_size, n)
    result = kmeans(features, clusters, iters, generator)
    per_cluster = math.ceil(buffer_size / clusters)
    chosen: list[int] = []
    leftovers: list[tuple[float, int]] = []
    for j in range(clusters):
        members = torch.nonzero(result.labels == j)[:, 0]
        order = members[torch.argsort(result.distances[members])]
        chosen += order[:per_cluster].tolist()
        leftovers += [(float(result.distances[i]), int(i)) for i in order[per_cluster:]]
    if len(chosen) > buffer_size:
        chosen.sort(key=lambda i: float(result.distances[i]))
        chosen = chosen[:buffer_size]
    elif len(chosen) < buffer_size:  # small clusters: fill with the next-nearest samples overall
        leftovers.sort()
        chosen += [i for _, i in leftovers[: buffer_size - len(chosen)]]
    return torch.tensor(sorted(chosen), dtype=torch.long)


class RealBufferReplay(PoolReplay):
    """Keeps buffer_fraction of the stage's real samples (MedCoSS) and replays earlier ones."""

    name = "real_buffer"
    ships_real_data = True
    pool_source = REAL_BUFFER.removesuffix(".safetensors")

    def end_stage(
        self, ctx: ReplayContext, real_data: Dataset[torch.Tensor], stats: Mapping[str, torch.Tensor]
    ) -> ReplayOutcome:
        start = time.perf_counter()
        cfg = ctx.config
        model = ctx.student.eval()
        images: list[torch.Tensor] = []
        features: list[torch.Tensor] = []
        loader = DataLoader(real_data, batch_size=cfg.train.batch_size, shuffle=False)
        with torch.no_grad():
            for batch in loader:
                images.append(batch.to(torch.float16))
                features.append(model.embed(batch.to(ctx.device), ctx.modality).cpu())
        all_images = torch.cat(images)
        n = all_images.shape[0]
        buffer_size = max(1, round(cfg.replay.buffer_fraction * n))
        clusters = max(1, min(buffer_size, round(cfg.replay.cluster_fraction * n)))
        generator = torch.Generator().manual_seed(cfg.seed)
        idx = select_buffer(torch.cat(features), buffer_size, clusters, cfg.replay.kmeans_iters, generator)
        pools = self.accumulate(self.incoming_pools(ctx.incoming), ctx.modality, all_images[idx])
        return ReplayOutcome(
            extras={self.pool_source: pools},
            seconds=time.perf_counter() - start,
            metrics={"buffer_size": float(idx.numel()), "buffer_clusters": float(clusters)},
        )
