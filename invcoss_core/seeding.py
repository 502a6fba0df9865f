"""Seeds from named parts: one reproducible, independent random stream per purpose (run, stage, epoch, ...)."""

from __future__ import annotations

import hashlib

__all__ = ["derive_seed"]


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from named parts (run seed, stage, epoch): independent streams, reproducible.

    Args:
        parts: the names and numbers that identify the stream, e.g. `(seed, "inversion", stage, modality)`.

    Returns:
        A non-negative integer below 2**63, fit for `torch.Generator().manual_seed`.
    """
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)
