"""Image file readers: NIfTI, NRRD, DICOM (single file, multi-frame, series), PNG/JPEG and TIFF/SVS.

Every reader returns a :class:`RawImage` or raises :class:`ImageReadError` with a reason that an operator can act
on. Sizes are checked from the header before any pixel data is loaded, so a file that claims absurd dimensions
is refused without allocating memory. Malformed files make third-party parsers raise almost any exception type
(struct.error, IndexError, zlib.error, ...); :func:`read_source` turns all of them into a reject.

Axis conventions of ``RawImage.array`` (float32):
- 2-D grey: (H, W) — rows first, as PNG/TIFF/DICOM store them;
- 2-D RGB: (H, W, 3);
- 3-D volume: (X, Y, Z) in the closest RAS+ orientation (axis 0 runs from the patient's left to right,
  axis 1 posterior to anterior, axis 2 inferior to superior), whatever the file stored: NIfTI, NRRD and DICOM-series
  volumes are permuted and flipped by their voxel-to-patient affine (no resampling), so that the same anatomy reads
  the same from every site and every format. A volume whose file gives no usable orientation (no affine, an NRRD
  without a known 'space', a multi-frame DICOM) keeps its stored index order and says so in a note.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from invcoss_core.data.errors import ImageReadError

logger = logging.getLogger(__name__)

MAX_FILE_BYTES = 8 << 30  # larger files are refused before opening them
MAX_ELEMENTS = 1 << 28  # values per image (268 M, 1 GiB as float32); a bigger header is an absurd size
MAX_AXIS = 1 << 16  # voxels along any one axis
MIN_AXIS_2D = 8  # pixels along each axis of a 2-D image

# DICOM objects that carry no image to learn from even when they hold pixel data.
_NON_IMAGE_DICOM_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "KO", "PR", "REG"})

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


def _finite_nonconstant(arr: np.ndarray) -> np.ndarray:
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


def _squeeze(arr: np.ndarray, spacing: tuple[float, ...] | None) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """Drop singleton axes (a (X, Y, Z, 1) NIfTI is a volume, a (X, Y, 1) one is a slice)."""
    keep = [i for i, s in enumerate(arr.shape) if s != 1]
    squeezed = arr.reshape([arr.shape[i] for i in keep])
    if spacing is not None:
        spacing = tuple(spacing[i] for i in keep if i < len(spacing))
        if len(spacing) != squeezed.ndim:
            spacing = None
    return squeezed, spacing


def _scalar_image(arr: np.ndarray, spacing: tuple[float, ...] | None, fmt: str, dtype: str) -> RawImage:
    arr, spacing = _squeeze(arr, spacing)
    if arr.ndim < 2:
        raise ImageReadError(f"{arr.ndim}-D data of shape {arr.shape}: not an image")
    if arr.ndim > 3:
        raise ImageReadError(
            f"{arr.ndim}-D data of shape {arr.shape}: store one 2-D image or 3-D volume per file "
            "(split time series and multi-channel volumes)"
        )
    return RawImage(_finite_nonconstant(arr), _valid_spacing(spacing), False, fmt, dtype)


def _valid_spacing(spacing: Sequence[float] | None) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    values = tuple(float(s) for s in spacing)
    if not values or any(not math.isfinite(s) or s <= 0 for s in values):
        return None
    return values


_NO_ORIENTATION = "orientation unknown ({why}): stored voxel order kept"


def _to_ras(
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
        return arr, spacing, _NO_ORIENTATION.format(why=why_unknown)
    affine = np.asarray(affine, dtype=float)
    if not np.all(np.isfinite(affine[:3, :3])) or abs(float(np.linalg.det(affine[:3, :3]))) < 1e-12:
        return arr, spacing, _NO_ORIENTATION.format(why="degenerate affine")
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


def _with_note(raw: RawImage, note: str | None) -> RawImage:
    return raw.with_note(note) if note else raw


# --------------------------------------------------------------------------------------------------- NIfTI
def read_nifti(path: Path) -> RawImage:
    """Read a .nii / .nii.gz file with nibabel (scale slope/intercept applied).

    Raises:
        ImageReadError: for an unreadable, truncated, oversized, non-finite or non-scalar file.
    """
    import nibabel as nib

    img: Any = nib.load(str(path))
    shape = tuple(int(s) for s in img.shape)
    check_shape(shape)
    dtype = img.get_data_dtype()
    if dtype.fields is not None:
        raise ImageReadError(f"NIfTI with structured voxels ({dtype}) such as RGB24 is not supported")
    arr = np.asarray(img.get_fdata(dtype=np.float32))
    zooms: tuple[float, ...] | None = tuple(float(z) for z in img.header.get_zooms()[: len(shape)])
    arr, zooms, note = _to_ras(arr, zooms, img.affine)
    return _with_note(_scalar_image(arr, zooms, FORMAT_NIFTI, str(dtype)), note)


# ---------------------------------------------------------------------------------------------------- NRRD
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
    arr, spacing, note = _to_ras(np.asarray(data), spacing, affine, why)
    raw = _with_note(_scalar_image(arr, spacing, FORMAT_NRRD, str(data.dtype)), note)
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


# --------------------------------------------------------------------------------------------------- DICOM
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
        valid = _valid_spacing([float(pixel[0]), float(pixel[1])])
        pair = (valid[0], valid[1]) if valid else None
    slice_mm = _valid_spacing([float(thickness)]) if thickness is not None else None
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
        return RawImage(_finite_nonconstant(arr[..., :3]), pixel, True, FORMAT_DICOM, _dicom_dtype(ds))
    if _monochrome1(ds):
        arr = arr.max() + arr.min() - arr
        notes.append("MONOCHROME1 inverted")
    if frames > 1 and arr.ndim == 3:
        volume = np.ascontiguousarray(np.transpose(arr, (2, 1, 0)))  # (frames, rows, cols) -> (cols, rows, frames)
        spacing = (pixel[1], pixel[0], slice_mm) if pixel is not None and slice_mm is not None else None
        raw = _scalar_image(volume, spacing, FORMAT_DICOM, _dicom_dtype(ds))
        if raw.spatial_dims == 3:
            notes.append(_NO_ORIENTATION.format(why="multi-frame DICOM orientation is not read"))
    else:
        raw = _scalar_image(arr, pixel, FORMAT_DICOM, _dicom_dtype(ds))
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
    volume, spacing, note = _to_ras(volume, spacing, *_dicom_series_affine(first, has_positions))
    return _with_note(_scalar_image(volume, spacing, FORMAT_DICOM_SERIES, _dicom_dtype(first)), note)


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


# ------------------------------------------------------------------------------------------------ PNG/JPEG
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
        return RawImage(_finite_nonconstant(arr), None, True, FORMAT_PIL, str(arr.dtype))
    if arr.ndim != 2:
        raise ImageReadError(f"expected a grey-level image, got shape {arr.shape}")
    return RawImage(_finite_nonconstant(arr), None, False, FORMAT_PIL, dtype)


# ------------------------------------------------------------------------------------------------ TIFF/SVS
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
        return RawImage(_finite_nonconstant(arr), None, False, FORMAT_TIFF, str(arr.dtype))
    if axes in ("YXS", "SYX", "CYX", "YXC") and (3 in arr.shape):
        channel_axis = axes.index("S") if "S" in axes else axes.index("C")
        colour = np.moveaxis(arr, channel_axis, -1)
        if colour.shape[-1] not in (3, 4):
            raise ImageReadError(f"unsupported TIFF layout: axes {axes}, shape {arr.shape}")
        return RawImage(_finite_nonconstant(colour[..., :3]), None, True, FORMAT_TIFF, str(arr.dtype))
    if len(axes) == 3 and "S" not in axes:
        volume = np.ascontiguousarray(np.transpose(arr, (2, 1, 0)))  # (Z, Y, X) -> (X, Y, Z)
        return RawImage(_finite_nonconstant(volume), None, False, FORMAT_TIFF, str(arr.dtype))
    raise ImageReadError(f"unsupported TIFF layout: axes {axes}, shape {arr.shape}")


_READERS = {
    FORMAT_NIFTI: read_nifti,
    FORMAT_NRRD: read_nrrd,
    FORMAT_DICOM: read_dicom_file,
    FORMAT_PIL: read_pil,
    FORMAT_TIFF: read_tiff,
}


@contextmanager
def parser_errors_as_rejects(source_format: str) -> Iterator[None]:
    """Turn whatever a parser raises on a malformed file into one ImageReadError naming `source_format`."""
    try:
        with warnings.catch_warnings():
            # Parsers warn about every oddity of a malformed header; the reject reason is what matters.
            warnings.simplefilter("ignore")
            yield
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageReadError("not enough memory to load this image") from None
    except PermissionError:
        raise ImageReadError("permission denied") from None
    except (EOFError, OSError) as err:
        raise ImageReadError(f"cannot read {source_format} file (truncated or corrupt?): {err}") from None
    except Exception as err:  # malformed files make parsers raise arbitrary types; each is one reject
        message = str(err).splitlines()[0] if str(err) else ""
        raise ImageReadError(f"cannot read as {source_format}: {type(err).__name__}: {message}"[:300]) from None


def read_image(paths: Sequence[Path], source_format: str) -> RawImage:
    """Read one image with the reader for `source_format`, turning every parser failure into a reject.

    Args:
        paths: one file, or the slice files of a DICOM series.
        source_format: one of the FORMAT_* names (see discovery.sniff_format).

    Returns:
        The image's values (float32, finite, not constant).

    Raises:
        ImageReadError: with a reason naming what is wrong.
    """
    with parser_errors_as_rejects(source_format):
        if source_format == FORMAT_DICOM_SERIES:
            return read_dicom_series(paths)
        if len(paths) != 1:
            raise ImageReadError(f"{source_format} images are single files, got {len(paths)}")
        reader = _READERS.get(source_format)
        if reader is None:
            raise ImageReadError(f"no reader for format {source_format!r}")
        return reader(paths[0])
