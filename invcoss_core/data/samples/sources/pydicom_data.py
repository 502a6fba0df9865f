"""Sample source pydicom-data: two X-ray radiographs and one small MR image, as DICOM files."""

from __future__ import annotations

from pathlib import Path

from invcoss_core.data.samples.layout import Archive, Layout
from invcoss_core.data.samples.pins import PackagePin


def extract_pydicom_data(archive: Archive, layout: Layout, pin: PackagePin) -> None:
    prefix = "data_store/data/"
    for member, rel, modality in (
        ("RG1_UNCR.dcm", "xray/rg1_chest.dcm", "xray"),
        ("RG3_UNCR.dcm", "xray/rg3_extremity.dcm", "xray"),
        ("emri_small.dcm", "mri/emri_small.dcm", "mri"),
    ):
        path = layout.write(rel, archive.read(prefix + member))
        layout.add_image(modality, rel, _dicom_subject(path, Path(rel).stem), pin)


def _dicom_subject(path: Path, fallback: str) -> str:
    import pydicom

    patient = str(pydicom.dcmread(str(path), stop_before_pixels=True).get("PatientID", "") or "").strip()
    return patient or fallback
