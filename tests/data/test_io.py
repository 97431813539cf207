"""Every format round-trips with its geometry; canonical orientation keeps world positions; predictions go back."""

from __future__ import annotations

import gzip
import logging

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medtransfer.data.io import (
    READ_EXTENSIONS,
    WRITE_EXTENSIONS,
    canonical_axes,
    image_from_sitk,
    image_to_sitk,
    read_header,
    read_image,
    undo_reorientation,
    voxel_to_world,
    write_image,
)
from medtransfer.data.types import Image
from medtransfer.errors import DataError

SPACING = (2.5, 0.8, 0.7)
ORIGIN = (10.0, -20.0, 30.0)
# Rows: the world direction (S, P, L components) of array axes 0, 1, 2: axis 0 runs Posterior, axis 1 towards the
# patient's Right (a flip of L) and axis 2 Superior (a permutation).
DIRECTION = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])


def volume(dtype=np.int16) -> Image:
    return Image(np.arange(5 * 6 * 7, dtype=dtype).reshape(5, 6, 7), SPACING, ORIGIN, DIRECTION.copy())


def assert_geometry(image: Image, spacing, origin, direction, atol=1e-4) -> None:
    np.testing.assert_allclose(image.spacing, spacing, atol=atol)
    np.testing.assert_allclose(image.origin, origin, atol=atol)
    np.testing.assert_allclose(image.direction, direction, atol=atol)


def test_sitk_conversion_reverses_axes():
    img = image_to_sitk(volume())
    assert img.GetSize() == (7, 6, 5)
    np.testing.assert_allclose(img.GetSpacing(), (0.7, 0.8, 2.5))
    np.testing.assert_allclose(img.GetOrigin(), (30.0, -20.0, 10.0))
    # ITK: world = origin + D @ (ijk * spacing), ijk in (x, y, z) order; voxel [z, y, x] = [1, 2, 3]
    ijk = np.array([3, 2, 1]) * np.array(img.GetSpacing())
    itk_world = np.array(img.GetOrigin()) + np.array(img.GetDirection()).reshape(3, 3) @ ijk
    ours = voxel_to_world(volume(), [1, 2, 3])
    np.testing.assert_allclose(ours, itk_world[::-1])
    np.testing.assert_allclose(img.TransformIndexToPhysicalPoint((3, 2, 1)), itk_world)
    back = image_from_sitk(img)
    assert_geometry(back, SPACING, ORIGIN, DIRECTION)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".npz"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_round_trip_keeps_array_and_geometry(tmp_path, ext, dtype):
    src = volume(dtype)
    write_image(src, tmp_path / f"vol{ext}")
    got = read_image(tmp_path / f"vol{ext}", reorient=False)
    assert got.array.dtype == dtype
    np.testing.assert_array_equal(got.array, src.array)
    assert_geometry(got, SPACING, ORIGIN, DIRECTION)
    assert got.meta["format"] == READ_EXTENSIONS[ext]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["vol.mhd", "vol.zraw"] if ext == ".mhd" else [f"vol{ext}"]
    ), "no temporary files are left behind"


def test_uncompressed_metaimage_and_nrrd(tmp_path):
    write_image(volume(), tmp_path / "a.mhd", compress=False)
    write_image(volume(), tmp_path / "b.nrrd", compress=False)
    assert (tmp_path / "a.raw").stat().st_size == 5 * 6 * 7 * 2
    for name in ("a.mhd", "b.nrrd"):
        np.testing.assert_array_equal(read_image(tmp_path / name, reorient=False).array, volume().array)


def test_nhdr_detached_header(tmp_path):
    sitk.WriteImage(image_to_sitk(volume()), str(tmp_path / "v.nhdr"))
    got = read_image(tmp_path / "v.nhdr", reorient=False)
    np.testing.assert_array_equal(got.array, volume().array)
    assert_geometry(got, SPACING, ORIGIN, DIRECTION)


def test_nifti_affine_matches_nibabel(tmp_path):
    write_image(volume(), tmp_path / "v.nii.gz")
    affine = nib.load(tmp_path / "v.nii.gz").affine  # RAS, voxel (i, j, k) = array (x, y, z)
    # voxel [z, y, x] = [1, 2, 3]: LPS (S, P, L) from our convention, then to RAS (x, y, z)
    s, p, l = voxel_to_world(volume(), [1, 2, 3])
    np.testing.assert_allclose(affine @ [3, 2, 1, 1], [-l, -p, s, 1], atol=1e-4)


def test_npy_is_array_only(tmp_path):
    write_image(volume(), tmp_path / "v.npy")
    got = read_image(tmp_path / "v.npy")
    np.testing.assert_array_equal(got.array, volume().array)
    assert got.spacing == (1.0, 1.0, 1.0) and got.origin == (0.0, 0.0, 0.0)
    np.testing.assert_array_equal(got.direction, np.eye(3))


def test_npz_keys(tmp_path):
    np.savez(tmp_path / "only.npz", voxels=np.ones((4, 5), np.uint8))
    only = read_image(tmp_path / "only.npz")
    assert only.array.shape == (4, 5) and only.spacing == (1.0, 1.0)
    np.savez(tmp_path / "two.npz", a=np.ones(3), b=np.ones(3))
    with pytest.raises(DataError, match=r"two\.npz: holds arrays \['a', 'b'\]; name the image array 'image'"):
        read_image(tmp_path / "two.npz")


def test_multichannel_nifti_is_channels_first(tmp_path):
    arr = np.stack([volume(np.float32).array, -volume(np.float32).array])
    write_image(Image(arr, SPACING, ORIGIN, DIRECTION), tmp_path / "mc.nii.gz")
    assert nib.load(tmp_path / "mc.nii.gz").shape == (7, 6, 5, 2)  # MSD layout: modalities on the 4th axis
    got = read_image(tmp_path / "mc.nii.gz", reorient=False)
    assert got.channels == 2 and got.spatial_shape == (5, 6, 7)
    np.testing.assert_array_equal(got.array, arr)
    assert_geometry(got, SPACING, ORIGIN, DIRECTION)
    canon = read_image(tmp_path / "mc.nii.gz")
    assert canon.array.shape == (2, 7, 5, 6)
    np.testing.assert_array_equal(canon.array[1], -read_image(tmp_path / "mc.nii.gz").array[0])
    shape, spacing, dtype, channels = read_header(tmp_path / "mc.nii.gz")
    assert (shape, dtype, channels) == ((7, 5, 6), np.float32, 2)
    np.testing.assert_allclose(spacing, (0.7, 2.5, 0.8), atol=1e-6)  # NIfTI stores float32


# --- canonical orientation ------------------------------------------------------------------------------------------


def test_canonical_axes_of_the_test_direction():
    # new axis 0 (S) = old axis 2, new axis 1 (P) = old axis 0, new axis 2 (L) = old axis 1 flipped (it runs R)
    assert canonical_axes(DIRECTION) == ((2, 0, 1), (False, False, True))


def test_canonical_axes_of_an_oblique_scan():
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    oblique = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, -1.0]])
    assert canonical_axes(oblique) == ((0, 1, 2), (False, False, True))


@pytest.mark.parametrize("ext", [".nii.gz", ".mha", ".nrrd"])
def test_reorientation_keeps_world_positions(tmp_path, ext):
    write_image(volume(), tmp_path / f"v{ext}")
    canon = read_image(tmp_path / f"v{ext}")
    assert canon.array.shape == (7, 5, 6)
    np.testing.assert_array_equal(canon.array, volume().array.transpose(2, 0, 1)[:, :, ::-1])
    # by hand: the new index 0 is old voxel (0, 5, 0): ORIGIN + 5 * 0.8 * (0, 0, -1)
    assert_geometry(canon, (0.7, 2.5, 0.8), (10.0, -20.0, 26.0), np.eye(3))
    old = volume()
    for new_idx in [(0, 0, 0), (6, 4, 5), (3, 1, 2)]:
        i, j, k = new_idx
        old_idx = (j, 5 - k, i)
        assert canon.array[new_idx] == old.array[old_idx]
        np.testing.assert_allclose(voxel_to_world(canon, new_idx), voxel_to_world(old, old_idx), atol=1e-4)
    np.testing.assert_allclose(voxel_to_world(canon, (6, 4, 5)), (10 + 6 * 0.7, -20 + 4 * 2.5, 26 + 5 * 0.8), atol=1e-4)
    assert canon.meta["original"]["perm"] == [2, 0, 1] and canon.meta["original"]["flips"] == [False, False, True]


@pytest.mark.parametrize("ext", [".nii.gz", ".mha", ".nrrd", ".npz"])
def test_prediction_written_back_in_original_geometry(tmp_path, ext):
    write_image(volume(), tmp_path / f"scan{ext}")
    scan = read_image(tmp_path / f"scan{ext}")
    pred = Image((scan.array > 100).astype(np.uint8), scan.spacing, scan.origin, scan.direction)
    write_image(pred, tmp_path / f"pred{ext}", like=scan)
    back = read_image(tmp_path / f"pred{ext}", reorient=False)
    original = read_image(tmp_path / f"scan{ext}", reorient=False)
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, (original.array > 100).astype(np.uint8))
    assert_geometry(back, original.spacing, original.origin, original.direction, atol=1e-6)
    if ext == ".nii.gz":
        np.testing.assert_allclose(
            nib.load(tmp_path / "pred.nii.gz").affine, nib.load(tmp_path / "scan.nii.gz").affine, atol=1e-6
        )


def test_prediction_with_channels_and_wrong_shape(tmp_path):
    write_image(volume(), tmp_path / "scan.nii.gz")
    scan = read_image(tmp_path / "scan.nii.gz")
    probs = np.stack([scan.array, scan.array + 1]).astype(np.float32)
    back = undo_reorientation(Image(probs, scan.spacing, scan.origin, scan.direction), scan)
    np.testing.assert_array_equal(back.array[1], volume().array + 1)
    small = Image(np.zeros((7, 5, 5), np.uint8), scan.spacing, scan.origin, scan.direction)
    with pytest.raises(DataError, match=r"spatial shape \(7, 5, 5\) differs from that image's \(7, 5, 6\)"):
        write_image(small, tmp_path / "p.nii.gz", like=scan)


# --- DICOM ----------------------------------------------------------------------------------------------------------


def write_dicom_series(image: Image, folder, series_uid: str) -> None:
    """One file per slice with the tags a reader needs to stack them: position, orientation, series and number."""
    folder.mkdir(parents=True, exist_ok=True)
    vol = image_to_sitk(image)
    d = np.array(vol.GetDirection()).reshape(3, 3)
    orientation = "\\".join(f"{v:.6f}" for v in [*d[:, 0], *d[:, 1]])
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(vol.GetSize()[2]):
        slc = vol[:, :, z]
        for tag, value in {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0037": orientation,
            "0020|0032": "\\".join(f"{v:.6f}" for v in vol.TransformIndexToPhysicalPoint((0, 0, z))),
            "0020|0013": str(z + 1),
            "0008|0018": f"{series_uid}.{z + 1}",
        }.items():
            slc.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(slc)


def axial_volume() -> Image:
    # Slices stack along array axis 0; DICOM keeps in-plane axes, so use a rotation that keeps axis 0 along S/I.
    direction = np.array([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]])  # feet-first, flipped in-plane
    return Image(np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7) - 100, SPACING, ORIGIN, direction)


def test_dicom_series_folder(tmp_path):
    write_dicom_series(axial_volume(), tmp_path / "ct", "1.2.826.0.1.3680043.2.1125.2")
    got = read_image(tmp_path / "ct", reorient=False)
    assert got.meta["format"] == "dicom_series"
    np.testing.assert_array_equal(got.array, axial_volume().array)
    assert_geometry(got, SPACING, ORIGIN, axial_volume().direction)
    canon = read_image(tmp_path / "ct")
    np.testing.assert_array_equal(canon.array, axial_volume().array[::-1, :, ::-1])
    np.testing.assert_array_equal(canon.direction, np.eye(3))
    shape, spacing, dtype, channels = read_header(tmp_path / "ct")
    assert (shape, dtype, channels) == ((5, 6, 7), np.int16, 1)
    np.testing.assert_allclose(spacing, SPACING, atol=1e-6)


def test_dicom_folder_with_two_series_reads_the_larger(tmp_path, caplog):
    write_dicom_series(axial_volume(), tmp_path / "study" / "a", "1.2.826.0.1.3680043.2.1125.3")
    small = Image(np.zeros((2, 6, 7), np.int16), SPACING, ORIGIN, axial_volume().direction)
    write_dicom_series(small, tmp_path / "study" / "b", "1.2.826.0.1.3680043.2.1125.4")
    with caplog.at_level(logging.INFO, logger="medtransfer.data.io"):
        got = read_image(tmp_path / "study")
    assert got.spatial_shape == (5, 6, 7) and got.meta["dicom_series"] == "1.2.826.0.1.3680043.2.1125.3"
    assert "holds 2 DICOM series" in caplog.text


def test_empty_dicom_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no scans here")
    with pytest.raises(DataError, match=r"empty: no DICOM series found in this folder or below it"):
        read_image(tmp_path / "empty")


def test_single_dicom_file_is_2d(tmp_path):
    write_dicom_series(axial_volume(), tmp_path / "ct", "1.2.826.0.1.3680043.2.1125.5")
    one = read_image(tmp_path / "ct" / "slice002.dcm", reorient=False)
    assert one.spatial_dims == 2
    np.testing.assert_array_equal(one.array, axial_volume().array[2])
    np.testing.assert_allclose(one.spacing, (0.8, 0.7), atol=1e-6)
    (tmp_path / "ct" / "slice002.dcm").rename(tmp_path / "noext")  # DICOM preamble, no extension
    assert read_image(tmp_path / "noext").meta["format"] == "dicom"


# --- 2D raster ------------------------------------------------------------------------------------------------------


def test_png_grayscale_and_rgb(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (9, 11), dtype=np.uint8)
    rgb = rng.integers(0, 256, (3, 9, 11), dtype=np.uint8)
    write_image(Image(gray, (1.0, 1.0), (0.0, 0.0), np.eye(2)), tmp_path / "g.png")
    write_image(Image(rgb, (1.0, 1.0), (0.0, 0.0), np.eye(2)), tmp_path / "c.png")
    g, c = read_image(tmp_path / "g.png"), read_image(tmp_path / "c.png")
    np.testing.assert_array_equal(g.array, gray)
    np.testing.assert_array_equal(c.array, rgb)
    assert c.channels == 3 and c.spatial_shape == (9, 11) and g.spacing == (1.0, 1.0)
    assert read_header(tmp_path / "c.png") == ((9, 11), (1.0, 1.0), np.dtype(np.uint8), 3)


def test_png_16bit_rgba_jpeg_bmp(tmp_path):
    deep = (np.arange(99, dtype=np.uint16).reshape(9, 11) * 600).astype(np.uint16)
    write_image(Image(deep, (1.0, 1.0), (0.0, 0.0), np.eye(2)), tmp_path / "d.png")
    np.testing.assert_array_equal(read_image(tmp_path / "d.png").array, deep)
    rgba = np.full((9, 11, 4), 7, np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgba, isVector=True), str(tmp_path / "a.png"))
    assert read_image(tmp_path / "a.png").array.shape == (3, 9, 11)  # alpha dropped
    flat = np.full((8, 8), 90, np.uint8)
    for ext in (".jpg", ".bmp"):
        write_image(Image(flat, (1.0, 1.0), (0.0, 0.0), np.eye(2)), tmp_path / f"f{ext}")
        got = read_image(tmp_path / f"f{ext}")
        assert got.array.shape == (8, 8)
        assert np.abs(got.array.astype(int) - 90).max() <= 2  # JPEG is lossy


def test_png_write_rejects_floats(tmp_path):
    img = Image(np.linspace(0, 1, 12).reshape(3, 4), (1.0, 1.0), (0.0, 0.0), np.eye(2))
    with pytest.raises(DataError, match=r"x\.png: PNG/JPEG/BMP store 8- or 16-bit unsigned integers"):
        write_image(img, tmp_path / "x.png")


def test_corrupt_png(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError, match=r"bad\.png: cannot be read as a PNG image: the file is corrupt"):
        read_image(tmp_path / "bad.png")


# --- errors ---------------------------------------------------------------------------------------------------------


def random_volume() -> Image:
    arr = np.random.default_rng(1).normal(size=(16, 16, 16)).astype(np.float32)
    return Image(arr, SPACING, ORIGIN, DIRECTION)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_truncated_nifti(tmp_path, ext):
    write_image(random_volume(), tmp_path / f"v{ext}")
    data = (tmp_path / f"v{ext}").read_bytes()
    (tmp_path / f"cut{ext}").write_bytes(data[: len(data) * 2 // 3])
    why = "gzip stream ends early" if ext == ".nii.gz" else "the voxel data ends early"
    for reader in (read_image, read_header):
        with pytest.raises(DataError) as err:
            reader(tmp_path / f"cut{ext}")
        message = str(err.value)
        assert f"cut{ext}" in message and "the file is truncated or corrupt" in message and why in message
        assert "re-export it or copy it again" in message


def test_truncated_gzip_header(tmp_path):
    write_image(random_volume(), tmp_path / "v.nii.gz")
    (tmp_path / "cut.nii.gz").write_bytes((tmp_path / "v.nii.gz").read_bytes()[:40])
    with pytest.raises(DataError, match=r"cut\.nii\.gz: the file is truncated or corrupt"):
        read_image(tmp_path / "cut.nii.gz")


def test_multimember_gzip_is_not_truncation(tmp_path):
    write_image(random_volume(), tmp_path / "v.nii", compress=False)
    raw = (tmp_path / "v.nii").read_bytes()
    (tmp_path / "m.nii.gz").write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    np.testing.assert_array_equal(read_image(tmp_path / "m.nii.gz", reorient=False).array, random_volume().array)


@pytest.mark.parametrize("ext", [".mha", ".nrrd"])
def test_truncated_metaimage_and_nrrd(tmp_path, ext):
    write_image(random_volume(), tmp_path / f"v{ext}", compress=False)
    data = (tmp_path / f"v{ext}").read_bytes()
    (tmp_path / f"cut{ext}").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError, match=rf"cut\{ext}: the file is truncated or corrupt"):
        read_image(tmp_path / f"cut{ext}")


def test_mhd_missing_data_file(tmp_path):
    write_image(volume(), tmp_path / "v.mhd")
    (tmp_path / "v.zraw").unlink()
    with pytest.raises(DataError, match=r"v\.mhd: its voxel data file v\.zraw \(ElementDataFile\) is missing"):
        read_image(tmp_path / "v.mhd")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.nii\.gz: image not found"):
        read_image(tmp_path / "nope.nii.gz")


def test_unknown_extension_lists_formats(tmp_path):
    (tmp_path / "scan.xyz").write_text("hello")
    with pytest.raises(DataError) as err:
        read_image(tmp_path / "scan.xyz")
    message = str(err.value)
    assert "scan.xyz: unknown image format '.xyz'" in message
    for ext in (".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".dcm", ".npy", ".npz", ".png", ".jpg", "DICOM series"):
        assert ext in message
    with pytest.raises(DataError, match=r"cannot write '\.xyz'; choose one of \.nii\.gz, \.nii, \.mha"):
        write_image(volume(), tmp_path / "out.xyz")
    assert set(WRITE_EXTENSIONS) <= set(READ_EXTENSIONS)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".mha", ".nrrd", ".npz"])
def test_nan_and_inf_survive_reading(tmp_path, ext):
    # ITK's own NIfTI reader turns them into 0, which would hide them from the dataset checker
    arr = random_volume().array.copy()
    arr[0, 0, 0], arr[1, 1, 1], arr[2, 2, 2] = np.nan, np.inf, -np.inf
    write_image(Image(arr, SPACING, ORIGIN, DIRECTION), tmp_path / f"n{ext}")
    got = read_image(tmp_path / f"n{ext}", reorient=False).array
    assert np.isnan(got[0, 0, 0]) and got[1, 1, 1] == np.inf and got[2, 2, 2] == -np.inf
    np.testing.assert_array_equal(got[3:], arr[3:])


# --- header only ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".npy", ".npz"])
@pytest.mark.parametrize("reorient", [True, False])
def test_read_header_matches_read_image(tmp_path, ext, reorient):
    write_image(volume(np.uint8), tmp_path / f"v{ext}")
    image = read_image(tmp_path / f"v{ext}", reorient=reorient)
    shape, spacing, dtype, channels = read_header(tmp_path / f"v{ext}", reorient=reorient)
    assert shape == image.spatial_shape and dtype == np.uint8 and channels == 1
    np.testing.assert_allclose(spacing, image.spacing, atol=1e-6)
    if ext not in (".npy",) and reorient:
        assert shape == (7, 5, 6)


def test_intact_nii_gz_is_checked_without_decompressing(tmp_path, monkeypatch):
    import medtransfer.data.io as io
    import medtransfer.data.io_nifti as io_nifti

    write_image(random_volume(), tmp_path / "v.nii.gz")

    def no_full_read(path):
        raise AssertionError("the gzip trailer should have been enough")

    monkeypatch.setattr(io_nifti, "_gzip_size", no_full_read)
    assert io.check_nifti_complete(tmp_path / "v.nii.gz") == np.float32
    assert read_header(tmp_path / "v.nii.gz")[0] == (16, 16, 16)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_2d_nifti_gray_and_rgb(tmp_path, ext):
    gray = np.linspace(-1, 1, 20, dtype=np.float32).reshape(4, 5)
    rgb = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    for name, arr in (("g", gray), ("c", rgb)):
        write_image(Image(arr, (0.5, 0.25), (1.0, 2.0), np.eye(2)), tmp_path / f"{name}{ext}")
        got = read_image(tmp_path / f"{name}{ext}")
        np.testing.assert_array_equal(got.array, arr)
        assert got.spacing == (0.5, 0.25) and got.origin == (1.0, 2.0) and got.array.dtype == arr.dtype


def test_unreadable_numpy_and_headers(tmp_path):
    for name in ("junk.npy", "junk.npz", "junk.nii.gz", "junk.mha"):
        (tmp_path / name).write_bytes(b"hello world" * 50)
    with pytest.raises(DataError, match=r"junk\.npy: not a NumPy \.npy file \(no NumPy/zip signature\)"):
        read_image(tmp_path / "junk.npy")
    with pytest.raises(DataError, match=r"junk\.npz: not a NumPy \.npz file"):
        read_header(tmp_path / "junk.npz")
    with pytest.raises(DataError, match=r"junk\.mha: cannot be read as MetaImage \(no reader recognises its header\)"):
        read_image(tmp_path / "junk.mha")
    with pytest.raises(DataError, match=r"junk\.nii\.gz: cannot be read as NIfTI \(no reader recognises its header\)"):
        read_image(tmp_path / "junk.nii.gz")
    np.savez(tmp_path / "obj.npz", image=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match=r"obj\.npz: holds Python objects, which are never unpickled"):
        read_image(tmp_path / "obj.npz")


@pytest.mark.parametrize("dtype", [np.int16, np.float32])  # integers through ITK, floats through nibabel
def test_nifti_written_by_nibabel(tmp_path, dtype):
    # RAS affine with a permutation: voxel i runs +y (Anterior), j runs -x (patient Left), k runs +z (Superior)
    affine = np.array([[0.0, -0.8, 0.0, 40.0], [2.5, 0.0, 0.0, -30.0], [0.0, 0.0, 0.7, 5.0], [0, 0, 0, 1]])
    data = np.arange(5 * 6 * 7, dtype=dtype).reshape(5, 6, 7)  # nibabel order (i, j, k)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "n.nii.gz")
    raw = read_image(tmp_path / "n.nii.gz", reorient=False)
    assert raw.array.shape == (7, 6, 5) and raw.array.dtype == dtype
    canon = read_image(tmp_path / "n.nii.gz")
    ijk = np.array([[0, 0, 0], [4, 5, 6], [1, 2, 3]])
    ras = (affine @ np.c_[ijk, np.ones(3)].T).T[:, :3]
    lps_array_order = np.c_[ras[:, 2], -ras[:, 1], -ras[:, 0]]  # (S, P, L)
    np.testing.assert_allclose(voxel_to_world(raw, ijk[:, ::-1]), lps_array_order, atol=1e-4)
    for (i, j, k), world in zip(ijk, lps_array_order):
        assert raw.array[k, j, i] == data[i, j, k]
        # find the canonical index of that world point and check the voxel value followed it
        idx = np.linalg.solve(canon.direction.T, world - np.asarray(canon.origin)) / np.asarray(canon.spacing)
        assert canon.array[tuple(np.round(idx).astype(int))] == data[i, j, k]
    # axis 0 -> S is k (0.7 mm), axis 1 -> P is i reversed (i runs Anterior), axis 2 -> L is j as it is
    np.testing.assert_allclose(canon.spacing, (0.7, 2.5, 0.8), atol=1e-5)
    np.testing.assert_allclose(canon.direction, np.eye(3), atol=1e-6)
    np.testing.assert_array_equal(canon.array, data.transpose(2, 0, 1)[:, ::-1, :])
