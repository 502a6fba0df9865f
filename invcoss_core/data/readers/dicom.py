"""The DICOM readers: one file (single or multi-frame) and a series of single-frame slices, with pydicom."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from invcoss_core.data.errors import ImageReadError
from invcoss_core.data.readers.base import (
    FORMAT_DICOM,
    FORMAT_DICOM_SERIES,
    RawImage,
    check_shape,
    finite_nonconstant,
    scalar_image,
    valid_spacing,
    with_note,
)
from invcoss_core.data.readers.orientation import NO_ORIENTATION, to_ras

# DICOM objects that carry no image to learn from even when they hold pixel data.
_NON_IMAGE_DICOM_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "KO", "PR", "REG"})


def _dicom_check_header(ds: Any) -> None:
    modality = str(ds.get("Modality", "")).upper()
    if modality in _NON_IMAGE_DICOM_MODALITIES:
        raise ImageReadError(f"DICOM {modality} object, not an image")
    if "Rows" not in ds or "Columns" not in ds:
        sop = ds.get("SOPClassUID")
        name = getattr(sop, "name", str(sop)) if sop is not None else "unknown SOP class"
        raise ImageReadError(f"DICOM object without an image ({name})")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    check_shape((frames, int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1) or 1)))


def _dicom_pixels(ds: Any) -> np.ndarray:
    """Pixel array with the modality LUT applied; decoding failures become a reject naming the syntax."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError("DICOM file has no pixel data")
    try:
        arr = np.asarray(ds.pixel_array)
    except (NotImplementedError, RuntimeError) as err:
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
        name = getattr(syntax, "name", str(syntax))
        raise ImageReadError(f"cannot decode DICOM pixel data ({name}): {err}") from None
    slope, intercept = _dicom_rescale(ds)
    out = arr.astype(np.float32)
    if slope != 1.0 or intercept != 0.0:
        out = out * np.float32(slope) + np.float32(intercept)
    return out


def _dicom_rescale(ds: Any) -> tuple[float, float]:
    def from_item(item: Any) -> tuple[float, float] | None:
        if "RescaleSlope" in item or "RescaleIntercept" in item:
            return float(item.get("RescaleSlope", 1.0) or 1.0), float(item.get("RescaleIntercept", 0.0) or 0.0)
        return None

    direct = from_item(ds)
    if direct is not None:
        return direct
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(groups)
        if seq:
            transform = seq[0].get("PixelValueTransformationSequence")
            if transform:
                found = from_item(transform[0])
                if found is not None:
                    return found
    return 1.0, 0.0


def _dicom_spacing(ds: Any) -> tuple[tuple[float, float] | None, float | None]:
    """(row spacing, column spacing) and slice spacing in mm where the header gives them."""
    pixel: Any = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    thickness: Any = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and (pixel is None or thickness is None):
        measures = shared[0].get("PixelMeasuresSequence")
        if measures:
            pixel = pixel or measures[0].get("PixelSpacing")
            thickness = thickness or measures[0].get("SpacingBetweenSlices") or measures[0].get("SliceThickness")
    pair: tuple[float, float] | None = None
    if pixel is not None and len(pixel) == 2:
        valid = valid_spacing([float(pixel[0]), float(pixel[1])])
        pair = (valid[0], valid[1]) if valid else None
    slice_mm = valid_spacing([float(thickness)]) if thickness is not None else None
    return pair, (slice_mm[0] if slice_mm else None)


def _dicom_dtype(ds: Any) -> str:
    bits = int(ds.get("BitsAllocated", 16) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    return f"{'int' if signed else 'uint'}{bits}"


def _monochrome1(ds: Any) -> bool:
    return str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"


def read_dicom_file(path: Path) -> RawImage:
    """Read one DICOM file: a single frame is a 2-D image, a multi-frame file a volume.

    MONOCHROME1 images are inverted so that high values are bright, as in MONOCHROME2.

    Raises:
        ImageReadError: for a non-DICOM, non-image, undecodable, oversized or non-finite file.
    """
    import pydicom

    ds = pydicom.dcmread(str(path))
    _dicom_check_header(ds)
    arr = _dicom_pixels(ds)
    rgb = int(ds.get("SamplesPerPixel", 1) or 1) > 1
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    pixel, slice_mm = _dicom_spacing(ds)
    notes: list[str] = []
    if rgb:
        if frames > 1 or arr.ndim != 3:
            raise ImageReadError(f"multi-frame colour DICOM of shape {arr.shape} is not supported")
        return RawImage(finite_nonconstant(arr[..., :3]), pixel, True, FORMAT_DICOM, _dicom_dtype(ds))
    if _monochrome1(ds):
        arr = arr.max() + arr.min() - arr
        notes.append("MONOCHROME1 inverted")
    if frames > 1 and arr.ndim == 3:
        volume = np.ascontiguousarray(np.transpose(arr, (2, 1, 0)))  # (frames, rows, cols) -> (cols, rows, frames)
        spacing = (pixel[1], pixel[0], slice_mm) if pixel is not None and slice_mm is not None else None
        raw = scalar_image(volume, spacing, FORMAT_DICOM, _dicom_dtype(ds))
        if raw.spatial_dims == 3:
            notes.append(NO_ORIENTATION.format(why="multi-frame DICOM orientation is not read"))
    else:
        raw = scalar_image(arr, pixel, FORMAT_DICOM, _dicom_dtype(ds))
    return replace(raw, notes=tuple(notes))


def read_dicom_series(paths: Sequence[Path]) -> RawImage:
    """Stack the single-frame DICOM files of one series into a (columns, rows, slices) volume.

    Slices are ordered by their position along the slice normal (ImagePositionPatient ·
    (row × column direction)), else by InstanceNumber.

    Raises:
        ImageReadError: when any slice is unreadable (naming it) or the slices do not form one volume.
    """
    import pydicom

    slices: list[tuple[float, np.ndarray]] = []
    first: Any = None
    for index, path in enumerate(paths):
        try:
            ds = pydicom.dcmread(str(path))
            _dicom_check_header(ds)
            pixels = _dicom_pixels(ds)
        except ImageReadError as err:
            raise ImageReadError(f"slice {path.name}: {err.reason}") from None
        except Exception as err:
            raise ImageReadError(f"slice {path.name}: {type(err).__name__}: {err}") from None
        if pixels.ndim != 2:
            raise ImageReadError(f"slice {path.name} is not a single grey-level frame (shape {pixels.shape})")
        if _monochrome1(ds):
            pixels = pixels.max() + pixels.min() - pixels
        if first is None:
            first = ds
        elif pixels.shape != slices[0][1].shape:
            raise ImageReadError(f"slice {path.name} has shape {pixels.shape}, the series {slices[0][1].shape}")
        slices.append((_slice_position(ds, index), pixels))
    if len(slices) < 2:
        raise ImageReadError("a DICOM series needs at least 2 slices")
    slices.sort(key=lambda item: item[0])
    positions = np.array([p for p, _ in slices])
    steps = np.diff(positions)
    if np.any(np.abs(steps) < 1e-6):
        raise ImageReadError("two slices share one position: more than one acquisition in this series")
    check_shape((len(slices), *slices[0][1].shape))
    volume = np.stack([np.ascontiguousarray(s.T) for _, s in slices], axis=-1)  # (cols, rows, slices)
    pixel, slice_mm = _dicom_spacing(first)
    has_positions = "ImagePositionPatient" in first
    step = float(np.median(np.abs(steps))) if has_positions else slice_mm
    spacing: tuple[float, ...] | None = (pixel[1], pixel[0], step) if pixel is not None and step else None
    volume, spacing, note = to_ras(volume, spacing, *_dicom_series_affine(first, has_positions))
    return with_note(scalar_image(volume, spacing, FORMAT_DICOM_SERIES, _dicom_dtype(first)), note)


def _dicom_series_affine(first: Any, has_positions: bool) -> tuple[np.ndarray | None, str]:
    """Voxel → RAS direction matrix of a (columns, rows, slices) volume sorted along the slice normal.

    Only directions matter for the reorientation, so unit steps stand in for the spacing.
    """
    axes = _dicom_axes(first)
    if not has_positions or axes is None:
        return None, "no ImagePositionPatient / ImageOrientationPatient"
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ np.stack(axes, axis=1)  # LPS → RAS
    return affine, ""


def _dicom_axes(ds: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(row, column, normal) LPS directions from ImageOrientationPatient: the directions of increasing column
    index, increasing row index, and the slice normal; None when the tag is missing or malformed."""
    orientation = ds.get("ImageOrientationPatient")
    if orientation is None or len(orientation) != 6:
        return None
    row = np.array([float(v) for v in orientation[:3]])
    col = np.array([float(v) for v in orientation[3:]])
    return row, col, np.cross(row, col)


def _slice_position(ds: Any, fallback: int) -> float:
    position = ds.get("ImagePositionPatient")
    if position is not None and len(position) == 3:
        axes = _dicom_axes(ds)
        normal = axes[2] if axes is not None else np.array([0.0, 0.0, 1.0])
        return float(np.dot(np.array([float(v) for v in position]), normal))
    number = ds.get("InstanceNumber")
    return float(number) if number is not None else float(fallback)
