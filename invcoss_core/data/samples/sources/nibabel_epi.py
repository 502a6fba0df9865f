"""Sample source nibabel: the first volume of its example EPI time series."""

from __future__ import annotations

import gzip
from typing import Any

import numpy as np

from invcoss_core.data.samples.layout import Archive, Layout
from invcoss_core.data.samples.pins import PackagePin
from invcoss_core.data.samples.volumes import nifti_bytes


def extract_nibabel(archive: Archive, layout: Layout, pin: PackagePin) -> None:
    import nibabel as nib

    raw = gzip.decompress(archive.read("nibabel/tests/data/example4d.nii.gz"))
    image: Any = nib.Nifti1Image.from_bytes(raw)
    first = np.asarray(image.dataobj[..., 0])  # EPI time series: the first volume
    rel = "mri/epi_example4d.nii.gz"
    layout.write(rel, nifti_bytes(first.astype(np.int16), image.affine))
    layout.add_image("mri", rel, "epi_example4d", pin)
