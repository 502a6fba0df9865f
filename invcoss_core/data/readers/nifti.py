"""The NIfTI reader (.nii, .nii.gz) with nibabel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from invcoss_core.data.errors import ImageReadError
from invcoss_core.data.readers.base import FORMAT_NIFTI, RawImage, check_shape, scalar_image, with_note
from invcoss_core.data.readers.orientation import to_ras


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
    arr, zooms, note = to_ras(arr, zooms, img.affine)
    return with_note(scalar_image(arr, zooms, FORMAT_NIFTI, str(dtype)), note)
