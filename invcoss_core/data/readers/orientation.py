"""Volumes into the closest RAS+ orientation by their voxel-to-patient affine (permute and flip, no resampling)."""

from __future__ import annotations

import numpy as np

NO_ORIENTATION = "orientation unknown ({why}): stored voxel order kept"


def to_ras(
    arr: np.ndarray, spacing: tuple[float, ...] | None, affine: np.ndarray | None, why_unknown: str = "no affine"
) -> tuple[np.ndarray, tuple[float, ...] | None, str | None]:
    """Permute and flip the first three axes of a volume into the closest RAS+ orientation.

    Args:
        arr: (X, Y, Z[, 1...]) values in stored index order.
        spacing: mm per stored axis (or None).
        affine: 4x4 voxel-index → RAS (mm) matrix of the stored order, or None when the file gives none.
    Returns:
        (array, spacing, note): the reoriented array (a view is copied to contiguous memory) and spacing; the
        note says what was done ("reoriented LPS → RAS"), that nothing could be done, or is None when the file
        was already RAS.
    """
    from nibabel.orientations import aff2axcodes, apply_orientation, io_orientation

    if arr.ndim < 3 or any(s == 1 for s in arr.shape[:3]):
        return arr, spacing, None  # a slice or a 2-D image: rows-first convention, nothing to reorient
    if affine is None:
        return arr, spacing, NO_ORIENTATION.format(why=why_unknown)
    affine = np.asarray(affine, dtype=float)
    if not np.all(np.isfinite(affine[:3, :3])) or abs(float(np.linalg.det(affine[:3, :3]))) < 1e-12:
        return arr, spacing, NO_ORIENTATION.format(why="degenerate affine")
    ornt = io_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return arr, spacing, None
    codes = "".join(str(c) for c in aff2axcodes(affine))
    out = np.ascontiguousarray(apply_orientation(arr, ornt))
    if spacing is not None and len(spacing) >= 3:
        ras = [0.0, 0.0, 0.0]
        for axis, (target, _flip) in enumerate(ornt):
            ras[int(target)] = spacing[axis]
        spacing = (*ras, *spacing[3:])
    return out, spacing, f"reoriented {codes} → RAS"
