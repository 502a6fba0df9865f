"""`read_image`: the one entry point, which picks the reader by format and turns parser failures into rejects."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from invcoss_core.data.errors import ImageReadError
from invcoss_core.data.readers.base import (
    FORMAT_DICOM,
    FORMAT_DICOM_SERIES,
    FORMAT_NIFTI,
    FORMAT_NRRD,
    FORMAT_PIL,
    FORMAT_TIFF,
    RawImage,
)
from invcoss_core.data.readers.dicom import read_dicom_file, read_dicom_series
from invcoss_core.data.readers.nifti import read_nifti
from invcoss_core.data.readers.nrrd import read_nrrd
from invcoss_core.data.readers.pil import read_pil
from invcoss_core.data.readers.tiff import read_tiff

_READERS = {
    FORMAT_NIFTI: read_nifti,
    FORMAT_NRRD: read_nrrd,
    FORMAT_DICOM: read_dicom_file,
    FORMAT_PIL: read_pil,
    FORMAT_TIFF: read_tiff,
}


@contextmanager
def parser_errors_as_rejects(source_format: str) -> Iterator[None]:
    """Turn whatever a parser raises on a malformed file into one ImageReadError naming `source_format`."""
    try:
        with warnings.catch_warnings():
            # Parsers warn about every oddity of a malformed header; the reject reason is what matters.
            warnings.simplefilter("ignore")
            yield
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageReadError("not enough memory to load this image") from None
    except PermissionError:
        raise ImageReadError("permission denied") from None
    except (EOFError, OSError) as err:
        raise ImageReadError(f"cannot read {source_format} file (truncated or corrupt?): {err}") from None
    except Exception as err:  # malformed files make parsers raise arbitrary types; each is one reject
        message = str(err).splitlines()[0] if str(err) else ""
        raise ImageReadError(f"cannot read as {source_format}: {type(err).__name__}: {message}"[:300]) from None


def read_image(paths: Sequence[Path], source_format: str) -> RawImage:
    """Read one image with the reader for `source_format`, turning every parser failure into a reject.

    Args:
        paths: one file, or the slice files of a DICOM series.
        source_format: one of the FORMAT_* names (see discovery.sniff_format).

    Returns:
        The image's values (float32, finite, not constant).

    Raises:
        ImageReadError: with a reason naming what is wrong.
    """
    with parser_errors_as_rejects(source_format):
        if source_format == FORMAT_DICOM_SERIES:
            return read_dicom_series(paths)
        if len(paths) != 1:
            raise ImageReadError(f"{source_format} images are single files, got {len(paths)}")
        reader = _READERS.get(source_format)
        if reader is None:
            raise ImageReadError(f"no reader for format {source_format!r}")
        return reader(paths[0])
