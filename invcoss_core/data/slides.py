"""Whole-slide images too large to read whole (tiled TIFF, Aperio SVS): tissue regions read tile by tile.

A 40x scan is typically 50,000 x 40,000 RGB pixels (6 GB of values), far over `readers.MAX_ELEMENTS`. Reading a
smaller pyramid level instead would show the model that slide's tissue at another magnification than every slide
that fits, so such a slide is read as a few square regions of its full-resolution level: regions chosen on tissue
(found on the pyramid's smallest level), each decoded from the tiles (or strips) it covers only. Every region is
then prepared and cut into patches exactly as a small slide is, at the same magnification.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from invcoss_core.data.errors import ImageReadError
from invcoss_core.data.preprocess import rgb_full_scale
from invcoss_core.data.readers import MAX_ELEMENTS, MIN_AXIS_2D, RawImage, tiff_layout
from invcoss_core.data.sampling import tissue_mask

WHOLE_SLIDE_LIMIT = MAX_ELEMENTS  # values of the full level above which a slide is read in regions
MAX_SLIDE_AXIS = 1 << 20  # pixels along either axis of a slide; a larger header is an absurd size
REGION_SIDE = 2048  # stored pixels per side of one region (64 tiles of a slide tiled in 256²)
SLIDE_READ_BUDGET = 1 << 26  # stored values read per slide: five 2048² RGB regions (64 MB as uint8)
THUMBNAIL_MAX_ELEMENTS = 1 << 24  # the largest pyramid level read whole to find tissue
MIN_REGION_TISSUE = 0.25  # share of tissue a region needs to be chosen while any region has that much
UNTHUMBNAILED_TRIES = 4  # regions read per wanted region when there is no pyramid level to find tissue on


@dataclass(frozen=True)
class SlideRegion:
    """One square region of a slide's full-resolution level: rows [y, y + height), columns [x, x + width)."""

    y: int
    x: int
    height: int
    width: int


def _unit_rgb(values: np.ndarray) -> np.ndarray:
    """Stored RGB values (..., 3+) mapped to [0, 1] by their full scale (the preprocessing's rule)."""
    rgb = values[..., :3]
    return rgb.astype(np.float32) / rgb_full_scale(rgb, str(rgb.dtype))


def _full_level(tif: Any) -> tuple[Any, Any]:
    """(series, full-resolution page) of series 0 — the slide; an SVS's label and macro images are other series."""
    if not tif.series:
        raise ImageReadError("TIFF file holds no image series")
    series = tif.series[0]
    levels = list(getattr(series, "levels", None) or [series])
    pages = list(getattr(levels[0], "pages", None) or [])
    if len(pages) != 1 or pages[0] is None:
        raise ImageReadError(
            f"a whole slide over the size limit must be one image plane; series 0 has {len(pages)} pages "
            "(split focal planes or channels into separate files)"
        )
    page = pages[0].keyframe if hasattr(pages[0], "keyframe") else pages[0]
    return series, page


def whole_slide_shape(path: Path) -> tuple[int, ...] | None:
    """The full level's shape when `path` is a TIFF whose full level holds over `WHOLE_SLIDE_LIMIT` values, else None.

    Args:
        path: a TIFF or SVS file.

    Raises:
        whatever tifffile raises on a malformed file (see `readers.parser_errors_as_rejects`).
    """
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        if not tif.series:
            return None
        shape = tuple(int(s) for s in tif.series[0].shape)
    return shape if math.prod(shape) > WHOLE_SLIDE_LIMIT else None


def _segment_grid(page: Any) -> tuple[int, int, int]:
    """(segment rows, segment columns, segments per row) of a page stored in tiles or strips."""
    height, width = int(page.imagelength), int(page.imagewidth)
    if page.is_tiled:
        seg_h, seg_w = int(page.tilelength), int(page.tilewidth)
    else:
        seg_h, seg_w = min(int(page.rowsperstrip) or height, height), width
    if int(getattr(page, "imagedepth", 1)) != 1 or int(getattr(page, "tiledepth", 1)) != 1:
        raise ImageReadError("volumetric TIFF tiles are not a slide")
    if int(page.planarconfig) != 1 and int(page.samplesperpixel) > 1:
        raise ImageReadError("a whole slide stored plane by plane (planar configuration 2) cannot be read in regions")
    return seg_h, seg_w, math.ceil(width / seg_w)


def read_region(tif: Any, page: Any, region: SlideRegion, file_size: int) -> np.ndarray:
    """Decode the tiles (or strips) that `region` covers, and only those.

    Args:
        tif: the open tifffile.TiffFile; page: its full-resolution page.
        region: the rows and columns to read; file_size: the file's size in bytes.

    Returns:
        (height, width, samples) array of the stored dtype (missing tiles are 0, as tifffile fills them).

    Raises:
        ImageReadError: for a tile past the end of the file (truncated) or one that does not decode.
    """
    seg_h, seg_w, per_row = _segment_grid(page)
    samples = int(page.samplesperpixel)
    out = np.zeros((region.height, region.width, samples), dtype=page.dtype)
    offsets, counts = page.dataoffsets, page.databytecounts
    handle = tif.filehandle
    for row in range(region.y // seg_h, (region.y + region.height - 1) // seg_h + 1):
        for col in range(region.x // seg_w, (region.x + region.width - 1) // seg_w + 1):
            index = row * per_row + col
            offset, count = int(offsets[index]), int(counts[index])
            if count == 0:
                continue
            if offset + count > file_size:
                raise ImageReadError(
                    f"truncated TIFF: tile {index} ends at byte {offset + count}, the file has {file_size} bytes"
                )
            handle.seek(offset)
            data = handle.read(count)
            try:
                decoded = page.decode(data, index, jpegtables=page.jpegtables)[0]
            except Exception as err:  # codecs raise their own types for corrupt data
                reason = f"tile {index} of the slide does not decode: {type(err).__name__}: {err}"
                raise ImageReadError(reason[:300]) from None
            if decoded is None:
                continue
            tile = np.asarray(decoded).reshape(decoded.shape[-3:])  # (1, rows, columns, samples) -> 3-D
            top, left = row * seg_h, col * seg_w
            y0, y1 = max(region.y, top), min(region.y + region.height, top + tile.shape[0])
            x0, x1 = max(region.x, left), min(region.x + region.width, left + tile.shape[1])
            out[y0 - region.y : y1 - region.y, x0 - region.x : x1 - region.x] = tile[
                y0 - top : y1 - top, x0 - left : x1 - left
            ]
    return out


def _cells(height: int, width: int, side: int) -> list[SlideRegion]:
    """The non-overlapping side x side regions that lie inside the level (one shorter region on a short axis)."""
    h, w = min(side, height), min(side, width)
    return [SlideRegion(y, x, h, w) for y in range(0, height - h + 1, h) for x in range(0, width - w + 1, w)]


def _thumbnail_tissue(series: Any, full: tuple[int, int]) -> np.ndarray | None:
    """Tissue mask on the pyramid's smallest level, or None when the slide has no level small enough."""
    levels = list(getattr(series, "levels", None) or [])
    if len(levels) < 2 or math.prod(levels[-1].shape) > THUMBNAIL_MAX_ELEMENTS:
        return None
    try:
        thumb = np.asarray(levels[-1].asarray())
    except Exception:  # a corrupt small level only costs the tissue map: cells are then read to find tissue
        return None
    if thumb.ndim != 3 or thumb.shape[-1] < 3 or thumb.shape[0] > full[0] or thumb.shape[1] > full[1]:
        return None
    return tissue_mask(_unit_rgb(thumb))


def _cell_tissue(mask: np.ndarray, cell: SlideRegion, full: tuple[int, int]) -> float:
    sy, sx = mask.shape[0] / full[0], mask.shape[1] / full[1]
    rows = slice(int(cell.y * sy), max(int(cell.y * sy) + 1, math.ceil((cell.y + cell.height) * sy)))
    cols = slice(int(cell.x * sx), max(int(cell.x * sx) + 1, math.ceil((cell.x + cell.width) * sx)))
    return float(mask[rows, cols].mean())


def read_slide_regions(
    path: Path,
    rng: np.random.Generator | None,
    count: int | None = None,
    side: int | None = None,
) -> list[RawImage]:
    """Read tissue regions of a whole slide's full-resolution level, tile by tile.

    Regions are cells of a non-overlapping grid of side x side stored pixels, and only cells with at least
    `MIN_REGION_TISSUE` tissue are read while the slide has any (else the cells with most tissue). With a pyramid
    level small enough to read whole, tissue is measured on it and `rng` draws among those cells (None: the most
    tissue first). Without one, cells are read in `rng`'s (or grid) order and kept for the tissue they show, up to
    `UNTHUMBNAILED_TRIES` reads per wanted region.

    Args:
        path: an RGB TIFF/SVS file (see `whole_slide_shape`).
        rng: draws the regions; None picks the most tissue deterministically.
        count: regions wanted; None fills `SLIDE_READ_BUDGET`.
        side: region side in stored pixels (default `REGION_SIDE`).

    Returns:
        One RawImage (H, W, 3) per region, each with a note saying where it lies.

    Raises:
        ImageReadError: for a truncated, corrupt or unsupported slide, or one with no usable region (what tifffile
            raises on a malformed header propagates: see `readers.parser_errors_as_rejects`).
    """
    import tifffile

    file_size = Path(path).stat().st_size
    with tifffile.TiffFile(str(path)) as tif:
        series, page = _full_level(tif)
        full = (int(page.imagelength), int(page.imagewidth))
        if int(page.samplesperpixel) not in (3, 4):
            raise ImageReadError(f"a whole slide must be RGB; this one has {page.samplesperpixel} samples per pixel")
        if min(full) < MIN_AXIS_2D or max(full) > MAX_SLIDE_AXIS:
            limits = f"each side {MIN_AXIS_2D}..{MAX_SLIDE_AXIS}"
            raise ImageReadError(f"absurd slide size {full[1]}x{full[0]} px ({limits})")
        cells = _cells(*full, side or REGION_SIDE)
        per_region = cells[0].height * cells[0].width * int(page.samplesperpixel)
        wanted = min(len(cells), max(1, SLIDE_READ_BUDGET // per_region) if count is None else count)
        mask = _thumbnail_tissue(series, full)
        if mask is not None:
            tissue = np.array([_cell_tissue(mask, c, full) for c in cells])
            rich = np.flatnonzero(tissue >= MIN_REGION_TISSUE)
            if len(rich) == 0:  # faint staining: the cells with most tissue
                order = np.argsort(-tissue, kind="stable")[:wanted]
            elif rng is None:
                order = rich[np.argsort(-tissue[rich], kind="stable")][:wanted]
            else:
                order = rng.choice(rich, size=min(wanted, len(rich)), replace=False)
            tries = len(order)
        else:
            order = np.arange(len(cells)) if rng is None else rng.permutation(len(cells))
            tries = wanted * UNTHUMBNAILED_TRIES
        kept: list[tuple[float, RawImage]] = []
        for cell in (cells[int(i)] for i in order[:tries]):
            region = read_region(tif, page, cell, file_size)
            try:
                raw = tiff_layout(region, "YXS")
            except ImageReadError:
                continue  # a blank region (constant values)
            share = float(tissue_mask(_unit_rgb(region)).mean())
            note = (
                f"whole slide {full[1]}x{full[0]} px over the size limit: region at x={cell.x}, y={cell.y} "
                f"({cell.width}x{cell.height} px, {share:.0%} tissue) read tile by tile at full resolution"
            )
            kept.append((share, raw.with_note(note)))
            if sum(s >= MIN_REGION_TISSUE for s, _ in kept) >= wanted:
                break
    if not kept:
        raise ImageReadError(f"whole slide {full[1]}x{full[0]} px: every region read is blank")
    rich_kept = [raw for share, raw in kept if share >= MIN_REGION_TISSUE]
    if rich_kept:
        return rich_kept[:wanted]
    return [raw for _, raw in sorted(kept, key=lambda item: -item[0])[:wanted]]
