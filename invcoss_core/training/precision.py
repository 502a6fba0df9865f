"""Training precision: bf16 autocast on GPUs that support it, float32 everywhere else; named for the manifest."""

from __future__ import annotations

from typing import Literal

import torch

Precision = Literal["float32", "bfloat16"]


def training_precision(device: torch.device, amp: bool) -> Precision:
    """The precision a stage trains in on `device`.

    bf16 autocast needs no loss scaling (float32's exponent range), so it is used wherever the GPU runs it natively
    (Ampere and later); float16 would need a gradient scaler and is not offered. CPUs train in float32: bf16 autocast
    there is slower than float32 on most CPUs without AMX, and the CPU runs are the reference numbers.

    Args:
        device: the training device.
        amp: `train.amp` of the stage config (False forces float32).
    Returns:
        "bfloat16" or "float32".
    """
    if amp and device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bfloat16"
    return "float32"


def autocast(device: torch.device, precision: Precision) -> torch.autocast:
    """The autocast context of `precision` on `device` (a disabled one for float32)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")


__all__ = ["Precision", "autocast", "training_precision"]
