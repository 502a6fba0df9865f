"""Image file readers: NIfTI, NRRD, DICOM (single file, multi-frame, series), PNG/JPEG and TIFF/SVS.

Every reader returns a :class:`RawImage` or raises :class:`ImageReadError` with a reason that an operator can act
on. Sizes are checked from the header before any pixel data is loaded, so a file that claims absurd dimensions
is refused without allocating memory. Malformed files make third-party parsers raise almost any exception type
(struct.error, IndexError, zlib.error, ...); :func:`read_image` turns all of them into a reject.

Axis conventions of ``RawImage.array`` (float32):
- 2-D grey: (H, W) — rows first, as PNG/TIFF/DICOM store them;
- 2-D RGB: (H, W, 3);
- 3-D volume: (X, Y, Z) in the closest RAS+ orientation (axis 0 runs from the patient's left to right,
  axis 1 posterior to anterior, axis 2 inferior to superior), whatever the file stored: NIfTI, NRRD and DICOM-series
  volumes are permuted and flipped by their voxel-to-patient affine (no resampling), so that the same anatomy reads
  the same from every site and every format. A volume whose file gives no usable orientation (no affine, an NRRD
  without a known 'space', a multi-frame DICOM) keeps its stored index order and says so in a note.

One reader per format (`nifti`, `nrrd`, `dicom`, `pil`, `tiff`) behind `read_image` (`dispatch`); `base` holds the
shared record and limits, `orientation` the RAS reorientation.
"""

from invcoss_core.data.readers.base import (
    FORMAT_DICOM,
    FORMAT_DICOM_SERIES,
    FORMAT_NIFTI,
    FORMAT_NRRD,
    FORMAT_PIL,
    FORMAT_TIFF,
    MAX_AXIS,
    MAX_ELEMENTS,
    MAX_FILE_BYTES,
    MIN_AXIS_2D,
    RawImage,
    check_shape,
)
from invcoss_core.data.readers.dicom import read_dicom_file, read_dicom_series
from invcoss_core.data.readers.dispatch import parser_errors_as_rejects, read_image
from invcoss_core.data.readers.nifti import read_nifti
from invcoss_core.data.readers.nrrd import read_nrrd
from invcoss_core.data.readers.orientation import to_ras
from invcoss_core.data.readers.pil import read_pil
from invcoss_core.data.readers.tiff import read_tiff, tiff_layout

__all__ = [
    "FORMAT_DICOM",
    "FORMAT_DICOM_SERIES",
    "FORMAT_NIFTI",
    "FORMAT_NRRD",
    "FORMAT_PIL",
    "FORMAT_TIFF",
    "MAX_AXIS",
    "MAX_ELEMENTS",
    "MAX_FILE_BYTES",
    "MIN_AXIS_2D",
    "RawImage",
    "check_shape",
    "parser_errors_as_rejects",
    "read_dicom_file",
    "read_dicom_series",
    "read_image",
    "read_nifti",
    "read_nrrd",
    "read_pil",
    "read_tiff",
    "tiff_layout",
    "to_ras",
]
