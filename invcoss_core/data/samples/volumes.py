"""Writing volumes: NRRD read from bytes, NIfTI bytes, and a DICOM series that must read back as the RAS view."""

from __future__ import annotations

import gzip
import io
from pathlib import Path
from typing import Any

import numpy as np

from invcoss_core.data.errors import SampleFetchError


def nrrd_from_bytes(data: bytes) -> tuple[np.ndarray, dict[str, Any]]:
    import nrrd

    fh = io.BytesIO(data)
    header = nrrd.read_header(fh)
    array = nrrd.read_data(header, fh, index_order="F")
    return np.asarray(array), header


def nrrd_affine(header: dict[str, Any]) -> np.ndarray:
    """NIfTI (RAS) affine of an LPS NRRD: columns are the axis vectors, LPS → RAS flips x and y."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(header["space directions"], dtype=float).T
    affine[:3, 3] = np.asarray(header["space origin"], dtype=float)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    import nibabel as nib

    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def write_dicom_series(
    volume: np.ndarray, header: dict[str, Any], folder: Path, patient: str, description: str
) -> None:
    """Write an int16 (x, y, z) LPS volume as one single-frame MR DICOM file per slice (deterministic UIDs)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    directions = np.asarray(header["space directions"], dtype=float)
    origin = np.asarray(header["space origin"], dtype=float)
    spacing = np.linalg.norm(directions, axis=1)
    row_dir = directions[0] / spacing[0]  # along a row = increasing column index = x
    col_dir = directions[1] / spacing[1]
    study = generate_uid(entropy_srcs=[patient, "study"])
    series = generate_uid(entropy_srcs=[patient, "series"])
    frame = generate_uid(entropy_srcs=[patient, "frame"])
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(volume.shape[2]):
        sop = generate_uid(entropy_srcs=[patient, "slice", str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        ds.Modality = "MR"
        ds.PatientID = patient
        ds.PatientName = "Anonymous"
        ds.SeriesDescription = description
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + k * directions[2]]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # row spacing, column spacing
        ds.SliceThickness = f"{spacing[2]:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = int(volume.shape[1])
        ds.Columns = int(volume.shape[0])
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = "1"
        ds.RescaleIntercept = "0"
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T.astype("<i2")).tobytes()
        ds.save_as(folder / f"slice_{k:03d}.dcm", enforce_file_format=True)


def write_checked_dicom_series(
    image: np.ndarray, header: dict[str, Any], affine: np.ndarray, folder: Path, patient: str, description: str
) -> None:
    """Write `image` as a DICOM series and check that it reads back as the RAS view of the source volume.

    The reader returns a series in RAS order; a label map stored as NIfTI with the same `affine` is read in RAS
    order too, so the two line up voxel for voxel exactly when this check holds.

    Raises:
        SampleFetchError: when the series reads back with another shape or orientation (its masks would not line up).
    """
    from invcoss_core.data.readers import read_dicom_series, to_ras

    stored = image.astype(np.int16)
    write_dicom_series(stored, header, folder, patient, description)
    back = read_dicom_series(sorted(folder.iterdir())).array
    ras = to_ras(stored.astype(np.float32), None, affine)[0]
    if not np.array_equal(back, ras):
        raise SampleFetchError(
            f"{patient}: the DICOM series written to {folder} does not read back as the RAS view of the source "
            f"volume (read {back.shape}, expected {ras.shape} with the same voxels); its label map would not line up"
        )
