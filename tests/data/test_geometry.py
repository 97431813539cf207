"""Results on a prepared grid go back onto the input grid by world coordinates (issue 10, "labels back in the right
place"): one-hot "probabilities" of a known label map are pushed through reorient + resample + crop and mapped back,
independently of any network."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medtransfer.data.geometry import Grid, index_map, labels_back, original_grid, to_original_grid
from medtransfer.data.preprocess import CropForeground, Pipeline, Reorient, Resample, ZScore
from medtransfer.data.types import Image

SPACING = (5.0, 0.7, 0.7)  # array order (z, y, x): 0.7 x 0.7 mm in-plane, 5 mm slices
SHAPE = (20, 48, 48)
ORIGIN = (10.0, -20.0, 5.0)
# ellipsoids (centre and radii in mm, array order): three labels of different size and shape
BLOBS = [((40, 14, 16), (14, 8, 9)), ((60, 22, 12), (18, 6, 5)), ((45, 20, 24), (12, 5, 7))]


def _rotation(degrees: float) -> np.ndarray:
    a, b = np.deg2rad(degrees), np.deg2rad(degrees / 2)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return rx @ ry


DIRECTIONS = {
    "anisotropic": np.eye(3),
    "flipped": np.diag([-1.0, 1.0, -1.0]),
    "oblique": _rotation(25.0),
    "permuted_flipped": np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]]),
}


def _label_map() -> np.ndarray:
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(SHAPE, SPACING)], indexing="ij")
    label = np.zeros(SHAPE, np.uint8)
    for value, (centre, radii) in enumerate(BLOBS, 1):
        inside = sum(((c - m) / r) ** 2 for c, m, r in zip((z, y, x), centre, radii)) < 1
        label[inside] = value
    return label


def _one_hot(label: np.ndarray, k: int = 4) -> np.ndarray:
    return np.stack([(label == c).astype(np.float32) for c in range(k)])


def _centroids(label: np.ndarray) -> np.ndarray:
    return np.array([np.argwhere(label == v).mean(0) for v in range(1, len(BLOBS) + 1)])


def _images(direction: np.ndarray):
    label = _label_map()
    # the "image" is the one-hot of the label, so the pipeline's linear resampling makes soft probabilities of it
    image = Image(_one_hot(label), SPACING, ORIGIN, direction)
    return image, Image(label, SPACING, ORIGIN, direction)


def test_world_and_index_are_inverse_and_match_the_image_convention():
    grid = Grid((4, 5, 6), SPACING, ORIGIN, _rotation(30.0))
    idx = np.array([[0.0, 0.0, 0.0], [1.5, 2.0, -3.0], [3.0, 4.0, 5.0]])
    world = grid.to_world(idx)
    expected = np.asarray(ORIGIN) + _rotation(30.0).T @ (idx[1] * np.asarray(SPACING))
    np.testing.assert_allclose(world[1], expected)  # Image docstring: origin + direction.T @ (idx * spacing)
    np.testing.assert_allclose(grid.to_index(world), idx, atol=1e-12)
    coarse = Grid((2, 3, 3), (10.0, 1.4, 2.1), ORIGIN, _rotation(30.0))
    matrix, offset = index_map(grid, coarse)  # index on `grid` of each voxel of `coarse`
    np.testing.assert_allclose(matrix, np.diag([2.0, 2.0, 3.0]), atol=1e-12)
    np.testing.assert_allclose(offset, 0.0, atol=1e-12)


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_reorient_and_crop_round_trip_is_exact(name):
    image, label = _images(DIRECTIONS[name])
    pipeline = Pipeline((Reorient(), CropForeground(source="label", margin=2), ZScore()))
    prepared, prepared_label = pipeline.pair(image, label)
    assert prepared_label.spatial_shape != SHAPE  # the crop (and for some, the axis permutation) changed the grid
    back = to_original_grid(_one_hot(prepared_label.array), prepared, image)
    np.testing.assert_array_equal(back, label.array)
    assert original_grid(Grid.of(prepared), prepared.meta["preprocess"]).same_as(Grid.of(image))


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_pipeline_round_trip_lands_on_the_same_world_positions(name):
    image, label = _images(DIRECTIONS[name])
    # 5 mm slices to 2 mm, 0.7 mm to 1 mm, on whichever axis Reorient puts them
    target = tuple(2.0 if s > 1 else 1.0 for s in Reorient()(image).spacing)
    pipeline = Pipeline((Reorient(), Resample(target), CropForeground(source="label", margin=2)))
    prepared, _ = pipeline.pair(image, label)
    assert prepared.spatial_shape != SHAPE
    back = to_original_grid(prepared.array, prepared, image)
    assert back.shape == SHAPE
    error = np.abs(_centroids(back) - _centroids(label.array))  # in voxels of the original grid
    assert error.max() < 0.1, error
    # the same in world coordinates: every label's centroid within 0.1 voxel (0.07 mm in-plane, 0.5 mm across)
    grid = Grid.of(image)
    shift = grid.to_world(_centroids(back)) - grid.to_world(_centroids(label.array))
    assert np.linalg.norm(shift, axis=1).max() < 0.1 * 5.0


def _old_zoom_back(prepared_label: np.ndarray, shape) -> np.ndarray:
    """What predict did before: nearest-neighbour ndimage.zoom with grid_mode=True onto the input shape."""
    zoom = [o / p for o, p in zip(shape, prepared_label.shape)]
    return ndimage.zoom(prepared_label, zoom, order=0, grid_mode=True, mode="nearest")


def test_old_zoom_method_misplaces_labels_that_the_world_mapping_keeps():
    image, label = _images(np.eye(3))
    prepared, prepared_label = Pipeline((Resample((2.0, 1.0, 1.0)),)).pair(image, label)
    new = to_original_grid(prepared.array, prepared, image)
    old = _old_zoom_back(prepared_label.array, SHAPE)
    assert np.abs(_centroids(new) - _centroids(label.array)).max() < 0.1
    assert np.abs(_centroids(old) - _centroids(label.array)).max() > 0.3


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_resample_round_trip_dice_of_a_lesion_beats_the_old_zoom():
    # an irregular lesion at 1 mm, resampled to 3 mm (nearest, as the Resample step does with labels) and back
    rng = np.random.default_rng(0)
    noise = ndimage.gaussian_filter(rng.standard_normal((40, 40, 40)), 4)
    z, y, x = np.mgrid[:40, :40, :40]
    lesion = ((z - 19.3) ** 2 + (y - 21.0) ** 2 + (x - 18.6) ** 2 < 100) & (noise > -0.05)
    lesion = ndimage.binary_opening(lesion, iterations=1).astype(np.uint8)
    image = Image(lesion, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    prepared = Resample((3.0, 3.0, 3.0), order=0)(image)
    assert prepared.spatial_shape == (13, 13, 13)
    new = to_original_grid(_one_hot(prepared.array, 2), prepared, image)
    old = _old_zoom_back(prepared.array, lesion.shape)
    assert new.shape == old.shape == lesion.shape
    new_dice, old_dice = _dice(new, lesion), _dice(old, lesion)
    assert new_dice > old_dice + 0.02, (new_dice, old_dice)


def test_one_sigmoid_channel_and_outside_the_crop_is_background():
    image, label = _images(DIRECTIONS["flipped"])
    binary = Image((label.array > 0).astype(np.uint8), SPACING, ORIGIN, DIRECTIONS["flipped"])
    prepared, prepared_label = Pipeline((Reorient(), CropForeground(source="label"))).pair(image, binary)
    p = prepared_label.array[None].astype(np.float32)  # one channel: the foreground probability
    back = labels_back(p, Grid.of(prepared), prepared.meta["preprocess"], Grid.of(image))
    np.testing.assert_array_equal(back, binary.array)
    everywhere = np.ones_like(p)  # probability 1 inside the box; outside it the model saw nothing
    back = labels_back(everywhere, Grid.of(prepared), prepared.meta["preprocess"])
    (lo, hi), = [(min(a), max(a) + 1) for a in [np.nonzero(binary.array.any((1, 2)))[0]]]
    assert back[lo:hi].any(axis=(1, 2)).all() and not back[:lo].any() and not back[hi:].any()


def test_records_that_do_not_lead_to_the_given_grid_are_refused():
    from medtransfer.errors import DataError

    image, label = _images(np.eye(3))
    prepared = Resample((2.0, 1.0, 1.0))(image)
    other = Grid(SHAPE, SPACING, (0.0, 0.0, 0.0), np.eye(3))
    with pytest.raises(DataError, match="do not belong together"):
        labels_back(prepared.array, Grid.of(prepared), prepared.meta["preprocess"], other)


def test_resample_between_rotated_grids_matches_simpleitk():
    import SimpleITK as sitk

    from medtransfer.data.geometry import resample_to
    from medtransfer.data.io import image_to_sitk

    rng = np.random.default_rng(1)
    values = ndimage.gaussian_filter(rng.standard_normal((12, 20, 24)), 2).astype(np.float32)
    src = Image(values, (3.0, 1.2, 1.0), (5.0, -3.0, 2.0), _rotation(20.0))
    dst = Image(np.zeros((10, 16, 18), np.float32), (2.5, 1.1, 1.3), (8.0, 1.0, 6.0), _rotation(-15.0))
    ours = resample_to(values, Grid.of(src), Grid.of(dst))
    ref = sitk.GetArrayFromImage(sitk.Resample(image_to_sitk(src), image_to_sitk(dst), sitk.Transform(),
                                               sitk.sitkLinear, np.nan, sitk.sitkFloat32))
    inside = np.isfinite(ref)  # SimpleITK leaves points outside the source grid at the default value
    assert inside.mean() > 0.5
    np.testing.assert_allclose(ours[inside], ref[inside], atol=1e-5)
