"""Foreground z-score (``medicalnet_mri``, ``mri_zscore``) after resampling (issue 10): the same MRI stored as NRRD
(spacing 6.499999999999998) and as NIfTI (6.5) must prepare to the same array, its background exactly 0.

Linear resampling of a zero background next to the foreground leaves residues of 2e-28 to 8e-13 when the zoom is a
hair off 1; counted as foreground they shifted mean and std of every voxel and were themselves z-scored to about
-mean/std."""

import numpy as np
import pytest

from medtransfer.data.io import read_image, write_image
from medtransfer.data.preprocess import PRESETS, NonZeroZScore, Resample, build_pipeline
from medtransfer.data.types import Image
from medtransfer.errors import MedTransferError


def _mri(shape=(24, 24, 24)) -> np.ndarray:
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    r = np.sqrt((z - 11.3) ** 2 + (y - 12.1) ** 2 + (x - 11.7) ** 2)
    return np.where(r < 8, 200 + 100 * rng.random(shape), 0).astype(np.float32)


def _image(array, spacing):
    return Image(array=array, spacing=spacing, origin=(0.0, 0.0, 0.0), direction=np.eye(3))


def test_nonzero_zscore_by_hand():
    # foreground {2, 4}: mean 3, population std 1; the 1e-13 residue is background (0), -2 is scaled, not counted
    x = np.array([[[0.0, 1e-13, 2.0, 4.0, -2.0]]], dtype=np.float64)
    out = NonZeroZScore()(Image(array=x, spacing=(1.0,) * 3, origin=(0.0,) * 3, direction=np.eye(3))).array
    np.testing.assert_array_equal(out, np.array([[[0.0, 0.0, -1.0, 1.0, -5.0]]], dtype=np.float32))
    assert out.dtype == np.float32
    # the rule with rel_threshold=0 is MedicalNet's literal "> 0": the residue becomes a foreground voxel
    literal = NonZeroZScore(0.0)(Image(array=x, spacing=(1.0,) * 3, origin=(0.0,) * 3, direction=np.eye(3))).array
    assert literal[0, 0, 1] != 0
    with pytest.raises(MedTransferError, match=r"rel_threshold=1.5 must lie in \[0, 1\)"):
        NonZeroZScore(1.5)


def test_same_scan_as_nrrd_and_nifti_prepares_identically(tmp_path):
    array = _mri()
    nrrd = write_image(_image(array, (6.499999999999998,) * 3), tmp_path / "scan.nrrd")
    nifti = write_image(_image(array, (6.5,) * 3), tmp_path / "scan.nii.gz")
    a, b = read_image(nrrd), read_image(nifti)
    assert a.spacing[0] == 6.499999999999998 and b.spacing[0] == 6.5  # the property: spacings a hair apart
    resampled = Resample((4.0, 4.0, 4.0))(a).array
    residue = (resampled > 0) & (resampled < 1e-6)
    assert residue.sum() > 0  # resampling noise in the background of the NRRD copy
    for name in ("medicalnet_mri", "mri_zscore"):
        pipeline = build_pipeline(preset=name, spacing=(4.0, 4.0, 4.0))
        pa, pb = pipeline(a).array, pipeline(b).array
        assert pa.shape == pb.shape == (39, 39, 39)
        np.testing.assert_allclose(pa, pb, rtol=0, atol=1e-5)
        assert (pa[residue] == 0).all() and (pa[Resample((4.0,) * 3)(b).array == 0] == 0).all()
        fg = pa[pa != 0]
        assert abs(float(fg.mean())) < 1e-4 and abs(float(fg.std()) - 1) < 1e-4  # z-scored over the foreground


def test_mri_zscore_is_the_foreground_step_under_its_own_name():
    assert PRESETS["mri_zscore"] == PRESETS["medicalnet_mri"] == NonZeroZScore(1e-6)
    assert build_pipeline(preset="mri_zscore").to_dict() == {
        "steps": [{"type": "nonzero_zscore", "rel_threshold": 1e-6}]}
