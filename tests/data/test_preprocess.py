"""Preprocessing steps: hand-checked resampling, exact preset values, inclusive crops, records and round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medtransfer.errors import DataError, MedTransferError
from medtransfer.data.preprocess import (
    CropForeground,
    CTWindow,
    NonZeroZScore,
    PercentileClip,
    Pipeline,
    Reorient,
    Resample,
    ZScore,
    preset,
    uncrop,
)
from medtransfer.data.types import Image


def make(array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None, path=None) -> Image:
    array = np.asarray(array)
    n = len(spacing)
    return Image(array, tuple(spacing), tuple(origin), np.eye(n) if direction is None else np.asarray(direction),
                 path=path)


def world(image: Image) -> np.ndarray:
    """World position (array order) of every voxel, shape (N, 3), in C order of the array."""
    idx = np.indices(image.spatial_shape).reshape(image.spatial_dims, -1).T.astype(float)
    return np.asarray(image.origin) + (idx * np.asarray(image.spacing)) @ np.asarray(image.direction)


# ----------------------------------------------------------------------------------------------- resampling


def test_resample_half_spacing_doubles_the_grid_and_keeps_geometry():
    x = np.broadcast_to(np.arange(4, dtype=np.float32), (4, 4, 4))
    image = make(x, spacing=(2.0, 2.0, 2.0), origin=(-5.0, 3.25, 7.5))
    out = Resample((1.0, 1.0, 1.0))(image)
    assert out.array.shape == (8, 8, 8)
    assert out.array.dtype == np.float32
    assert out.spacing == (1.0, 1.0, 1.0)
    assert out.origin == (-5.0, 3.25, 7.5)
    np.testing.assert_array_equal(out.direction, np.eye(3))
    # output voxel i sits at input index i/2; past the last input voxel the edge value extends
    np.testing.assert_allclose(out.array[3, 5], [0, 0.5, 1, 1.5, 2, 2.5, 3, 3], atol=1e-6)
    assert out.meta["preprocess"] == [
        {"step": "resample", "spacing_before": [2.0, 2.0, 2.0], "shape_before": [4, 4, 4], "order": 1}
    ]


def test_resample_downsampling_picks_every_other_voxel_and_rounds_shapes():
    x = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    out = Resample(2.0)(make(x))
    assert out.array.shape == (4, 4, 4)
    np.testing.assert_allclose(out.array, x[::2, ::2, ::2], atol=1e-6)
    # shape = round(shape * old / new): 5 * 1.5 / 2 = 3.75 -> 4; a None axis keeps its spacing
    odd = Resample((2.0, None, 0.5)).target(make(np.zeros((5, 6, 3)), spacing=(1.5, 1.0, 1.0)))
    assert odd == ((2.0, 1.0, 0.5), (4, 6, 6))


@pytest.mark.parametrize("order", [1, 3])
def test_resample_keeps_a_constant_volume_constant(order):
    out = Resample((0.7, 1.3, 0.5), order=order)(make(np.full((4, 5, 6), -321.5, np.float32)))
    assert out.array.shape == (6, 4, 12)  # round(4/0.7)=6, round(5/1.3)=4, round(6/0.5)=12
    np.testing.assert_allclose(out.array, -321.5, rtol=0, atol=1e-3)


def test_resample_labels_are_nearest_and_keep_their_value_set():
    rng = np.random.default_rng(1)
    label = rng.choice(np.array([0, 2, 7], dtype=np.uint8), size=(4, 4, 4))
    image = make(rng.normal(size=(4, 4, 4)), spacing=(2, 2, 2))
    out_image, out_label = Resample(1.0, order=3).pair(image, make(label, spacing=(2, 2, 2)))
    assert out_label.array.dtype == np.uint8
    assert out_label.array.shape == out_image.array.shape == (8, 8, 8)
    assert set(np.unique(out_label.array)) == {0, 2, 7}
    np.testing.assert_array_equal(out_label.array[::2, ::2, ::2], label)  # integer positions hit input voxels
    assert out_label.spacing == (1.0, 1.0, 1.0)


def test_resample_moves_channels_together():
    x = np.stack([np.zeros((4, 4, 4)), np.ones((4, 4, 4))]).astype(np.float32)
    out = Resample(1.0)(make(x, spacing=(2, 2, 2)))
    assert out.array.shape == (2, 8, 8, 8)
    assert out.array[0].max() == 0 and out.array[1].min() == 1


def test_resample_rejects_a_bad_order_and_a_label_on_another_grid():
    with pytest.raises(MedTransferError, match="order=2"):
        Resample(1.0, order=2)
    with pytest.raises(DataError, match=r"seg\.nii\.gz: label shape \(4, 4, 3\) differs"):
        Resample(1.0).pair(make(np.zeros((4, 4, 4))), make(np.zeros((4, 4, 3)), path="seg.nii.gz"))


# ----------------------------------------------------------------------------------------------- reorientation


def test_reorient_makes_direction_identity_and_keeps_every_voxel_in_place():
    rng = np.random.default_rng(2)
    # array axis 0 runs along -x(L), axis 1 along +S (the first world coordinate), axis 2 along -P
    direction = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    image = make(rng.normal(size=(3, 4, 5)), spacing=(1.0, 2.0, 3.0), origin=(10.0, 20.0, 30.0), direction=direction)
    label = make((image.array > 0).astype(np.uint8), image.spacing, image.origin, direction)
    out, out_label = Reorient().pair(image, label)
    np.testing.assert_array_equal(out.direction, np.eye(3))
    assert out.array.shape == (4, 5, 3)
    assert out.spacing == (2.0, 3.0, 1.0)
    # the same world positions carry the same values
    before = {tuple(np.round(p, 6)): v for p, v in zip(world(image), image.array.ravel())}
    after = {tuple(np.round(p, 6)): v for p, v in zip(world(out), out.array.ravel())}
    assert before == after
    np.testing.assert_array_equal(out_label.array, (out.array > 0).astype(np.uint8))
    assert out.meta["preprocess"][0]["permutation"] == [1, 2, 0]
    assert out.meta["preprocess"][0]["flips"] == [False, True, True]


def test_reorient_is_a_no_op_on_canonical_images():
    x = np.arange(24.0).reshape(2, 3, 4)
    out = Reorient()(make(x, origin=(1, 2, 3)))
    np.testing.assert_array_equal(out.array, x)
    assert out.origin == (1.0, 2.0, 3.0)


# ----------------------------------------------------------------------------------------------- intensity


def test_genesis_and_volf_ct_windows_exact():
    hu = np.array([[[-3000.0, -1000.0, -500.0, 0.0, 500.0, 1000.0, 2500.0]]], dtype=np.float32)
    genesis = preset("genesis_ct")(make(hu)).array.ravel()
    np.testing.assert_array_equal(genesis, [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    volf = preset("volf_ct")(make(hu)).array.ravel()
    np.testing.assert_array_equal(volf, [-1.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.0])
    assert genesis.dtype == np.float32
    assert preset("genesis_ct") == CTWindow(-1000, 1000, (0.0, 1.0))
    assert CTWindow(lo=-160, hi=240)(make(np.array([[[40.0]]]))).array.item() == pytest.approx(0.5)


def test_medicalnet_nonzero_zscore_keeps_background_at_zero():
    rng = np.random.default_rng(3)
    x = np.zeros((6, 6, 6), dtype=np.float32)
    x[1:5, 1:5, 1:5] = rng.uniform(10, 500, size=(4, 4, 4))
    out = preset("medicalnet_mri")(make(x)).array
    assert isinstance(preset("medicalnet_mri"), NonZeroZScore)
    assert np.all(out[x == 0] == 0)
    inside = out[x > 0]
    assert inside.mean() == pytest.approx(0.0, abs=1e-6)
    assert inside.std() == pytest.approx(1.0, abs=1e-5)
    # hand-made: non-zero voxels 1 and 3 -> mean 2, std 1
    np.testing.assert_allclose(NonZeroZScore()(make(np.array([[[0.0, 1.0, 3.0, 0.0]]]))).array, [[[0, -1, 1, 0]]])
    # deterministic: no background noise
    np.testing.assert_array_equal(out, preset("medicalnet_mri")(make(x)).array)


def test_zscore_whole_volume_with_pymic_epsilon():
    x = np.array([[[1.0, 2.0, 3.0, 4.0]]])
    out = preset("zscore")(make(x)).array.ravel()
    expected = (x.ravel() - 2.5) / (np.sqrt(1.25) + 1e-5)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert preset("zscore") == ZScore(1e-5)


def test_percentile_clip_scales_the_central_range_to_unit_interval():
    x = np.arange(1001, dtype=np.float32).reshape(1, 1, 1001)  # 0.5th percentile = 5, 99.5th = 995
    out = preset("percentile")(make(x)).array.ravel()
    assert out[0] == 0.0 and out[5] == 0.0 and out[-1] == 1.0 and out[995] == 1.0
    assert out[500] == pytest.approx(0.5)
    assert preset("percentile") == PercentileClip(0.5, 99.5)
    assert np.all(PercentileClip()(make(np.full((2, 2, 2), 7.0))).array == 0)  # constant image: no NaN


def test_intensity_statistics_are_per_channel():
    x = np.stack([np.full((2, 2, 2), 5.0), np.arange(8.0).reshape(2, 2, 2)])
    out = ZScore()(make(x)).array
    np.testing.assert_allclose(out[0], 0.0)
    assert out[1].mean() == pytest.approx(0.0, abs=1e-6)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(MedTransferError, match="unknown intensity preset 'ct'.*genesis_ct.*volf_ct"):
        preset("ct")


# ----------------------------------------------------------------------------------------------- cropping


def test_crop_foreground_box_includes_the_last_voxel_and_records_the_box():
    x = np.full((6, 7, 8), -1000.0, dtype=np.float32)
    x[2:4, 1:7, 3:8] = 40.0  # foreground reaches the last index of axes 1 and 2
    image = make(x, spacing=(2.0, 1.0, 0.5), origin=(100.0, 0.0, -4.0))
    out = CropForeground(threshold=-500)(image)
    assert out.array.shape == (2, 6, 5)
    assert np.all(out.array == 40.0)
    assert out.origin == (104.0, 1.0, -2.5)  # origin moves to the first kept voxel
    record = out.meta["preprocess"][-1]
    assert record == {"step": "crop_foreground", "box": [[2, 4], [1, 7], [3, 8]], "shape_before": [6, 7, 8]}
    np.testing.assert_array_equal(uncrop(out.array, record, value=-1000.0), x)


def test_crop_foreground_margin_is_clipped_and_label_source_works():
    label = np.zeros((10, 10, 10), dtype=np.uint8)
    label[4, 5, 9] = 3
    image = make(np.zeros((10, 10, 10)))
    out, out_label = CropForeground(margin=2, source="label").pair(image, make(label))
    assert out.array.shape == out_label.array.shape == (5, 5, 3)  # [2, 7), [3, 8), [7, 10)
    assert out_label.array[2, 2, 2] == 3
    with pytest.raises(MedTransferError, match="needs the label"):
        CropForeground(source="label")(image)


def test_crop_foreground_without_foreground_keeps_the_volume():
    x = np.full((3, 3, 3), -1000.0)
    out = CropForeground()(make(x))
    assert out.array.shape == (3, 3, 3)
    assert out.meta["preprocess"][-1]["box"] == [[0, 3], [0, 3], [0, 3]]


# ----------------------------------------------------------------------------------------------- pipeline


def test_pipeline_to_dict_from_dict_round_trip_through_json():
    pipeline = Pipeline([
        Reorient(), Resample((1.5, None, 0.8), order=3), CropForeground(-500.0, margin=(1, 2, 3)),
        preset("volf_ct"), NonZeroZScore(), ZScore(), PercentileClip(1.0, 99.0),
    ])
    data = json.loads(json.dumps(pipeline.to_dict()))
    assert data["steps"][1] == {"type": "resample", "spacing": [1.5, None, 0.8], "order": 3}
    assert data["steps"][3] == {"type": "ct_window", "lo": -1000.0, "hi": 1000.0, "out": [-1.0, 1.0]}
    rebuilt = Pipeline.from_dict(data)
    assert rebuilt == pipeline
    assert rebuilt.to_dict() == pipeline.to_dict()
    with pytest.raises(MedTransferError, match="unknown preprocessing step 'blur'"):
        Pipeline.from_dict({"steps": [{"type": "blur"}]})


def test_pipeline_applies_steps_in_order_and_records_each():
    x = np.full((4, 4, 4), -1000.0, dtype=np.float32)
    x[1:3, 1:3, 1:3] = 1000.0
    label = (x > 0).astype(np.uint8)
    pipeline = Pipeline([CropForeground(), Resample(0.5, order=1), preset("genesis_ct")])
    image, lab = pipeline.pair(make(x), make(label))
    assert image.array.shape == lab.array.shape == (4, 4, 4)
    assert np.all(image.array == 1.0) and np.all(lab.array == 1)
    assert [r["step"] for r in image.meta["preprocess"]] == ["crop_foreground", "resample", "ct_window"]
    assert "preprocess" not in make(x).meta  # the input image is not modified


def test_build_pipeline_resamples_then_applies_the_preset():
    from medtransfer.data.preprocess import CTWindow, Resample, build_pipeline

    pipe = build_pipeline(preset="volf_ct", spacing=(2, 2, 2))
    assert pipe.steps == (Resample((2.0, 2.0, 2.0), order=1), CTWindow(-1000.0, 1000.0, out=(-1.0, 1.0)))
    assert build_pipeline(preset=None).steps == ()
