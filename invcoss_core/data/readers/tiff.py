"""The TIFF / Aperio SVS reader with tifffile, and the axis layout shared with the whole-slide reader."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from invcoss_core.data.errors import ImageReadError
from invcoss_core.data.readers.base import FORMAT_TIFF, MAX_ELEMENTS, RawImage, check_shape, finite_nonconstant


def read_tiff(path: Path) -> RawImage:
    """Read a TIFF or Aperio SVS with tifffile (series 0; the label and macro images of an SVS are never read).

    A pyramid whose full level exceeds the size limit is read at its largest level within the limit (noted); a
    pathology site reads such a slide as full-resolution regions instead (`slides.read_slide_regions`).

    Raises:
        ImageReadError: for an unreadable or truncated file, an unsupported layout or an absurd size.
    """
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        if not tif.series:
            raise ImageReadError("TIFF file holds no image series")
        series = tif.series[0]
        levels = list(getattr(series, "levels", None) or [series])
        chosen = None
        for index, level in enumerate(levels):
            if math.prod(level.shape) <= MAX_ELEMENTS:
                chosen = (index, level)
                break
        if chosen is None:
            check_shape(series.shape)  # raises with the shape in the message
            raise ImageReadError(f"absurd size: TIFF shape {series.shape}")
        index, level = chosen
        check_shape(level.shape)
        axes = str(level.axes)
        expected = math.prod(level.shape) * np.dtype(level.dtype).itemsize
        arr = np.asarray(level.asarray())
        if arr.nbytes != expected:
            raise ImageReadError(f"TIFF data is incomplete ({arr.nbytes} of {expected} bytes)")
        _require_complete_tiff_strips(tif, level, path)
    raw = tiff_layout(arr, axes)
    if index > 0:
        raw = raw.with_note(f"pyramid level {index} read (full level over the size limit)")
    return raw


def _require_complete_tiff_strips(tif: Any, level: Any, path: Path) -> None:
    """tifffile fills strips that lie past the end of a truncated file with zeros; refuse such files."""
    size = path.stat().st_size
    pages = getattr(level, "pages", None) or []
    for page in pages:
        offsets = getattr(page, "dataoffsets", ()) or ()
        counts = getattr(page, "databytecounts", ()) or ()
        for offset, count in zip(offsets, counts):
            if offset + count > size:
                raise ImageReadError(
                    f"truncated TIFF: image data ends at byte {offset + count}, the file has {size} bytes"
                )


def tiff_layout(arr: np.ndarray, axes: str) -> RawImage:
    """A RawImage from a TIFF array and its tifffile axes (YX grey, YXS/SYX/CYX/YXC colour, ZYX volume).

    Raises:
        ImageReadError: for another layout, or values that are not finite or all equal.
    """
    keep = [i for i, s in enumerate(arr.shape) if s != 1]
    arr = arr.reshape([arr.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if axes == "YX":
        return RawImage(finite_nonconstant(arr), None, False, FORMAT_TIFF, str(arr.dtype))
    if axes in ("YXS", "SYX", "CYX", "YXC") and (3 in arr.shape):
        channel_axis = axes.index("S") if "S" in axes else axes.index("C")
        colour = np.moveaxis(arr, channel_axis, -1)
        if colour.shape[-1] not in (3, 4):
            raise ImageReadError(f"unsupported TIFF layout: axes {axes}, shape {arr.shape}")
        return RawImage(finite_nonconstant(colour[..., :3]), None, True, FORMAT_TIFF, str(arr.dtype))
    if len(axes) == 3 and "S" not in axes:
        volume = np.ascontiguousarray(np.transpose(arr, (2, 1, 0)))  # (Z, Y, X) -> (X, Y, Z)
        return RawImage(finite_nonconstant(volume), None, False, FORMAT_TIFF, str(arr.dtype))
    raise ImageReadError(f"unsupported TIFF layout: axes {axes}, shape {arr.shape}")
