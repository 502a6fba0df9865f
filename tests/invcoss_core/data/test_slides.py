"""Whole slides over the size limit: full-resolution tissue regions decoded tile by tile, at every slide's scale."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from invcoss_core.config import DataConfig, StageConfig
from invcoss_core.data import load_site_dataset
from invcoss_core.data.check import check_site_data
from invcoss_core.data.dataset import load_prepared_parts
from invcoss_core.data.discovery import source_for_file
from invcoss_core.data.errors import ImageReadError
from invcoss_core.data.preprocess import prepare_image
from invcoss_core.data.readers import read_image
from invcoss_core.data.slides import SlideRegion, read_region, read_slide_regions, tissue_mask, whole_slide_shape
from tests.invcoss_core.data.conftest import spec_of
from tests.invcoss_core.data.factories import he_tile

SIDE = 256  # region side in the tests (2048 in use)
LIMIT = 1 << 18  # the tests' size limit: their 1024 x 1536 slides are over it, as a 40x scan is over the real one


def slide(shape: tuple[int, int] = (1024, 1536)) -> np.ndarray:
    """uint8 RGB: white glass on the left half, H&E-like tissue on the right half."""
    image = np.full((*shape, 3), 245, np.uint8)
    image[:, shape[1] // 2 :] = he_tile((shape[0], shape[1] - shape[1] // 2), seed=3)
    return image


def write_pyramid(path: Path, image: np.ndarray, tile: int = 64) -> Path:
    """A tiled, zlib-compressed pyramid (full level, /2, /4) as an SVS-like TIFF."""
    with tifffile.TiffWriter(str(path)) as tif:
        tif.write(image, photometric="rgb", tile=(tile, tile), compression="zlib", subifds=2)
        for step in (2, 4):
            tif.write(image[::step, ::step], photometric="rgb", tile=(tile, tile), compression="zlib", subfiletype=1)
    return path


def position(notes: tuple[str, ...]) -> tuple[int, int]:
    """(y, x) of a region, from its note."""
    found = re.search(r"region at x=(\d+), y=(\d+)", " ".join(notes))
    assert found, notes
    return int(found.group(2)), int(found.group(1))


@pytest.fixture()
def small_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real limits scaled down to the tests' slides: over the size limit, 256² regions, four per slide."""
    monkeypatch.setattr("invcoss_core.data.slides.WHOLE_SLIDE_LIMIT", LIMIT)
    monkeypatch.setattr("invcoss_core.data.slides.REGION_SIDE", SIDE)
    monkeypatch.setattr("invcoss_core.data.slides.SLIDE_READ_BUDGET", 4 * SIDE * SIDE * 3)


def test_region_decoded_tile_by_tile_equals_the_real_svs_full_level(sample_data: Path) -> None:
    path = sample_data / "pathology" / "cmu_small_region.svs"  # Aperio, JPEG tiles of 240 px
    full = tifffile.imread(str(path))
    with tifffile.TiffFile(str(path)) as tif:
        page = tif.series[0].levels[0].pages[0]
        size = path.stat().st_size
        for region in (
            SlideRegion(0, 0, 240, 240),  # exactly one tile
            SlideRegion(100, 130, 300, 500),  # across tile edges
            SlideRegion(2967 - 77, 2220 - 61, 77, 61),  # the bottom-right partial tile
        ):
            got = read_region(tif, page, region, size)
            want = full[region.y : region.y + region.height, region.x : region.x + region.width]
            np.testing.assert_array_equal(got, want)


def test_whole_slide_regions_lie_on_tissue_do_not_overlap_and_repeat_with_the_seed(
    tmp_path: Path, small_limit: None
) -> None:
    image = slide()
    path = write_pyramid(tmp_path / "slide.svs", image)
    assert whole_slide_shape(path) == (1024, 1536, 3)
    regions = read_slide_regions(path, np.random.default_rng(0), count=4, side=SIDE)
    assert len(regions) == 4
    places = [position(r.notes) for r in regions]
    assert len(set(places)) == 4 and all(y % SIDE == 0 and x % SIDE == 0 for y, x in places)  # grid cells
    for raw, (y, x) in zip(regions, places):
        assert raw.rgb and raw.array.shape == (SIDE, SIDE, 3)
        np.testing.assert_array_equal(raw.array, image[y : y + SIDE, x : x + SIDE].astype(np.float32))
        assert x >= 768 - SIDE // 2 and tissue_mask(raw.array / 255.0).mean() >= 0.25  # never the glass half
    again = read_slide_regions(path, np.random.default_rng(0), count=4, side=SIDE)
    assert [position(r.notes) for r in again] == places
    best = read_slide_regions(path, None, count=1, side=SIDE)  # no rng: the most tissue
    assert position(best[0].notes)[1] >= 768 + SIDE


def test_a_slide_without_pyramid_stored_in_strips_is_read_region_by_region(tmp_path: Path, small_limit: None) -> None:
    image = slide()
    path = tmp_path / "strips.tif"
    tifffile.imwrite(str(path), image, photometric="rgb", rowsperstrip=16)
    regions = read_slide_regions(path, np.random.default_rng(1), count=2, side=SIDE)
    assert len(regions) == 2
    for raw in regions:  # without a thumbnail, regions are read and kept for their tissue
        y, x = position(raw.notes)
        np.testing.assert_array_equal(raw.array, image[y : y + SIDE, x : x + SIDE].astype(np.float32))
        assert x >= 768 - SIDE // 2


def test_a_whole_slide_is_prepared_at_the_magnification_of_a_slide_read_whole(
    tmp_path: Path, tiny: StageConfig, small_limit: None
) -> None:
    image = slide()
    path = write_pyramid(tmp_path / "slide.svs", image)
    spec = spec_of(tiny, "pathology")
    parts = load_prepared_parts(source_for_file(path), "pathology", spec)
    whole = prepare_image(read_image((path,), "tiff"), "pathology", spec)  # the full level, read in one piece
    factor = image.shape[0] // whole.array.shape[1]
    assert len(parts) == 4 and factor > 1
    for prepared in parts:  # each region is a crop of the whole slide at its scale, not of a coarser level
        y, x = (v // factor for v in position(prepared.notes))
        assert prepared.array.shape == (3, SIDE // factor, SIDE // factor)
        np.testing.assert_allclose(
            prepared.array, whole.array[:, y : y + SIDE // factor, x : x + SIDE // factor], atol=1e-5
        )


def test_site_dataset_cuts_its_samples_from_the_regions_of_a_whole_slide(
    tmp_path: Path, tiny: StageConfig, small_limit: None
) -> None:
    folder = tmp_path / "site" / "pathology"
    folder.mkdir(parents=True)
    write_pyramid(folder / "slide.svs", slide())
    spec = spec_of(tiny, "pathology")
    data = load_site_dataset(tmp_path / "site", "pathology", spec, DataConfig(samples_per_volume=24), split="all")
    assert data.report.files_rejected == 0 and data.report.samples_per_file == {"slide.svs": 24}
    assert any("whole slide 1536x1024 px over the size limit" in note for note in data.report.notes)
    x = data.tensors()
    assert tuple(x.shape) == (24, *spec.input_shape)
    tissue = [float(tissue_mask(p.permute(1, 2, 0).numpy()).mean()) for p in x]
    assert np.mean([t >= 0.5 for t in tissue]) > 0.9  # patches on tissue, as on a small slide
    report = check_site_data(tmp_path / "site", "pathology", spec)
    assert report.usable and "whole slide" in report.usable[0].reason


def test_a_truncated_or_corrupt_whole_slide_is_rejected_with_its_reason_and_the_rest_loads(
    tmp_path: Path, tiny: StageConfig, small_limit: None
) -> None:
    folder = tmp_path / "site" / "pathology"
    folder.mkdir(parents=True)
    good = write_pyramid(folder / "good.svs", slide())
    with tifffile.TiffFile(str(good)) as tif:
        page = tif.series[0].levels[0].pages[0]
        offsets, counts = list(page.dataoffsets), list(page.databytecounts)
    corrupt = folder / "corrupt.svs"
    shutil.copy(good, corrupt)
    raw = bytearray(corrupt.read_bytes())
    for index in range(len(offsets)):  # every full-level tile: whichever regions are drawn, they break
        raw[offsets[index] : offsets[index] + counts[index]] = bytes(counts[index])
    corrupt.write_bytes(bytes(raw))
    truncated = tmp_path / "truncated.svs"
    shutil.copy(good, truncated)
    with truncated.open("r+b") as handle:  # cut inside the full level's tile data (its header stays)
        handle.truncate(offsets[len(offsets) // 2])
    with pytest.raises(ImageReadError, match="truncated TIFF: tile"):
        load_prepared_parts(source_for_file(truncated), "pathology", spec_of(tiny, "pathology"))
    spec = spec_of(tiny, "pathology")
    data = load_site_dataset(tmp_path / "site", "pathology", spec, DataConfig(samples_per_volume=8), split="all")
    assert data.report.loaded == ["good.svs"]
    assert [name for name, _ in data.report.rejected] == ["corrupt.svs"]
    assert "does not decode" in data.report.rejected[0][1]


def test_a_slide_with_a_corrupt_smallest_level_finds_its_tissue_on_the_full_level(
    tmp_path: Path, small_limit: None
) -> None:
    image = slide()
    path = write_pyramid(tmp_path / "slide.svs", image)
    with tifffile.TiffFile(str(path)) as tif:
        thumb = tif.series[0].levels[-1].pages[0]
        spans = list(zip(thumb.dataoffsets, thumb.databytecounts))
    raw = bytearray(path.read_bytes())
    for offset, count in spans:
        raw[offset : offset + count] = bytes(count)
    path.write_bytes(bytes(raw))
    regions = read_slide_regions(path, np.random.default_rng(2), count=2, side=SIDE)
    assert len(regions) == 2
    for region in regions:
        y, x = position(region.notes)
        np.testing.assert_array_equal(region.array, image[y : y + SIDE, x : x + SIDE].astype(np.float32))
        assert x >= 768 - SIDE // 2
