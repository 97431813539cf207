"""Output names and formats of predictions: known extensions stripped, clashes refused before writing, NIfTI
sform/qform codes kept, each output format written with the input's geometry."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medtransfer.data.io import image_stem, output_extension, plan_output_paths, read_image, write_image
from medtransfer.data.types import Image
from medtransfer.errors import DataError


@pytest.mark.parametrize("name, stem", [
    ("sub-01.ses-1.nii.gz", "sub-01.ses-1"), ("sub-01.ses-1.nii", "sub-01.ses-1"), ("a.b.NRRD", "a.b"),
    ("scan.nhdr", "scan"), ("x.y.mha", "x.y"), ("x.mhd", "x"), ("IM0001", "IM0001"), ("slice.1.dcm", "slice.1"),
    ("case.v2", "case.v2"), ("img.PNG", "img"), ("a.npz", "a"), ("b.npy", "b"), ("c.jpeg", "c"), (".nii.gz", ".nii.gz"),
])
def test_image_stem_strips_only_known_image_extensions(name, stem):
    assert image_stem(name) == stem
    assert image_stem(f"/data/{name}") == stem


def test_plan_output_paths_keeps_order_and_format(tmp_path):
    inputs = [tmp_path / "a" / "sub-01.ses-1.nii.gz", tmp_path / "b" / "ct.nrrd", tmp_path / "c.mha"]
    assert plan_output_paths(inputs, tmp_path / "out") == [
        tmp_path / "out" / "sub-01.ses-1.nii.gz", tmp_path / "out" / "ct.nii.gz", tmp_path / "out" / "c.nii.gz"]
    assert plan_output_paths(inputs, "o", "nrrd", suffix="_seg") == [
        Path("o") / n for n in ("sub-01.ses-1_seg.nrrd", "ct_seg.nrrd", "c_seg.nrrd")]
    assert [p.name for p in plan_output_paths(inputs, "o", "mha")] == ["sub-01.ses-1.mha", "ct.mha", "c.mha"]
    dicom_dir = tmp_path / "series1"
    dicom_dir.mkdir()
    same = plan_output_paths([*inputs, tmp_path / "d.nhdr", tmp_path / "e.dcm", dicom_dir, tmp_path / "f.png"],
                             tmp_path / "out", "same")
    assert [p.name for p in same] == ["sub-01.ses-1.nii.gz", "ct.nrrd", "c.mha", "d.nrrd", "e.nii.gz",
                                      "series1.nii.gz", "f.png"]
    assert plan_output_paths(inputs, tmp_path / "out") == plan_output_paths(inputs, tmp_path / "out")


@pytest.mark.parametrize("names, fmt", [
    (["a/scan.nrrd", "b/scan.nrrd"], "nii.gz"),
    (["x.nii.gz", "x.mha"], "nii.gz"),
    (["d1/Scan.nii.gz", "d2/scan.nii.gz"], "nii.gz"),  # one file on case-insensitive file systems
    (["a/x.mha", "b/x.mha"], "same"),
])
def test_colliding_outputs_are_refused_naming_both_inputs(tmp_path, names, fmt):
    inputs = [tmp_path / n for n in names]
    with pytest.raises(DataError, match="output names clash, nothing was written") as err:
        plan_output_paths(inputs, tmp_path / "out", fmt)
    message = str(err.value)
    assert str(inputs[0]) in message and str(inputs[1]) in message
    assert "separate --out folders" in message and "Rename" in message
    assert not (tmp_path / "out").exists()


def test_output_that_would_replace_its_input_is_refused(tmp_path):
    scan = tmp_path / "scan.nii.gz"
    with pytest.raises(DataError, match=f"would replace the input {scan}"):
        plan_output_paths([scan], tmp_path)
    assert plan_output_paths([scan], tmp_path, suffix="_seg") == [tmp_path / "scan_seg.nii.gz"]
    with pytest.raises(DataError, match="given twice"):
        plan_output_paths([scan, tmp_path / "." / "scan.nii.gz"], tmp_path / "out")
    with pytest.raises(DataError, match="unknown output format 'dicom'"):
        output_extension(scan, "dicom")


def _oblique_image():
    angle = np.deg2rad(10)
    c, s = np.cos(angle), np.sin(angle)
    direction = np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])[:, ::-1] * [1, 1, -1]  # flipped and oblique
    arr = np.random.default_rng(0).integers(-1000, 1000, (6, 7, 8)).astype(np.int16)
    return Image(arr, (3.0, 0.8, 0.7), (10.0, -20.5, 33.0), direction)


@pytest.mark.parametrize("fmt", ["nii.gz", "nrrd", "mha", "same"])
def test_each_output_format_keeps_the_input_geometry(tmp_path, fmt):
    source = tmp_path / "in.nrrd"
    write_image(_oblique_image(), source)
    original = read_image(source)
    pred = Image((original.array > 0).astype(np.uint8), original.spacing, original.origin, original.direction)
    [out] = plan_output_paths([source], tmp_path / "out", fmt)
    write_image(pred, out, like=original)
    assert out.suffix == {"nii.gz": ".gz", "nrrd": ".nrrd", "mha": ".mha", "same": ".nrrd"}[fmt]
    a, b = sitk.ReadImage(str(source)), sitk.ReadImage(str(out))
    assert b.GetSize() == a.GetSize()
    np.testing.assert_allclose(b.GetSpacing(), a.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(b.GetOrigin(), a.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(b.GetDirection(), a.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(b), (sitk.GetArrayFromImage(a) > 0).astype(np.uint8))


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
@pytest.mark.parametrize("sform_code, qform_code", [(4, 1), (2, 0), (0, 1), (3, 2)])
def test_label_map_keeps_the_nifti_sform_and_qform_codes(tmp_path, ext, sform_code, qform_code):
    affine = np.array([[-2.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.5, -72], [0, 0, 0, 1]])  # MNI-like, flipped x
    data = np.random.default_rng(1).normal(size=(9, 8, 7)).astype(np.float32)
    img = nib.Nifti1Image(data, affine)
    img.header.set_sform(affine, code=sform_code)
    img.header.set_qform(affine, code=qform_code)
    nib.save(img, tmp_path / f"t1{ext}")
    original = read_image(tmp_path / f"t1{ext}")
    assert original.meta["nifti_codes"] == {"sform_code": sform_code, "qform_code": qform_code}
    label = Image((original.array > 0).astype(np.uint8), original.spacing, original.origin, original.direction)
    out = write_image(label, tmp_path / f"seg{ext}", like=original)
    written = nib.load(out)
    assert (int(written.header["sform_code"]), int(written.header["qform_code"])) == (sform_code, qform_code)
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    if sform_code:
        np.testing.assert_allclose(written.get_sform(), affine, atol=1e-5)
    if qform_code:
        np.testing.assert_allclose(written.get_qform(), affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(written.dataobj), (data > 0).astype(np.uint8))
    assert read_image(out).meta["nifti_codes"] == {"sform_code": sform_code, "qform_code": qform_code}
