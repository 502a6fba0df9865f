"""Per-modality intensity rules, working grids and dimension checks."""

from __future__ import annotations

import numpy as np
import pytest

from invcoss_core.config import ModalitySpec, StageConfig
from invcoss_core.data.errors import ImageReadError
from invcoss_core.data.preprocess import (
    CT_WINDOW_HU,
    normalise,
    prepare_image,
    resample,
    validate_for_modality,
    working_shape,
)
from invcoss_core.data.readers import RawImage
from tests.invcoss_core.data.conftest import spec_of


def _raw(
    array: np.ndarray, spacing: tuple[float, ...] | None = None, rgb: bool = False, dtype: str = "int16"
) -> RawImage:
    return RawImage(array.astype(np.float32), spacing, rgb, "nifti", dtype)


def test_ct_window_maps_hounsfield_linearly_and_clips() -> None:
    hu = np.array([[-2000.0, -1000.0, 0.0], [500.0, 1000.0, 3000.0]], dtype=np.float32)
    out, _ = normalise(hu, "ct", "int16")
    lo, hi = CT_WINDOW_HU
    np.testing.assert_allclose(out[0], np.clip((hu - lo) / (hi - lo), 0, 1))
    assert out[0, 0, 1] == 0.0 and out[0, 0, 2] == 0.5 and out[0, 1, 1] == 1.0


def test_ct_without_negative_values_gets_a_note() -> None:
    _, notes = normalise(np.linspace(0, 3000, 100, dtype=np.float32).reshape(10, 10), "ct", "uint16")
    assert any("Hounsfield" in n for n in notes)


def test_mri_percentiles_of_nonzero_voxels() -> None:
    rng = np.random.default_rng(0)
    volume = np.zeros((20, 20, 20), np.float32)
    volume[5:15, 5:15, 5:15] = rng.uniform(100, 200, (10, 10, 10))
    out, _ = normalise(volume, "mri", "float32")
    nonzero = volume[volume != 0]
    lo, hi = np.percentile(nonzero, [0.5, 99.5])
    np.testing.assert_allclose(out[0], np.clip((volume - lo) / (hi - lo), 0, 1), rtol=1e-5, atol=1e-6)
    assert out[0, 0, 0, 0] == 0.0 and out.min() >= 0.0 and out.max() == 1.0


def test_pathology_rgb_divided_by_full_scale() -> None:
    rgb = np.array([[[0, 128, 255]]], dtype=np.float32)
    out, _ = normalise(rgb, "pathology", "uint8")
    np.testing.assert_allclose(out[:, 0, 0], [0.0, 128 / 255, 1.0])
    out16, _ = normalise(rgb * 257, "pathology", "uint16")
    np.testing.assert_allclose(out16[:, 0, 0], [0.0, 128 / 255, 1.0], rtol=1e-6)


def test_xray_percentile_clip_then_scale() -> None:
    image = np.arange(10000, dtype=np.float32).reshape(100, 100)
    out, _ = normalise(image, "xray", "uint16")
    assert out.shape == (1, 100, 100) and out.min() == 0.0 and out.max() == 1.0
    assert out[0, 0, 0] == 0.0 and out[0, 99, 99] == 1.0


def test_resample_area_then_linear_shapes_and_range() -> None:
    volume = np.random.default_rng(0).uniform(0, 1, (1, 40, 40, 8)).astype(np.float32)
    out = resample(volume, (20, 20, 24))
    assert out.shape == (1, 20, 20, 24) and out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_allclose(out.mean(), volume.mean(), atol=0.02)


def test_volume_working_grid_is_one_and_a_half_mm(tiny: StageConfig) -> None:
    raw = _raw(np.zeros((100, 100, 20)), spacing=(0.75, 0.75, 3.0))
    shape, notes = working_shape(raw, "ct", spec_of(tiny, "ct"))
    assert shape == (50, 50, 40) and not notes
    unknown, notes = working_shape(_raw(np.zeros((30, 30, 30))), "mri", spec_of(tiny, "mri"))
    assert unknown == (30, 30, 30) and "spacing unknown" in notes[0]
    odd, notes = working_shape(_raw(np.zeros((30, 30, 30)), spacing=(0.001, 1.0, 1.0)), "mri", spec_of(tiny, "mri"))
    assert odd == (30, 30, 30) and "implausible" in notes[0]


def test_pathology_input_covers_sixty_four_stored_pixels(tiny: StageConfig) -> None:
    raw = _raw(np.zeros((256, 128, 3)), rgb=True, dtype="uint8")
    shape, _ = working_shape(raw, "pathology", spec_of(tiny, "pathology"))
    assert shape == (64, 32)  # 16-pixel inputs at 1/4 scale


@pytest.mark.parametrize(
    ("modality", "array", "rgb", "words"),
    [
        ("ct", np.ones((20, 20)), False, "wrong dimensionality"),
        ("mri", np.ones((20, 20, 3)), True, "RGB image"),
        ("xray", np.ones((20, 20, 20)), False, "wrong dimensionality"),
        ("pathology", np.ones((20, 20)), False, "needs RGB"),
        ("xray", np.ones((4, 40)), False, "too small"),
    ],
)
def test_validate_refuses_wrong_shapes(
    tiny: StageConfig, modality: str, array: np.ndarray, rgb: bool, words: str
) -> None:
    with pytest.raises(ImageReadError, match=words):
        validate_for_modality(_raw(array, rgb=rgb), modality, spec_of(tiny, modality))


def test_rgb_xray_is_converted_to_grey(tiny: StageConfig) -> None:
    raw = validate_for_modality(_raw(np.full((20, 20, 3), 100.0), rgb=True), "xray", spec_of(tiny, "xray"))
    assert not raw.rgb and raw.array.shape == (20, 20) and "RGB converted to grey" in raw.notes


def test_unknown_modality_is_treated_by_its_shape() -> None:
    spec = ModalitySpec(spatial_dims=3, in_channels=1, img_size=(8, 8, 8), patch_size=(4, 4, 4))
    volume = np.random.default_rng(1).uniform(1, 5, (12, 12, 12))
    prepared = prepare_image(_raw(volume, spacing=(1.5, 1.5, 1.5)), "petct", spec)
    assert prepared.kind == "mri" and prepared.array.shape == (1, 12, 12, 12)
