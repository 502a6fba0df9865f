"""Sample source pyradiomics: lung CT and brain/breast MR cases with tumour masks (brain2 as a DICOM series)."""

from __future__ import annotations

import numpy as np

from invcoss_core.data.errors import SampleFetchError
from invcoss_core.data.samples.layout import Archive, Layout
from invcoss_core.data.samples.pins import PackagePin
from invcoss_core.data.samples.volumes import nifti_bytes, nrrd_affine, nrrd_from_bytes, write_checked_dicom_series


def extract_pyradiomics(archive: Archive, layout: Layout, pin: PackagePin) -> None:
    prefix = "pyradiomics-3.0.1/data/"
    cases = (
        ("lung1", "ct", "ct_tumour"),
        ("lung2", "ct", "ct_tumour"),
        ("brain1", "mri", "mri_tumour"),
        ("brain2", "mri", "mri_tumour"),
        ("breast1", "mri", "mri_tumour"),
    )
    for case, modality, task in cases:
        image, header = nrrd_from_bytes(archive.read(f"{prefix}{case}_image.nrrd"))
        label, _ = nrrd_from_bytes(archive.read(f"{prefix}{case}_label.nrrd"))
        if image.shape != label.shape:
            raise SampleFetchError(f"pyradiomics {case}: image {image.shape} and label {label.shape} differ")
        affine = nrrd_affine(header)
        mask = (label > 0).astype(np.uint8)
        if case == "brain2":  # real MR as a DICOM series, so that the series reader runs on real data
            rel = f"{modality}/{case}"
            folder = layout.root / rel
            write_checked_dicom_series(image, header, affine, folder, case, "pyradiomics brain2 T1 post-contrast")
        else:
            rel = f"{modality}/{case}.nii.gz"
            layout.write(rel, nifti_bytes(image.astype(np.int16), affine))
        layout.add_image(modality, rel, case, pin)
        mask_rel = f"labels/tumour/{case}_mask.nii.gz"
        layout.write(mask_rel, nifti_bytes(np.ascontiguousarray(mask), affine))
        layout.add_task_item(task, {"image": rel, "subject": case, "mask": mask_rel})
        if modality == "ct":
            layout.add_task_item("ct_hu_tissue", {"image": rel, "subject": case})
