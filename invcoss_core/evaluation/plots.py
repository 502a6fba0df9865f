"""Benchmark figures (matplotlib, Agg backend): accuracy and reconstruction per stage, forgetting, image grids."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from invcoss_core.artifact import REAL_BUFFER, ArtifactError, read_artifact_dir
from invcoss_core.evaluation.data import BenchData
from invcoss_core.evaluation.probes import stride_indices

logger = logging.getLogger(__name__)

_REFERENCE_STYLE = {"joint": "--"}


def _arr(values: Any) -> np.ndarray:
    return np.asarray([[math.nan if v is None else v for v in row] for row in values], dtype=float)


def _colours(names: Sequence[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {name: cmap(i % 10) for i, name in enumerate(names)}


def _per_stage(ax: Any, results: Mapping[str, Any], key: str, column: int, colours: Mapping[str, Any]) -> None:
    stages = len(results["modalities"])
    x = np.arange(1, stages + 1)
    for name, m in results["methods"].items():
        mean, sd = _arr(m[key]), _arr(m[f"{key}_sd"])
        if len(m["stages"]) == 1:  # the joint reference: one value, drawn across
            ax.axhline(mean[0, column], color=colours[name], linestyle=_REFERENCE_STYLE.get(name, ":"), label=name)
            continue
        ax.errorbar(
            x,
            mean[:, column],
            yerr=np.nan_to_num(sd[:, column]),
            color=colours[name],
            marker="o",
            capsize=3,
            label=name,
        )
    ax.set_xticks(x, [f"{i}\n{mod}" for i, mod in zip(x, results["modalities"])])
    ax.set_xlabel("after stage")


def accuracy_figure(results: Mapping[str, Any], path: Path, key: str = "acc") -> None:
    """One panel per task: probe accuracy after each stage per method, with the raw-pixel/random-encoder floor."""
    tasks = results["tasks"]
    colours = _colours(list(results["methods"]))
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    base = results["baselines"]
    base_key = "acc" if key == "acc" else "acc_knn"
    for j, task in enumerate(tasks):
        ax = axes[j // cols][j % cols]
        _per_stage(ax, results, key, j, colours)
        raw = base["raw_pixels"][base_key][j]
        rnd = base["random_encoder"][base_key][j]
        if raw is not None:
            ax.axhline(raw, color="grey", linestyle=":", linewidth=1, label="raw pixels")
        if rnd is not None:
            ax.axhline(rnd, color="black", linestyle=":", linewidth=1, label="random encoder")
        owner = results["modalities"][results["task_stage"][j]]
        ax.set_title(f"{task} ({owner}{', pseudo' if results['task_pseudo'][j] else ''})", fontsize=9)
        ax.set_ylabel("balanced accuracy")
    for j in range(len(tasks), rows * cols):
        axes[j // cols][j % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    probe = "linear" if key == "acc" else "kNN"
    fig.suptitle(f"Frozen-encoder {probe} probe after each stage (mean ± sd over seeds)")
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def recon_figure(results: Mapping[str, Any], path: Path, key: str = "recon") -> None:
    """One panel per modality: held-out masked-reconstruction loss after each stage per method."""
    order = results["modalities"]
    colours = _colours(list(results["methods"]))
    fig, axes = plt.subplots(1, len(order), figsize=(4.2 * len(order), 3.6), squeeze=False)
    for m, modality in enumerate(order):
        ax = axes[0][m]
        _per_stage(ax, results, key, m, colours)
        rnd = results["baselines"]["random_encoder"].get(key, [None] * len(order))[m]
        if rnd is not None:
            ax.axhline(rnd, color="black", linestyle=":", linewidth=1, label="untrained model")
        ax.set_title(f"{modality} (trained in stage {m + 1})", fontsize=9)
        ax.set_ylabel("held-out masked MSE (↓)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    what = "decoder co-trained in the modality's own stage" if key == "recon" else "refitted decoder probe"
    fig.suptitle(f"Held-out reconstruction loss after each stage ({what}, mean ± sd)")
    fig.tight_layout(rect=(0, 0.12, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def forgetting_figure(results: Mapping[str, Any], path: Path) -> None:
    """Bars per method: BWT (points), rise of each earlier modality's reconstruction loss, and avg_prev."""
    methods = results["methods"]
    names = list(methods)
    colours = _colours(names)
    earlier = results["modalities"][:-1]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = np.arange(len(names))
    bwt = [100 * (methods[n]["bwt"] if methods[n]["bwt"] is not None else math.nan) for n in names]
    bwt_sd = [100 * (methods[n]["bwt_sd"] or 0.0) for n in names]
    axes[0].bar(x, np.nan_to_num(bwt), yerr=bwt_sd, color=[colours[n] for n in names], capsize=3)
    axes[0].axhline(0, color="black", linewidth=0.8)
    axes[0].set_title("backward transfer (linear probe, points; < 0 = forgetting)", fontsize=9)
    width = 0.8 / max(1, len(earlier))
    for i, modality in enumerate(earlier):
        rise = [methods[n]["recon_increase"].get(modality) for n in names]
        sd = [methods[n]["recon_increase_sd"].get(modality) for n in names]
        axes[1].bar(
            x + (i - (len(earlier) - 1) / 2) * width,
            [math.nan if r is None else r for r in rise],
            width,
            yerr=[0.0 if s is None else s for s in sd],
            capsize=2,
            label=modality,
        )
    axes[1].axhline(0, color="black", linewidth=0.8)
    axes[1].legend(fontsize=8)
    axes[1].set_title("rise of earlier modalities' held-out recon loss (> 0 = forgetting)", fontsize=9)
    prev = [100 * (math.nan if methods[n]["avg_prev"] is None else methods[n]["avg_prev"]) for n in names]
    prev_sd = [100 * (methods[n]["avg_prev_sd"] or 0.0) for n in names]
    axes[2].bar(x, prev, yerr=prev_sd, color=[colours[n] for n in names], capsize=3)
    finite = [p for p in prev if math.isfinite(p)]
    axes[2].set_ylim(max(0.0, min(finite) - 10) if finite else 0, 100)
    axes[2].set_title("avg accuracy on earlier modalities' tasks after the last stage (%)", fontsize=9)
    for ax in axes:
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _show(image: torch.Tensor) -> tuple[np.ndarray, str | None]:
    """(C, *spatial) in [0, 1] -> a 2-D picture (middle slice of a volume) and its colour map."""
    x = image.float()
    if x.dim() == 4:
        x = x[:, x.shape[1] // 2]
    if x.shape[0] == 3:
        return x.permute(1, 2, 0).clamp(0, 1).numpy(), None
    return x[0].clamp(0, 1).numpy(), "gray"


def _pools(results: Mapping[str, Any], out: Path) -> dict[str, dict[str, torch.Tensor]]:
    pools: dict[str, dict[str, torch.Tensor]] = {}
    for name, m in results["methods"].items():
        try:
            artifact = read_artifact_dir(out / m["final_model"])
        except (ArtifactError, OSError) as err:
            logger.warning("no image pools for %s: %s", name, err)
            continue
        found = dict(artifact.synthetic) or dict(artifact.extras.get(REAL_BUFFER.removesuffix(".safetensors"), {}))
        if found:
            pools[name] = found
    return pools


def image_grids(results: Mapping[str, Any], data: BenchData, out: Path, per_row: int) -> list[str]:
    """Per modality: real training images beside each method's replay pool (synthetic or real buffer)."""
    pools = _pools(results, out)
    written = []
    for modality in results["modalities"]:
        rows: list[tuple[str, torch.Tensor]] = []
        real = data.modalities[modality].train
        rows.append(("real (train)", real[stride_indices(real.shape[0], per_row)]))
        for name, found in pools.items():
            if modality in found and found[modality].shape[0]:
                pool = found[modality]
                rows.append((name, pool[stride_indices(pool.shape[0], per_row)]))
        if len(rows) == 1:
            continue
        fig, axes = plt.subplots(len(rows), per_row, figsize=(1.4 * per_row, 1.5 * len(rows)), squeeze=False)
        for r, (label, images) in enumerate(rows):
            for c in range(per_row):
                ax = axes[r][c]
                ax.set_xticks([])
                ax.set_yticks([])
                if c < images.shape[0]:
                    picture, cmap = _show(images[c])
                    ax.imshow(picture, cmap=cmap, vmin=0, vmax=1)
                if c == 0:
                    ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
        fig.suptitle(
            f"{modality}: real training images vs replay pools (seed 0, final hand-off"
            f"{', middle slice' if real.dim() == 5 else ''})",
            fontsize=9,
        )
        fig.tight_layout()
        name = f"images_{modality}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def write_figures(results: Mapping[str, Any], data: BenchData, out: Path) -> list[str]:
    """Write every figure into `out`; returns their file names (relative to `out`)."""
    out = Path(out)
    accuracy_figure(results, out / "accuracy_by_stage.png")
    accuracy_figure(results, out / "accuracy_knn_by_stage.png", key="acc_knn")
    recon_figure(results, out / "recon_by_stage.png")
    forgetting_figure(results, out / "forgetting.png")
    names = ["accuracy_by_stage.png", "accuracy_knn_by_stage.png", "recon_by_stage.png", "forgetting.png"]
    if any(v is not None for v in results["baselines"]["random_encoder"].get("recon_refit", [])):
        recon_figure(results, out / "recon_refit_by_stage.png", key="recon_refit")
        names.append("recon_refit_by_stage.png")
    per_row = int(results["settings"].get("grid_images", 8))
    return names + image_grids(results, data, out, per_row)
