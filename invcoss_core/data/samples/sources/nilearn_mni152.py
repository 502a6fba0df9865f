"""Sample source nilearn: the MNI152 T1 template with its grey- and white-matter maps."""

from __future__ import annotations

from invcoss_core.data.samples.layout import Archive, Layout
from invcoss_core.data.samples.pins import PackagePin


def extract_nilearn(archive: Archive, layout: Layout, pin: PackagePin) -> None:
    prefix = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
    layout.write("mri/mni152_t1.nii.gz", archive.read(prefix.format("t1")))
    layout.add_image("mri", "mri/mni152_t1.nii.gz", "mni152", pin)
    maps = {}
    for tissue, key in (("grey_matter", "gm"), ("white_matter", "wm")):
        rel = f"labels/mri_tissue/mni152_{key}.nii.gz"
        layout.write(rel, archive.read(prefix.format(key)))
        maps[tissue] = rel
    layout.add_task_item("mri_tissue", {"image": "mri/mni152_t1.nii.gz", "subject": "mni152", "maps": maps})
