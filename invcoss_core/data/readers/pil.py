"""The PNG / JPEG reader with Pillow."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from invcoss_core.data.errors import ImageReadError
from invcoss_core.data.readers.base import FORMAT_PIL, RawImage, check_shape, finite_nonconstant


def read_pil(path: Path) -> RawImage:
    """Read a PNG or JPEG with Pillow: grey modes stay grey (16-bit kept), colour modes become RGB.

    Raises:
        ImageReadError: for an unreadable, truncated or oversized file.
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            handle = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageReadError(f"absurd size: {err}") from None
        with handle as im:
            width, height = im.size
            check_shape((height, width, 3))
            im.load()
            mode = im.mode
            if mode in ("1", "L", "I", "F") or mode.startswith("I;16"):
                arr = np.asarray(im.convert("F") if mode == "1" else im)
                return _rgb_or_grey(arr, False, mode)
            if mode == "LA":
                return _rgb_or_grey(np.asarray(im.convert("L")), False, mode)
            return _rgb_or_grey(np.asarray(im.convert("RGB")), True, mode)


def _rgb_or_grey(arr: np.ndarray, rgb: bool, dtype: str) -> RawImage:
    if rgb:
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ImageReadError(f"expected an RGB image, got shape {arr.shape}")
        return RawImage(finite_nonconstant(arr), None, True, FORMAT_PIL, str(arr.dtype))
    if arr.ndim != 2:
        raise ImageReadError(f"expected a grey-level image, got shape {arr.shape}")
    return RawImage(finite_nonconstant(arr), None, False, FORMAT_PIL, dtype)
