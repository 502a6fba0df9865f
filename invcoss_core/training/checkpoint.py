"""Epoch checkpoints of a running stage (site-local files: safetensors + JSON, written atomically)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CKPT_TENSORS = "state.safetensors"
CKPT_META = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used (corrupt, or from another stage)."""


@dataclass(frozen=True)
class Checkpoint:
    """State after `epoch` finished epochs."""

    epoch: int
    fingerprint: str
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    history: dict[str, list[float]]


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def _moved_aside(path: Path) -> Path:
    """Where `save_checkpoint` keeps the previous checkpoint while it moves the new one into place."""
    return path.with_name(f".{path.name}.old")


def remove_checkpoint(path: Path) -> None:
    """Delete the checkpoint in `path` and any moved-aside one (the stage is finished)."""
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(_moved_aside(Path(path)), ignore_errors=True)


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    """Write `ckpt` to directory `path` atomically (the previous checkpoint stays until the new one is whole)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_meta = _flatten_optimizer(ckpt.optimizer)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in ckpt.model.items()}
    tensors.update(opt_tensors)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(tensors, str(tmp / CKPT_TENSORS))
        meta = {"epoch": ckpt.epoch, "fingerprint": ckpt.fingerprint, "optimizer": opt_meta, "history": ckpt.history}
        (tmp / CKPT_META).write_text(json.dumps(meta))
        for name in (CKPT_TENSORS, CKPT_META):
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        old = _moved_aside(path)
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(path: Path, fingerprint: str) -> Checkpoint | None:
    """The checkpoint in `path` if it belongs to the stage with `fingerprint`, else None.

    Raises:
        CheckpointError: when a checkpoint of this stage exists but is unreadable.
    """
    path = Path(path)
    meta_file = path / CKPT_META
    if not meta_file.is_file():
        old = _moved_aside(path)
        if not (old / CKPT_META).is_file():
            return None
        # a crash between save_checkpoint's two renames: the previous checkpoint is whole under its old name
        path, meta_file = old, old / CKPT_META
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {meta_file} is unreadable ({err}); delete {path} to restart the stage"
        ) from None
    if meta.get("fingerprint") != fingerprint:
        return None
    try:
        tensors = load_file(str(path / CKPT_TENSORS))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt ({err}); delete it to restart the stage") from None
    model = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    return Checkpoint(
        epoch=int(meta["epoch"]),
        fingerprint=fingerprint,
        model=model,
        optimizer=_unflatten_optimizer(tensors, meta["optimizer"]),
        history={k: list(v) for k, v in meta.get("history", {}).items()},
    )
