"""Per-modality preprocessing into the model's convention: float32 in [0, 1], channel-first, on a working grid.

Every model input is float32 in [0, 1] (the inversion generator emits the same range):
- CT: Hounsfield units windowed to [-1000, 1000] HU → [0, 1]. The wide window keeps air/lung (-1000), fat
  (-100), soft tissue (40) and bone (≥ 300) apart, which the probe tasks need; soft-tissue contrast is
  compressed compared with a narrow abdominal window.
- MRI: clipped to the 0.5–99.5th percentiles of the volume's non-zero voxels, then scaled to [0, 1].
- X-ray: clipped to the 0.5–99.5th percentiles of all pixels, then scaled (MONOCHROME1 was inverted on reading).
- Pathology: RGB divided by the dtype's full scale (255 for 8-bit).
A modality with another name is treated by its shape: a 3-D grey modality like MRI, a 2-D RGB one like pathology,
a 2-D grey one like X-ray.

Working grid (where samples are cut), chosen so that a patch covers a similar field of view in every file:
- CT and MRI volumes are resampled to 1.5 mm isotropic voxels when the file gives its spacing (area averaging
  when shrinking an axis, trilinear interpolation when stretching one); files without spacing keep their grid.
- Pathology images are shrunk so that one model input covers max(img_size, 64) pixels of the stored image
  (64 px ≈ 32 µm at 20×).
- X-ray images are shrunk so that their short side is 8 × img_size; training samples are random square crops of
  25–100 % of that side, resized to img_size.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from monai.transforms import Resize, ScaleIntensityRange

from invcoss_core.config import ModalitySpec
from invcoss_core.data.errors import ImageReadError
from invcoss_core.data.readers import MIN_AXIS_2D, RawImage

logger = logging.getLogger(__name__)

CT_WINDOW_HU: tuple[float, float] = (-1000.0, 1000.0)
INTENSITY_PERCENTILES: tuple[float, float] = (0.5, 99.5)
VOLUME_SPACING_MM = 1.5  # isotropic working spacing of CT and MRI volumes
PATHOLOGY_MIN_FIELD_PX = 64  # stored pixels one pathology input covers, at least
XRAY_SHORT_SIDE_PER_INPUT = 8  # working short side of a radiograph, in model inputs
PLAUSIBLE_SPACING_MM = (0.05, 20.0)  # header spacing outside this range is treated as unknown
MAX_WORKING_VOXELS = 1 << 26  # a resampled volume above this gets a coarser spacing (noted)
_PERCENTILE_SAMPLE = 2_000_000  # percentiles are estimated on at most this many values (strided, deterministic)

Kind = Literal["ct", "mri", "xray", "pathology"]


def modality_kind(modality: str, spec: ModalitySpec) -> Kind:
    """How a modality is preprocessed: by its name when known, else by its shape and channels."""
    if modality in ("ct", "mri", "xray", "pathology"):
        return modality  # type: ignore[return-value]
    if spec.spatial_dims == 3:
        return "mri"
    return "pathology" if spec.in_channels == 3 else "xray"


def foreground_threshold(kind: Kind) -> float:
    """Normalised value above which a voxel counts as foreground (CT: -500 HU, i.e. body, not air)."""
    if kind == "ct":
        return (-500.0 - CT_WINDOW_HU[0]) / (CT_WINDOW_HU[1] - CT_WINDOW_HU[0])
    return 0.05


def pad_value(kind: Kind) -> float:
    """Value used to pad an image smaller than the model input (white for pathology, black otherwise)."""
    return 1.0 if kind == "pathology" else 0.0


@dataclass(frozen=True)
class PreparedImage:
    """One image on its working grid, normalised to [0, 1]."""

    array: np.ndarray  # (C, *spatial) float32 in [0, 1]
    values: np.ndarray  # (*spatial) or (*spatial, 3): stored values on the working grid (CT: HU), for labels
    kind: Kind
    notes: tuple[str, ...] = ()


def validate_for_modality(raw: RawImage, modality: str, spec: ModalitySpec) -> RawImage:
    """Check that an image fits a modality's input (dimensions, channels); grey X-ray from RGB is converted.

    Raises:
        ImageReadError: for the wrong dimensionality, the wrong channel count or a too-small image.
    """
    shape = raw.spatial_shape
    if spec.spatial_dims == 3:
        if raw.rgb:
            raise ImageReadError(f"RGB image where modality '{modality}' needs grey-level 3-D volumes")
        if raw.spatial_dims != 3:
            raise ImageReadError(
                f"wrong dimensionality: {raw.spatial_dims}-D image {shape} where modality '{modality}' needs "
                "3-D volumes (put the files of one DICOM series in one folder)"
            )
        return raw
    if raw.spatial_dims != 2:
        raise ImageReadError(
            f"wrong dimensionality: {raw.spatial_dims}-D data {shape} where modality '{modality}' needs 2-D images"
        )
    if min(shape) < MIN_AXIS_2D:
        raise ImageReadError(f"image {shape} is too small (each side needs at least {MIN_AXIS_2D} pixels)")
    if spec.in_channels == 3 and not raw.rgb:
        raise ImageReadError(f"grey-level image where modality '{modality}' needs RGB")
    if spec.in_channels == 1 and raw.rgb:
        grey = raw.array @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return RawImage(
            grey, raw.spacing, False, raw.source_format, raw.source_dtype, (*raw.notes, "RGB converted to grey")
        )
    if spec.in_channels not in (1, 3):
        raise ImageReadError(f"modality '{modality}' needs {spec.in_channels} channels; only 1 and 3 are supported")
    return raw


def resample(array: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
    """Resample a channel-first (C, *spatial) float32 array to `out_shape` (2-D or 3-D).

    Axes that shrink are area-averaged (no aliasing); axes that grow are then linearly interpolated.
    """
    in_shape = tuple(array.shape[1:])
    out_shape = tuple(int(s) for s in out_shape)
    if in_shape == out_shape:
        return array.astype(np.float32, copy=False)
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    mid = tuple(min(i, o) for i, o in zip(in_shape, out_shape))
    if mid != in_shape:
        t = Resize(spatial_size=mid, mode="area")(t)
    if mid != out_shape:
        mode = "trilinear" if len(out_shape) == 3 else "bilinear"
        t = Resize(spatial_size=out_shape, mode=mode, align_corners=False)(t)
    return np.asarray(t, dtype=np.float32)


def working_shape(raw: RawImage, kind: Kind, spec: ModalitySpec) -> tuple[tuple[int, ...], list[str]]:
    """The working-grid shape of an image and notes on how it was chosen."""
    shape = raw.spatial_shape
    notes: list[str] = []
    if kind in ("ct", "mri") or spec.spatial_dims == 3:
        if raw.spacing is None or len(raw.spacing) != len(shape):
            notes.append("voxel spacing unknown: voxel grid used as stored")
            return shape, notes
        low, high = PLAUSIBLE_SPACING_MM
        if any(not low <= sp <= high for sp in raw.spacing):
            notes.append(f"implausible voxel spacing {raw.spacing} mm ignored: voxel grid used as stored")
            return shape, notes
        target = VOLUME_SPACING_MM
        out = tuple(max(1, round(s * sp / target)) for s, sp in zip(shape, raw.spacing))
        if math.prod(out) > MAX_WORKING_VOXELS:
            target *= (math.prod(out) / MAX_WORKING_VOXELS) ** (1 / 3)
            out = tuple(max(1, round(s * sp / target)) for s, sp in zip(shape, raw.spacing))
            notes.append(f"resampled to {target:.2f} mm (1.5 mm would exceed {MAX_WORKING_VOXELS} voxels)")
        return out, notes
    if kind == "pathology":
        field = max(max(spec.img_size), PATHOLOGY_MIN_FIELD_PX)
        factor = field / max(spec.img_size)
        return tuple(max(1, round(s / factor)) for s in shape), notes
    short = XRAY_SHORT_SIDE_PER_INPUT * min(spec.img_size)
    factor = max(1.0, min(shape) / short)
    return tuple(max(1, round(s / factor)) for s in shape), notes


def _robust_range(values: np.ndarray) -> tuple[float, float]:
    flat = values.ravel()
    if flat.size > _PERCENTILE_SAMPLE:
        flat = flat[:: flat.size // _PERCENTILE_SAMPLE]
    lo, hi = (float(v) for v in np.percentile(flat, INTENSITY_PERCENTILES))
    if hi <= lo:
        lo, hi = float(flat.min()), float(flat.max())
    return lo, hi


def normalise(values: np.ndarray, kind: Kind, source_dtype: str) -> tuple[np.ndarray, list[str]]:
    """Map stored values to [0, 1] by the modality's rule; returns (C, *spatial) and notes.

    Args:
        values: (*spatial) grey values or (*spatial, 3) RGB values on the working grid.
        kind: the modality kind.
        source_dtype: the stored dtype, which sets the full scale of RGB data.

    Raises:
        ImageReadError: when nothing is left to scale (no non-zero MRI voxel, no contrast).
    """
    notes: list[str] = []
    if kind == "pathology":
        scale = rgb_full_scale(values, source_dtype)
        rgb = np.clip(values / scale, 0.0, 1.0)
        return np.ascontiguousarray(np.moveaxis(rgb, -1, 0), dtype=np.float32), notes
    if kind == "ct":
        lo, hi = CT_WINDOW_HU
        if float(np.percentile(values.ravel()[:: max(1, values.size // _PERCENTILE_SAMPLE)], 1.0)) >= 0.0:
            notes.append("no negative values: CT data may not be in Hounsfield units (check RescaleIntercept)")
    elif kind == "mri":
        nonzero = values[values != 0]
        if nonzero.size < 2:
            raise ImageReadError("MRI volume has fewer than 2 non-zero voxels")
        lo, hi = _robust_range(nonzero)
    else:
        lo, hi = _robust_range(values)
    if hi <= lo:
        raise ImageReadError("no contrast left after percentile clipping")
    window = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32)
    return np.asarray(window(values[None].astype(np.float32, copy=False)), dtype=np.float32), notes


def rgb_full_scale(values: np.ndarray, source_dtype: str) -> float:
    """The stored value of full intensity: an integer dtype's maximum, else 1 or 255 by the values' range.

    Raises:
        ImageReadError: for floating-point values beyond 255.
    """
    if source_dtype.startswith("uint") or source_dtype.startswith("int"):
        bits = int("".join(ch for ch in source_dtype if ch.isdigit()) or 8)
        return float(2 ** min(bits, 16) - 1)
    peak = float(values.max())
    if peak <= 1.0:
        return 1.0
    if peak <= 255.0:
        return 255.0
    raise ImageReadError(f"floating-point RGB with values up to {peak:g}: expected [0, 1] or [0, 255]")


def prepare_image(raw: RawImage, modality: str, spec: ModalitySpec) -> PreparedImage:
    """Validate, resample to the working grid and normalise one image.

    Args:
        raw: values as read from the file.
        modality: the modality name (sets the intensity rule).
        spec: the model's input specification for this modality.

    Returns:
        The image on its working grid: ``array`` (C, *spatial) in [0, 1] and ``values`` (stored units).

    Raises:
        ImageReadError: when the image does not fit the modality or has no usable contrast.
    """
    raw = validate_for_modality(raw, modality, spec)
    kind = modality_kind(modality, spec)
    out_shape, notes = working_shape(raw, kind, spec)
    stored = np.moveaxis(raw.array, -1, 0) if raw.rgb else raw.array[None]
    grid = resample(stored, out_shape)
    values = np.moveaxis(grid, 0, -1) if raw.rgb else grid[0]
    array, more = normalise(values, kind, raw.source_dtype)
    return PreparedImage(array, values, kind, (*raw.notes, *notes, *more))
