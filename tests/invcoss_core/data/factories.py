"""Small image files for the data tests: writers for every supported format and synthetic anatomy."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import tifffile
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def write_nifti(path: Path, array: np.ndarray, zooms: tuple[float, ...] | None = None) -> Path:
    """A NIfTI file (.nii or .nii.gz by the name) with the given voxel sizes."""
    affine = np.diag([*(zooms or (1.0,) * 3)[:3], 1.0]) if array.ndim >= 3 else np.eye(4)
    image = nib.Nifti1Image(array, affine)
    if zooms is not None:
        image.header.set_zooms(zooms[: array.ndim])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def write_nrrd(path: Path, array: np.ndarray, spacing: tuple[float, ...] | None = None, encoding: str = "gzip") -> Path:
    """An NRRD file in (x, y[, z]) index order with 'space directions' from `spacing`."""
    header: dict[str, object] = {"encoding": encoding}
    if spacing is not None:
        header["space"] = "left-posterior-superior" if array.ndim == 3 else None
        if array.ndim == 3:
            header["space directions"] = np.diag(spacing)
            header["space origin"] = np.zeros(3)
        else:
            del header["space"]
            header["spacings"] = list(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrrd.write(str(path), array, header, index_order="F")
    return path


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = 0.0,
    photometric: str | None = None,
    patient_id: str = "P1",
    series_uid: str | None = None,
    position: tuple[float, float, float] | None = None,
    pixel_spacing: tuple[float, float] | None = (0.5, 0.5),
    slice_thickness: float | None = 2.0,
    instance: int = 1,
) -> Path:
    """A DICOM file: (rows, cols) single frame, (frames, rows, cols) multi-frame, or (rows, cols, 3) RGB."""
    rgb = pixels.ndim == 3 and pixels.shape[-1] == 3 and pixels.dtype == np.uint8
    frames = pixels.shape[0] if pixels.ndim == 3 and not rgb else 1
    rows, cols = (pixels.shape[0], pixels.shape[1]) if rgb or pixels.ndim == 2 else pixels.shape[1:]
    meta = FileMetaDataset()
    sop_class = SecondaryCaptureImageStorage if rgb else CTImageStorage
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.InstanceNumber = instance
    ds.Rows, ds.Columns = int(rows), int(cols)
    if frames > 1:
        ds.NumberOfFrames = frames
    if pixel_spacing is not None:
        ds.PixelSpacing = list(pixel_spacing)
    if slice_thickness is not None:
        ds.SliceThickness = slice_thickness
    if position is not None:
        ds.ImagePositionPatient = list(position)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    if rgb:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric or "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.PixelData = np.ascontiguousarray(pixels.astype("<i2")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def write_dicom_series(
    folder: Path,
    volume: np.ndarray,
    *,
    patient_id: str = "S1",
    shuffle_names: bool = True,
    spacing: tuple[float, float, float] = (0.5, 0.5, 2.0),
) -> list[Path]:
    """One file per slice of an (x, y, z) int16 volume; file names deliberately not in slice order."""
    uid = generate_uid()
    paths = []
    order = list(range(volume.shape[2]))
    names = list(reversed(order)) if shuffle_names else order
    for k in order:
        path = folder / f"img{names[k]:03d}.dcm"
        write_dicom(
            path,
            volume[:, :, k].T,
            patient_id=patient_id,
            series_uid=uid,
            position=(0.0, 0.0, k * spacing[2]),
            pixel_spacing=(spacing[1], spacing[0]),
            slice_thickness=spacing[2],
            instance=names[k] + 1,
        )
        paths.append(path)
    return paths


def write_png(path: Path, array: np.ndarray) -> Path:
    """A PNG from (H, W) uint8/uint16 or (H, W, 3|4) uint8."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_tiff(path: Path, array: np.ndarray, photometric: str | None = None) -> Path:
    """A TIFF via tifffile (RGB when the last axis is 3)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(str(path), array, photometric=photometric)
    return path


def ct_phantom(shape: tuple[int, int, int] = (40, 40, 24), seed: int = 0) -> np.ndarray:
    """int16 HU volume: air outside, a soft-tissue body with fat rim, two lungs, a bone rod, a 'tumour'."""
    rng = np.random.default_rng(seed)
    x, y, _ = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    hu = np.full(shape, -1000.0)
    body = x**2 / 0.8 + y**2 / 0.6 < 1
    hu[body] = -100.0
    hu[x**2 / 0.6 + y**2 / 0.45 < 1] = 40.0
    hu[((x - 0.35) ** 2 + y**2) < 0.06] = -800.0
    hu[((x + 0.35) ** 2 + y**2) < 0.06] = -800.0
    hu[(x**2 + (y + 0.45) ** 2) < 0.01] = 700.0
    hu += rng.normal(0, 10, shape)
    return hu.astype(np.int16)


def mri_phantom(shape: tuple[int, int, int] = (32, 32, 24), seed: int = 0) -> np.ndarray:
    """float32 volume: zero background, a bright 'head' sphere with a darker core and noise."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r2 = x**2 + y**2 + z**2
    vol = np.where(r2 < 0.8, 600.0, 0.0) + np.where(r2 < 0.3, -250.0, 0.0)
    vol[r2 < 0.8] += rng.normal(0, 20, int(np.sum(r2 < 0.8)))
    return vol.astype(np.float32)


def he_tile(size: tuple[int, int] = (160, 160), seed: int = 0) -> np.ndarray:
    """uint8 RGB H&E-like tile: pink stroma, purple nuclei, some white background."""
    rng = np.random.default_rng(seed)
    h, w = size
    tile = np.empty((h, w, 3), dtype=np.float32)
    tile[:] = (230, 160, 200)
    for _ in range(h * w // 150):
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        tile[max(0, cy - 2) : cy + 3, max(0, cx - 2) : cx + 3] = (90, 60, 150)
    tile[:, : w // 5] = 245
    tile += rng.normal(0, 6, tile.shape)
    return np.clip(tile, 0, 255).astype(np.uint8)


def xray_image(size: tuple[int, int] = (120, 100), seed: int = 0) -> np.ndarray:
    """uint16 grey radiograph-like image."""
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.linspace(-1, 1, size[0]), np.linspace(-1, 1, size[1]), indexing="ij")
    img = 2000 + 1500 * np.exp(-(x**2) * 4) + 800 * (np.abs(np.sin(y * 12)) > 0.9) + rng.normal(0, 30, size)
    return np.clip(img, 0, 65535).astype(np.uint16)
