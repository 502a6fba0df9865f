"""Each reader on small generated files: values, axis order, spacing, and what it refuses."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from invcoss_core.data.errors import ImageReadError
from invcoss_core.data.readers import (
    FORMAT_DICOM_SERIES,
    read_dicom_file,
    read_dicom_series,
    read_image,
    read_nifti,
    read_nrrd,
    read_pil,
    read_tiff,
)
from tests.invcoss_core.data.factories import (
    ct_phantom,
    he_tile,
    write_dicom,
    write_dicom_series,
    write_nifti,
    write_nrrd,
    write_png,
    write_tiff,
    xray_image,
)


def test_read_nifti_volume_keeps_values_order_and_spacing(tmp_path: Path) -> None:
    volume = ct_phantom()
    raw = read_nifti(write_nifti(tmp_path / "v.nii.gz", volume, (0.8, 0.9, 2.5)))
    np.testing.assert_array_equal(raw.array, volume.astype(np.float32))
    assert raw.spacing == pytest.approx((0.8, 0.9, 2.5))
    assert raw.spatial_dims == 3 and not raw.rgb and raw.source_dtype == "int16"


def test_read_nifti_squeezes_singleton_time_axis(tmp_path: Path) -> None:
    volume = ct_phantom()[..., None]
    raw = read_nifti(write_nifti(tmp_path / "v.nii", volume, (1.0, 1.0, 1.0, 1.0)))
    assert raw.spatial_shape == volume.shape[:3]


def test_read_nifti_refuses_time_series(tmp_path: Path) -> None:
    series = np.stack([ct_phantom(seed=s) for s in range(3)], axis=-1)
    with pytest.raises(ImageReadError, match="one 2-D image or 3-D volume per file"):
        read_nifti(write_nifti(tmp_path / "v.nii.gz", series))


def test_read_nrrd_volume_spacing_from_space_directions(tmp_path: Path) -> None:
    volume = ct_phantom()
    raw = read_nrrd(write_nrrd(tmp_path / "v.nrrd", volume, (0.7, 0.7, 3.0)))
    # stored in LPS: x and y run the other way in RAS
    np.testing.assert_array_equal(raw.array, volume[::-1, ::-1, :].astype(np.float32))
    assert raw.spacing == pytest.approx((0.7, 0.7, 3.0))
    assert "reoriented LPS → RAS" in raw.notes


def test_read_nrrd_image_comes_back_rows_first(tmp_path: Path) -> None:
    image = xray_image((30, 20))  # (H, W)
    raw = read_nrrd(write_nrrd(tmp_path / "i.nrrd", np.ascontiguousarray(image.T), (0.2, 0.3)))
    np.testing.assert_array_equal(raw.array, image.astype(np.float32))
    assert raw.spacing == pytest.approx((0.3, 0.2))


def test_read_dicom_applies_rescale_to_hounsfield(tmp_path: Path) -> None:
    stored = (ct_phantom()[:, :, 0].T + 1024).astype(np.int16)
    raw = read_dicom_file(write_dicom(tmp_path / "ct.dcm", stored, slope=1.0, intercept=-1024.0))
    np.testing.assert_array_equal(raw.array, stored.astype(np.float32) - 1024.0)
    assert raw.spatial_shape == stored.shape and raw.spacing == pytest.approx((0.5, 0.5))


def test_read_dicom_inverts_monochrome1(tmp_path: Path) -> None:
    stored = xray_image().astype(np.int16)
    raw = read_dicom_file(write_dicom(tmp_path / "x.dcm", stored, modality="CR", photometric="MONOCHROME1"))
    np.testing.assert_array_equal(raw.array, stored.max() + stored.min() - stored.astype(np.float32))
    assert "MONOCHROME1 inverted" in raw.notes


def test_read_dicom_multiframe_is_a_columns_rows_frames_volume(tmp_path: Path) -> None:
    volume = ct_phantom((20, 16, 6))  # (x, y, z)
    frames = volume.transpose(2, 1, 0)  # (frames, rows, cols)
    raw = read_dicom_file(write_dicom(tmp_path / "mf.dcm", frames))
    np.testing.assert_array_equal(raw.array, volume.astype(np.float32))
    assert raw.spacing == pytest.approx((0.5, 0.5, 2.0))


def test_read_dicom_rgb(tmp_path: Path) -> None:
    tile = he_tile((40, 30))
    raw = read_dicom_file(write_dicom(tmp_path / "rgb.dcm", tile, modality="SM"))
    assert raw.rgb and raw.array.shape == (40, 30, 3)
    np.testing.assert_array_equal(raw.array, tile.astype(np.float32))


def test_read_dicom_series_orders_slices_by_position_not_name(tmp_path: Path) -> None:
    volume = ct_phantom((24, 20, 7))
    paths = write_dicom_series(tmp_path / "series", volume, spacing=(0.6, 0.7, 2.5))
    raw = read_dicom_series(sorted(paths))  # names are in reverse slice order
    # DICOM patient axes are LPS: columns and rows run the other way in RAS, slices go inferior → superior
    np.testing.assert_array_equal(raw.array, volume[::-1, ::-1, :].astype(np.float32))
    assert raw.spacing == pytest.approx((0.6, 0.7, 2.5))
    assert raw.source_format == FORMAT_DICOM_SERIES


def test_read_dicom_series_names_the_bad_slice(tmp_path: Path) -> None:
    paths = write_dicom_series(tmp_path / "series", ct_phantom((16, 16, 5)))
    paths[2].write_bytes(paths[2].read_bytes()[:400])
    with pytest.raises(ImageReadError, match=paths[2].name):
        read_image(paths, FORMAT_DICOM_SERIES)


def test_read_dicom_series_refuses_duplicate_positions(tmp_path: Path) -> None:
    folder = tmp_path / "dup"
    uid = "1.2.3.4"
    a = write_dicom(folder / "a.dcm", ct_phantom((16, 16, 1))[:, :, 0], series_uid=uid, position=(0, 0, 0))
    b = write_dicom(folder / "b.dcm", ct_phantom((16, 16, 1))[:, :, 0], series_uid=uid, position=(0, 0, 0))
    with pytest.raises(ImageReadError, match="share one position"):
        read_dicom_series([a, b])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_read_png_grey_keeps_bit_depth(tmp_path: Path, dtype: type) -> None:
    image: np.ndarray = (xray_image() // (257 if dtype == np.uint8 else 1)).astype(dtype)
    raw = read_pil(write_png(tmp_path / "g.png", image))
    assert not raw.rgb
    np.testing.assert_array_equal(raw.array, image.astype(np.float32))


def test_read_png_rgba_drops_alpha(tmp_path: Path) -> None:
    tile = he_tile((32, 48))
    rgba = np.concatenate([tile, np.full((32, 48, 1), 255, np.uint8)], axis=-1)
    raw = read_pil(write_png(tmp_path / "c.png", rgba))
    assert raw.rgb and raw.array.shape == (32, 48, 3)
    np.testing.assert_array_equal(raw.array, tile.astype(np.float32))


def test_read_jpeg(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "c.jpg"
    Image.fromarray(he_tile()).save(path, quality=95)
    raw = read_pil(path)
    assert raw.rgb and raw.array.shape == (160, 160, 3)


def test_read_tiff_rgb_grey_and_volume(tmp_path: Path) -> None:
    tile = he_tile((32, 40))
    rgb = read_tiff(write_tiff(tmp_path / "c.tif", tile, "rgb"))
    assert rgb.rgb and rgb.array.shape == (32, 40, 3)
    grey = read_tiff(write_tiff(tmp_path / "g.tiff", xray_image((30, 20))))
    assert not grey.rgb and grey.array.shape == (30, 20)
    stack = ct_phantom((20, 16, 5)).transpose(2, 1, 0)  # (Z, Y, X) pages
    volume = read_tiff(write_tiff(tmp_path / "v.tif", stack))
    assert volume.spatial_shape == (20, 16, 5)


def test_read_svs_pyramid_uses_series_zero(tmp_path: Path) -> None:
    import tifffile

    path = tmp_path / "slide.svs"
    tile = he_tile((64, 64))
    with tifffile.TiffWriter(str(path)) as tif:
        tif.write(tile, photometric="rgb", tile=(32, 32), subifds=1)
        tif.write(tile[::2, ::2], photometric="rgb", subfiletype=1)
        tif.write(np.zeros((8, 8, 3), np.uint8), photometric="rgb", subfiletype=1)  # a 'label' image
    raw = read_tiff(path)
    assert raw.rgb and raw.array.shape == (64, 64, 3)
    np.testing.assert_array_equal(raw.array, tile.astype(np.float32))


def test_read_image_turns_parser_errors_into_rejects(tmp_path: Path) -> None:
    path = tmp_path / "junk.nii.gz"
    path.write_bytes(b"\x1f\x8b" + bytes(range(200)))
    with pytest.raises(ImageReadError) as info:
        read_image((path,), "nifti")
    assert info.value.reason


def test_volumes_read_in_ras_whatever_orientation_and_format_stored_them(tmp_path: Path) -> None:
    """One RAS volume stored four ways (RAS NIfTI, permuted and flipped NIfTI, LPS NRRD, DICOM series) reads back
    the same array, with the spacing following its axes."""
    ras = ct_phantom((24, 20, 7))  # axis 0 → right, 1 → anterior, 2 → superior
    sx, sy, sz = 0.6, 0.7, 2.5
    plain = read_nifti(write_nifti(tmp_path / "ras.nii.gz", ras, (sx, sy, sz)))
    # stored axes: 0 runs superior → inferior, 1 left → right, 2 posterior → anterior
    stored = np.ascontiguousarray(np.transpose(ras, (2, 0, 1))[::-1])
    affine = np.zeros((4, 4))
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[3, 3] = (0, 0, -sz), (sx, 0, 0), (0, sy, 0), 1.0
    image = nib.Nifti1Image(stored, affine)
    image.header.set_zooms((sz, sx, sy))
    nib.save(image, str(tmp_path / "sra.nii.gz"))
    permuted = read_nifti(tmp_path / "sra.nii.gz")
    lps = read_nrrd(write_nrrd(tmp_path / "lps.nrrd", np.ascontiguousarray(ras[::-1, ::-1, :]), (sx, sy, sz)))
    series = read_dicom_series(
        write_dicom_series(tmp_path / "series", np.ascontiguousarray(ras[::-1, ::-1, :]), spacing=(sx, sy, sz))
    )
    for raw in (plain, permuted, lps, series):
        np.testing.assert_array_equal(raw.array, ras.astype(np.float32))
        assert raw.spacing == pytest.approx((sx, sy, sz))
    assert plain.notes == ()
    assert permuted.notes == ("reoriented IRA → RAS",)


def test_volume_without_orientation_keeps_stored_order_and_says_so(tmp_path: Path) -> None:
    volume = ct_phantom((16, 12, 5))
    raw = read_nrrd(write_nrrd(tmp_path / "v.nrrd", volume))  # no 'space', no directions
    np.testing.assert_array_equal(raw.array, volume.astype(np.float32))
    assert any("orientation unknown" in note and "stored voxel order kept" in note for note in raw.notes)
