"""Boxes: voxel <-> world against SimpleITK on flipped, permuted, anisotropic and oblique grids; boxes from
hand-drawn masks; IoU, clipping; prepared boxes through the cache land on the same world position."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medtransfer.data.boxes import (
    box_centres,
    box_iou,
    boxes_from_mask,
    boxes_to_original,
    clip_boxes,
    voxel_to_world,
    world_to_voxel,
)
from medtransfer.data.cache import PreparedCache
from medtransfer.data.geometry import Grid
from medtransfer.data.io import read_image, write_image
from medtransfer.data.io_common import image_to_sitk
from medtransfer.data.preprocess import CropForeground, CTWindow, Pipeline, Resample
from medtransfer.data.types import Case, Dataset, Image
from medtransfer.errors import DataError


def rotation(angle_deg: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


GRIDS = {
    "identity": Grid((10, 12, 14), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3)),
    "flipped": Grid((10, 12, 14), (2.0, 1.5, 1.0), (30.0, -4.0, 12.0), np.diag([-1.0, 1.0, -1.0])),
    "permuted": Grid((10, 12, 14), (2.0, 1.5, 1.0), (1.0, 2.0, 3.0), np.array([[0, 1.0, 0], [0, 0, -1.0],
                                                                              [1.0, 0, 0]])),
    "anisotropic": Grid((8, 20, 20), (5.0, 0.7, 0.7), (-100.0, 20.5, -33.25), np.diag([1.0, -1.0, 1.0])),
}
OBLIQUE = Grid((8, 20, 20), (5.0, 0.7, 0.7), (-10.0, 2.0, 3.0), rotation(20.0))

BOXES = np.array([[2.0, 3.0, 4.0, 5.0, 7.0, 6.0], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0], [1.25, 2.5, 0.5, 7.75, 9.0, 13.0]])


def sitk_grid(grid: Grid) -> sitk.Image:
    return image_to_sitk(Image(np.zeros(grid.shape, np.float32), grid.spacing, grid.origin, grid.direction))


def sitk_world_boxes(boxes: np.ndarray, grid: Grid) -> np.ndarray:
    """cccwhd by SimpleITK: its continuous index is (x, y, z) = reversed array order and puts the centre of voxel i
    at i, where our box coordinates put it at i + 0.5."""
    img = sitk_grid(grid)
    out = []
    for box in boxes:
        pts = np.array([img.TransformContinuousIndexToPhysicalPoint([float(v) - 0.5 for v in corner[::-1]])
                        for corner in itertools.product(*zip(box[:3], box[3:]))])  # fmt: skip
        lo, hi = pts.min(0), pts.max(0)
        out.append([*((lo + hi) / 2), *(hi - lo)])
    return np.array(out)


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_voxel_to_world_matches_simpleitk_and_round_trips(name):
    grid = GRIDS[name]
    world = voxel_to_world(BOXES, grid)
    np.testing.assert_allclose(world, sitk_world_boxes(BOXES, grid), atol=1e-9)
    np.testing.assert_allclose(world_to_voxel(world, grid), BOXES, atol=1e-9)
    np.testing.assert_allclose(voxel_to_world(world_to_voxel(world, grid), grid), world, atol=1e-9)


def test_anisotropic_box_sizes_are_spacing_times_voxels():
    world = voxel_to_world([[1, 2, 3, 3, 12, 4]], GRIDS["anisotropic"])  # 2 x 10 x 1 voxels (z, y, x)
    np.testing.assert_allclose(world[0, 3:], [0.7, 7.0, 10.0])  # w (x), h (y), d (z) in mm


def test_single_voxel_box_is_centred_on_the_voxel_centre():
    grid = GRIDS["flipped"]
    world = voxel_to_world([[4, 5, 6, 5, 6, 7]], grid)
    centre = sitk_grid(grid).TransformIndexToPhysicalPoint([6, 5, 4])
    np.testing.assert_allclose(world[0, :3], centre, atol=1e-9)
    np.testing.assert_allclose(world[0, 3:], [1.0, 1.5, 2.0])


def test_oblique_grid_keeps_the_centre_exact_and_grows_the_box():
    world = voxel_to_world(BOXES, OBLIQUE)
    img = sitk_grid(OBLIQUE)
    for box, wbox in zip(BOXES, world):
        centre = img.TransformContinuousIndexToPhysicalPoint([float(c) - 0.5 for c in box_centres(box)[::-1]])
        np.testing.assert_allclose(wbox[:3], centre, atol=1e-9)
    np.testing.assert_allclose(world, sitk_world_boxes(BOXES, OBLIQUE), atol=1e-9)
    back = world_to_voxel(world, OBLIQUE)
    np.testing.assert_allclose(box_centres(back), box_centres(BOXES), atol=1e-9)
    assert ((back[:, 3:] - back[:, :3]) > (BOXES[:, 3:] - BOXES[:, :3]) + 1e-6)[:, 1:].all()  # rotated axes grow


def test_2d_boxes_use_x_then_y():
    grid = Grid((64, 80), (0.8, 0.5), (0.0, 0.0), np.eye(2))
    world = voxel_to_world([[10, 20, 30, 60]], grid)  # rows 10..30 (y), columns 20..60 (x)
    np.testing.assert_allclose(world, [[(40 - 0.5) * 0.5, (20 - 0.5) * 0.8, 20.0, 16.0]])
    np.testing.assert_allclose(world_to_voxel(world, grid), [[10, 20, 30, 60]])


def test_wrong_coordinate_count_is_refused():
    with pytest.raises(DataError, match=r"expected \(N, 6\)"):
        voxel_to_world([[1, 2, 3, 4]], GRIDS["identity"])


def test_boxes_from_binary_mask_with_full_connectivity():
    mask = np.zeros((6, 6), np.uint8)
    mask[0, 0] = 1
    mask[1, 1] = 1  # touches (0, 0) at a corner: the same object
    mask[4:6, 2:5] = 1
    mask[0:2, 4:6] = 2
    boxes, labels = boxes_from_mask(mask, instances=False)
    np.testing.assert_array_equal(boxes, [[0, 0, 2, 2], [4, 2, 6, 5], [0, 4, 2, 6]])
    np.testing.assert_array_equal(labels, [1, 1, 2])
    assert labels.dtype == np.int64


def test_boxes_from_instance_mask_keep_split_instances_whole():
    mask = np.zeros((4, 5, 6), np.int16)
    mask[0, 0, 0] = 3
    mask[2, 3, 4] = 3  # one instance in two pieces
    mask[1:3, 1:2, 1:3] = 7
    boxes, labels = boxes_from_mask(mask, instances=True)
    np.testing.assert_array_equal(boxes, [[0, 0, 0, 3, 4, 5], [1, 1, 1, 3, 2, 3]])
    np.testing.assert_array_equal(labels, [1, 1])
    _, labels = boxes_from_mask(mask, instances=True, classes={3: 2, 7: 1})
    np.testing.assert_array_equal(labels, [2, 1])
    with pytest.raises(DataError, match=r"instances \[7\] have no class"):
        boxes_from_mask(mask, instances=True, classes={3: 1})


def test_empty_mask_gives_no_boxes():
    boxes, labels = boxes_from_mask(np.zeros((3, 4, 5)), instances=False)
    assert boxes.shape == (0, 6) and labels.shape == (0,)


def test_box_iou_hand_computed():
    a = np.array([[0, 0, 2, 2], [0, 0, 1, 1]], float)
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 5, 5]], float)
    np.testing.assert_allclose(box_iou(a, b), [[1 / 7, 1.0, 0.0], [0.0, 0.25, 0.0]])


def test_clip_boxes_drops_boxes_without_volume():
    clipped, keep = clip_boxes([[-2, 1, 3, 4], [5, 5, 9, 9], [10, 0, 12, 2]], (8, 10))
    np.testing.assert_array_equal(clipped, [[0, 1, 3, 4], [5, 5, 8, 9], [8, 0, 8, 2]])
    np.testing.assert_array_equal(keep, [True, True, False])


# ------------------------------------------------------------------------------------------- through the cache


def flipped_anisotropic_scan(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A CT-like volume stored with flipped axes and 5 x 0.7 x 0.7 mm voxels, with two nodules; returns the file
    and the nodules' world boxes (cccwhd)."""
    shape = (12, 40, 36)
    array = np.full(shape, -1000.0, np.float32)
    array[2:10, 6:34, 5:31] = 0.0  # body: the crop keeps it
    grid = Grid(shape, (5.0, 0.7, 0.7), (40.0, 10.0, -20.0), np.diag([-1.0, -1.0, 1.0]))
    image = Image(array, grid.spacing, grid.origin, grid.direction)
    path = write_image(image, tmp_path / "scan.mha")
    voxel = np.array([[4, 10, 8, 6, 16, 14], [7, 20, 20, 8, 23, 22], [0, 0, 0, 1, 2, 2]], float)
    return path, voxel_to_world(voxel, grid)


def test_prepared_boxes_land_on_the_same_world_position(tmp_path):
    path, world = flipped_anisotropic_scan(tmp_path)
    case = Case("scan", (path,), boxes=tuple(map(tuple, world)), box_labels=(1, 2, 1))
    dataset = Dataset("det", tmp_path, "luna16", "detection", [case], labels={1: "nodule", 2: "mass"})
    pipeline = Pipeline([CropForeground(-500.0, margin=1), Resample((2.5, 1.0, 1.0)), CTWindow()])
    cache = PreparedCache(tmp_path / "cache")
    cache.prepare(dataset, pipeline, workers=1, progress=False)
    boxes, labels = cache.boxes("scan")
    image, _, meta = cache.load("scan")
    assert boxes.dtype == np.float32 and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, [1, 2])  # the third box lay in the air the crop removed
    prepared = Grid.of(meta)
    assert prepared.shape == image.shape[1:]
    after = voxel_to_world(boxes, prepared)
    # centres within 0.1 voxel of the prepared grid (the float32 storage is the only error)
    err = np.abs(after[:, :3] - world[:2, :3]) / np.asarray(prepared.spacing[::-1])
    assert err.max() < 0.1, err
    np.testing.assert_allclose(after[:, 3:], world[:2, 3:], atol=1e-3)
    voxel_back, world_back = boxes_to_original(boxes, meta)
    original = Grid.of(read_image(path))
    np.testing.assert_allclose(voxel_back, world_to_voxel(world[:2], original), atol=1e-4)
    np.testing.assert_allclose(world_back, after, atol=1e-9)


def test_box_outside_after_crop_is_dropped_with_a_warning(tmp_path, caplog):
    path, world = flipped_anisotropic_scan(tmp_path)
    case = Case("scan", (path,), boxes=tuple(map(tuple, world)))
    dataset = Dataset("det", tmp_path, "luna16", "detection", [case], labels={1: "nodule"})
    with caplog.at_level(logging.WARNING, logger="medtransfer.data.cache"):
        PreparedCache(tmp_path / "cache").prepare(dataset, Pipeline([CropForeground(-500.0)]), workers=1,
                                                  progress=False)
    assert "case 'scan': 1 of 3 boxes lie outside the prepared image" in caplog.text


def test_changed_boxes_redo_the_case_and_cases_without_boxes_say_so(tmp_path):
    path, world = flipped_anisotropic_scan(tmp_path)
    cache = PreparedCache(tmp_path / "cache")

    def prepare(boxes):
        case = Case("scan", (path,), boxes=boxes)
        cache.prepare(Dataset("det", tmp_path, "luna16", "detection", [case]), Pipeline([CTWindow()]), workers=1,
                      progress=False)

    prepare(tuple(map(tuple, world[:1])))
    assert cache.boxes("scan")[0].shape == (1, 6)
    prepare(tuple(map(tuple, world)))
    assert cache.redone == 1 and cache.boxes("scan")[0].shape == (3, 6)
    prepare(())
    assert cache.boxes("scan")[0].shape == (0, 6)
    prepare(None)
    with pytest.raises(DataError, match="prepared without boxes"):
        cache.boxes("scan")
