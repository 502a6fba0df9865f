"""What every reader shares: the RawImage record, the size limits, the format names, value checks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from invcoss_core.data.errors import ImageReadError

MAX_FILE_BYTES = 8 << 30  # larger files are refused before opening them
MAX_ELEMENTS = 1 << 28  # values per image (268 M, 1 GiB as float32); a bigger header is an absurd size
MAX_AXIS = 1 << 16  # voxels along any one axis
MIN_AXIS_2D = 8  # pixels along each axis of a 2-D image


FORMAT_NIFTI = "nifti"
FORMAT_NRRD = "nrrd"
FORMAT_DICOM = "dicom"
FORMAT_DICOM_SERIES = "dicom-series"
FORMAT_PIL = "pil"
FORMAT_TIFF = "tiff"


@dataclass(frozen=True)
class RawImage:
    """Pixel values of one image as stored (after the DICOM modality LUT), with what the file says about them."""

    array: np.ndarray  # float32, see the module docstring for the axis order
    spacing: tuple[float, ...] | None  # mm per spatial axis in array order; None when the file does not say
    rgb: bool  # True: last axis holds R, G, B
    source_format: str  # one of the FORMAT_* names
    source_dtype: str  # dtype of the stored values, e.g. "int16", "uint8"
    notes: tuple[str, ...] = field(default=())  # facts worth a line in a report (pyramid level, inversion)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape without the colour axis."""
        return tuple(self.array.shape[:-1] if self.rgb else self.array.shape)

    @property
    def spatial_dims(self) -> int:
        """2 for images, 3 for volumes."""
        return len(self.spatial_shape)

    def with_note(self, note: str) -> RawImage:
        """A copy with one more report note."""
        return replace(self, notes=(*self.notes, note))


def check_shape(shape: Sequence[int]) -> None:
    """Refuse a header shape that is empty, negative or too large to load.

    Raises:
        ImageReadError: naming the shape and the limit it breaks.
    """
    dims = [int(s) for s in shape]
    if not dims or any(s <= 0 for s in dims):
        raise ImageReadError(f"invalid image shape {tuple(dims)} in the header")
    if any(s > MAX_AXIS for s in dims):
        raise ImageReadError(f"absurd size: shape {tuple(dims)} has an axis over {MAX_AXIS}")
    if math.prod(dims) > MAX_ELEMENTS:
        raise ImageReadError(f"absurd size: shape {tuple(dims)} holds more than {MAX_ELEMENTS} values")


def finite_nonconstant(arr: np.ndarray) -> np.ndarray:
    """float32 copy of `arr`, refusing NaN/inf and images without any contrast."""
    out = np.asarray(arr, dtype=np.float32)
    finite = np.isfinite(out)
    if not finite.all():
        bad = int(out.size - np.count_nonzero(finite))
        raise ImageReadError(f"contains NaN or infinite values ({bad} of {out.size})")
    lo, hi = float(out.min()), float(out.max())
    if lo == hi:
        raise ImageReadError(f"constant image: every value is {lo:g}")
    return out


def squeeze(arr: np.ndarray, spacing: tuple[float, ...] | None) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """Drop singleton axes (a (X, Y, Z, 1) NIfTI is a volume, a (X, Y, 1) one is a slice)."""
    keep = [i for i, s in enumerate(arr.shape) if s != 1]
    squeezed = arr.reshape([arr.shape[i] for i in keep])
    if spacing is not None:
        spacing = tuple(spacing[i] for i in keep if i < len(spacing))
        if len(spacing) != squeezed.ndim:
            spacing = None
    return squeezed, spacing


def scalar_image(arr: np.ndarray, spacing: tuple[float, ...] | None, fmt: str, dtype: str) -> RawImage:
    arr, spacing = squeeze(arr, spacing)
    if arr.ndim < 2:
        raise ImageReadError(f"{arr.ndim}-D data of shape {arr.shape}: not an image")
    if arr.ndim > 3:
        raise ImageReadError(
            f"{arr.ndim}-D data of shape {arr.shape}: store one 2-D image or 3-D volume per file "
            "(split time series and multi-channel volumes)"
        )
    return RawImage(finite_nonconstant(arr), valid_spacing(spacing), False, fmt, dtype)


def valid_spacing(spacing: Sequence[float] | None) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    values = tuple(float(s) for s in spacing)
    if not values or any(not math.isfinite(s) or s <= 0 for s in values):
        return None
    return values


def with_note(raw: RawImage, note: str | None) -> RawImage:
    return raw.with_note(note) if note else raw
