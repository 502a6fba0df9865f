"""Exceptions of the data package: unusable site data, one rejected image, a failed sample fetch."""

from __future__ import annotations


class SiteDataError(ValueError):
    """A site's image folder cannot be used: nothing usable, a strict-mode reject, or a bad request.

    The message says what was found and what to change (usually: run ``invcoss data check``).
    """


class ImageReadError(ValueError):
    """One image file (or DICOM series) cannot be used; ``reason`` says why in operator terms."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SampleFetchError(RuntimeError):
    """``invcoss samples fetch`` could not produce a complete sample-data folder; the message says how to retry."""


class ProbeTaskTooSmallError(SiteDataError):
    """A probe task's images cannot give patches of the model's input size on both sides of its split."""
