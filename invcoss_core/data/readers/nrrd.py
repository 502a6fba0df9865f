"""The NRRD reader (.nrrd, .nhdr) with pynrrd, its space to RAS."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from invcoss_core.data.errors import ImageReadError
from invcoss_core.data.readers.base import FORMAT_NRRD, RawImage, check_shape, scalar_image, with_note
from invcoss_core.data.readers.orientation import to_ras


def read_nrrd(path: Path) -> RawImage:
    """Read a .nrrd / .nhdr file with pynrrd; 2-D images come back as (H, W).

    Raises:
        ImageReadError: for an unreadable, oversized, non-scalar or non-finite file.
    """
    import nrrd

    header = nrrd.read_header(str(path))
    sizes = [int(s) for s in np.atleast_1d(header.get("sizes", []))]
    check_shape(sizes)
    kinds = [str(k).lower() for k in header.get("kinds", [])]
    non_spatial = {"vector", "covariant-vector", "rgb-color", "rgba-color", "3-color", "4-color", "list", "point"}
    if any(k in non_spatial for k, s in zip(kinds, sizes) if s > 1):
        raise ImageReadError(f"non-scalar NRRD (axis kinds {kinds}): store grey-level volumes")
    data, header = nrrd.read(str(path), index_order="F")
    spacing = _nrrd_spacing(header, data.ndim)
    affine, why = _nrrd_ras_affine(header, data.ndim)
    arr, spacing, note = to_ras(np.asarray(data), spacing, affine, why)
    raw = with_note(scalar_image(arr, spacing, FORMAT_NRRD, str(data.dtype)), note)
    if raw.spatial_dims == 2:  # F order gives (x, y); images are (H, W) = (y, x)
        spacing2 = tuple(reversed(raw.spacing)) if raw.spacing else None
        raw = replace(raw, array=np.ascontiguousarray(raw.array.T), spacing=spacing2)
    return raw


# NRRD 'space' → signs that take its axes to RAS (only the orientation matters, not the origin).
_NRRD_SPACE_TO_RAS = {
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
}


def _nrrd_ras_affine(header: dict[str, Any], ndim: int) -> tuple[np.ndarray | None, str]:
    """The voxel → RAS affine of a 3-D NRRD from 'space' and 'space directions', or (None, why not)."""
    if ndim != 3:
        return None, "not a volume"
    space = str(header.get("space", "")).lower()
    signs = _NRRD_SPACE_TO_RAS.get(space)
    if signs is None:
        return None, f"NRRD space {space or 'not given'!r}"
    directions = header.get("space directions")
    try:
        linear = np.asarray(directions, dtype=float)
    except (TypeError, ValueError):
        return None, "NRRD space directions unreadable"
    if linear.shape != (3, 3):
        return None, "NRRD space directions not 3 x 3"
    affine = np.eye(4)
    affine[:3, :3] = np.diag(signs) @ linear.T  # columns: the RAS direction of each index axis
    return affine, ""


def _nrrd_spacing(header: dict[str, Any], ndim: int) -> tuple[float, ...] | None:
    directions = header.get("space directions")
    if directions is not None:
        norms = []
        for row in np.asarray(directions, dtype=object):
            vec = np.asarray(row, dtype=float) if row is not None else np.array([np.nan])
            if vec.size > 1 and np.all(np.isfinite(vec)):
                norms.append(float(np.linalg.norm(vec)))
        if len(norms) == ndim:
            return tuple(norms)
    spacings = header.get("spacings")
    if spacings is not None and len(spacings) == ndim:
        return tuple(float(s) for s in spacings)
    return None
