"""Site data: readers, preprocessing, sampling, probe tasks and the sample-data fetch."""

from invcoss_core.data.check import CheckReport, FileCheck, check_site_data
from invcoss_core.data.dataset import (
    LoadReport,
    SiteDataset,
    TensorImages,
    load_image_for_embedding,
    load_site_dataset,
)
from invcoss_core.data.discovery import Discovery, ImageSource, discover_images
from invcoss_core.data.errors import ImageReadError, ProbeTaskTooSmallError, SampleFetchError, SiteDataError
from invcoss_core.data.probes import ProbeSet, ProbeTaskInfo, list_probe_tasks, load_probe_task
from invcoss_core.data.samples import default_samples_dir, fetch_samples

__all__ = [
    "CheckReport",
    "Discovery",
    "FileCheck",
    "ImageReadError",
    "ImageSource",
    "LoadReport",
    "ProbeSet",
    "ProbeTaskInfo",
    "ProbeTaskTooSmallError",
    "SampleFetchError",
    "SiteDataError",
    "SiteDataset",
    "TensorImages",
    "check_site_data",
    "default_samples_dir",
    "discover_images",
    "fetch_samples",
    "list_probe_tasks",
    "load_image_for_embedding",
    "load_probe_task",
    "load_site_dataset",
]
