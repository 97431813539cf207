"""Detection datasets: LUNA16 nodules and candidates, DeepLesion key slices as 2.5D stacks, MONAI datalists, boxes
from masks, and the detection phantoms in all three layouts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from medtransfer.data.boxes import boxes_from_mask, voxel_to_world, world_to_voxel
from medtransfer.data.cache import PreparedCache
from medtransfer.data.datasets import detect_format, load_dataset, write_dataset_json
from medtransfer.data.datasets.detection import DeepLesionReader
from medtransfer.data.geometry import Grid
from medtransfer.data.io import read_image, write_image
from medtransfer.data.phantoms import make_ct_phantom
from medtransfer.data.phantoms_detection import make_detection_phantom, write_detection_phantoms
from medtransfer.data.preprocess import Pipeline, preset
from medtransfer.data.types import Image
from medtransfer.errors import DataError

SMALL = {"shape": (24, 40, 40), "spacing": (2.5, 2.0, 2.0)}


@pytest.fixture(scope="module")
def luna(tmp_path_factory) -> Path:
    return write_detection_phantoms(tmp_path_factory.mktemp("luna"), 3, 7, "luna16", **SMALL)


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------------- phantoms


def test_detection_phantom_keeps_the_generator_ct_and_adds_nodules_of_several_sizes():
    p = make_detection_phantom(3, **SMALL, extra_nodules=(3, 3))
    base = make_ct_phantom(3, **SMALL)
    extra = p.instances > (len(p.classes) - 3)
    far = ~ndimage_dilate(extra, 2)
    np.testing.assert_array_equal(p.image.array[far], base.image[far])  # away from the new nodules: the same CT
    assert len(p.classes) >= 3 and (p.classes[-3:] == 1).all()
    np.testing.assert_array_equal(p.boxes, boxes_from_mask(p.instances, instances=True)[0])
    sizes = p.world_boxes[:, 3:].max(axis=1)
    assert sizes.min() < 8.0  # some are small: a few voxels across


def ndimage_dilate(mask: np.ndarray, n: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=n)


def test_luna_layout_annotations_and_candidates(luna):
    assert detect_format(luna) == "luna16"
    ds = load_dataset(luna, task="detection")
    assert ds.task == "detection" and ds.labels == {1: "nodule"} and len(ds.cases) == 3
    ann = rows(luna / "annotations.csv")
    first = ann[0]
    case = next(c for c in ds.cases if c.case_id == first["seriesuid"])
    d = float(first["diameter_mm"])
    assert case.boxes[0] == (float(first["coordX"]), float(first["coordY"]), float(first["coordZ"]), d, d, d)
    assert sum(len(c.boxes) for c in ds.cases) == len(ann) and all(c.box_labels == (1,) * len(c.boxes)
                                                                  for c in ds.cases)  # fmt: skip
    cands = ds.description["candidates"]
    for case in ds.cases:
        instances = read_image(luna / "instances" / f"{case.case_id}.nii.gz")
        grid = Grid.of(instances)
        true = [c for c in cands[case.case_id] if c["class"] == 1]
        false = [c for c in cands[case.case_id] if c["class"] == 0]
        assert len(true) == len(case.boxes) and len(false) >= 10 * max(len(true), 1) - 1
        for c in false:  # false candidates lie on no object
            idx = np.round(grid.to_index([c["coordZ"], c["coordY"], c["coordX"]])).astype(int)
            assert instances.array[tuple(idx)] == 0
        for box in case.boxes:  # each annotation's centre is inside its nodule
            centre = world_to_voxel([box], grid)[0]
            idx = np.floor((centre[:3] + centre[3:]) / 2).astype(int)
            assert instances.array[tuple(idx)] > 0


def test_luna_plain_stays_unlabelled_with_candidates(luna):
    ds = load_dataset(luna)
    assert ds.task == "unlabelled" and all(c.boxes is None for c in ds.cases)
    assert set(ds.description["candidates"]) == {c.case_id for c in ds.cases}


def test_luna_detection_needs_annotations(tmp_path):
    (tmp_path / "subset0").mkdir()
    with pytest.raises(DataError, match="task='detection' needs annotations.csv"):
        load_dataset(tmp_path, task="detection")


def test_luna_detection_prepares_boxes_on_the_nodules(luna, tmp_path):
    ds = load_dataset(luna, task="detection")
    cache = PreparedCache(tmp_path / "cache")
    cache.prepare(ds, Pipeline([preset("genesis_ct")]), workers=1, progress=False)
    for case in ds.cases:
        boxes, labels = cache.boxes(case.case_id)
        meta = cache.load(case.case_id)[2]
        np.testing.assert_allclose(voxel_to_world(boxes, Grid.of(meta)), case.boxes, atol=1e-4)
        assert (labels == 1).all()


def test_datalist_layout_boxes_are_the_instance_boxes(tmp_path):
    root = write_detection_phantoms(tmp_path, 3, 1, "datalist", **SMALL)
    assert detect_format(root) == "monai_detection"
    ds = load_dataset(root)
    assert ds.format == "monai_detection" and ds.labels == {1: "nodule", 2: "liver_lesion"}
    assert ds.description["split"] == {"phantom_000": "train", "phantom_001": "train", "phantom_002": "val"}
    for case in ds.cases:
        inst = read_image(root / "instances" / f"{case.case_id}.nii.gz")
        vox, _ = boxes_from_mask(inst.array, instances=True)
        np.testing.assert_allclose(case.boxes, voxel_to_world(vox, Grid.of(inst)), atol=1e-4)


def test_datalist_matches_monai_box_conversion():
    """Our voxel boxes are MONAI's image-coordinate boxes (ITK reader: x, y, z array axes, voxel centre i at i) plus
    0.5, axes reversed: the same world box through MONAI's own functions."""
    torch = pytest.importorskip("torch")
    from monai.apps.detection.transforms.box_ops import apply_affine_to_boxes
    from monai.data.box_utils import convert_box_mode

    grid = Grid((12, 20, 16), (2.5, 0.7, 0.8), (30.0, -12.0, 8.0), np.diag([-1.0, 1.0, -1.0]))
    ours = np.array([[2.0, 3.0, 4.0, 6.0, 9.0, 10.0]])
    world = voxel_to_world(ours, grid)
    affine = np.eye(4)  # LPS affine of the ITK-ordered (x, y, z) array
    affine[:3, :3] = (np.asarray(grid.direction)[::-1, ::-1].T * np.asarray(grid.spacing)[::-1])
    affine[:3, 3] = np.asarray(grid.origin)[::-1]
    corners = convert_box_mode(torch.tensor(world), src_mode="cccwhd", dst_mode="xyzxyz")
    monai = apply_affine_to_boxes(corners, torch.tensor(np.linalg.inv(affine))).numpy()
    expected = np.concatenate([ours[:, :3][:, ::-1], ours[:, 3:][:, ::-1]], axis=1) - 0.5
    np.testing.assert_allclose(monai, expected, atol=1e-5)  # MONAI computes in float32


def write_datalist(tmp_path: Path, items) -> Path:
    path = tmp_path / "fold0.json"
    path.write_text(json.dumps({"training": items}))
    return path


def test_datalist_errors_name_the_item(tmp_path):
    bad = [{"image": "a.nii.gz", "box": [[1, 2, 3, 4, 5]], "label": [0]}]
    with pytest.raises(DataError, match=r"fold0.json: training\[0\]: box 0 is \[1, 2, 3, 4, 5\]"):
        load_dataset(write_datalist(tmp_path, bad))
    bad = [{"image": "a.nii.gz", "box": [[1, 2, 3, 4, 5, 6]], "label": []}]
    with pytest.raises(DataError, match=r"1 boxes but 0 labels"):
        load_dataset(write_datalist(tmp_path, bad))
    ok = [{"image": "a.nii.gz", "box": [[1, 2, 3, 4, 5, 6]], "label": [2]}]
    ds = load_dataset(write_datalist(tmp_path, ok), label_names=["x", "y", "z"])
    assert ds.cases[0].box_labels == (3,) and ds.labels == {1: "x", 2: "y", 3: "z"}
    assert ds.cases[0].images == (tmp_path / "a.nii.gz",)


# --------------------------------------------------------------------------------------------------- DeepLesion

DL_HEADER = ("File_name,Patient_index,Study_index,Series_ID,Key_slice_index,Measurement_coordinates,Bounding_boxes,"
             "Lesion_diameters_Pixel_,Normalized_lesion_location,Coarse_lesion_type,Possibly_noisy,Slice_range,"
             "Spacing_mm_px_,Image_size,DICOM_windows,Patient_gender,Patient_age,Train_Val_Test")  # fmt: skip


def hand_deeplesion(tmp_path: Path, rows_: list[str]) -> Path:
    series = tmp_path / "Images_png" / "000001_02_01"
    for z in range(1, 6):  # slice z holds HU = 10 * z everywhere
        write_image(Image(np.full((8, 10), 32768 + 10 * z, np.uint16), (1.0, 1.0), (0.0, 0.0), np.eye(2)),
                    series / f"{z:03d}.png")  # fmt: skip
    (tmp_path / "DL_info.csv").write_text("\n".join([DL_HEADER, *rows_]) + "\n")
    return tmp_path


ROW = ('000001_02_01_002.png,1,2,1,2,"0,0,0,0,0,0,0,0","{box}","4, 3","0.5, 0.5, 0.5",-1,{noisy},"1, 5",'
       '"0.5, 0.8, 2.0","10, 8","-1024, 1050",F,50,{split}')


def test_deeplesion_hand_written(tmp_path):
    root = hand_deeplesion(tmp_path, [ROW.format(box="1, 2, 5, 6", noisy=0, split=2),
                                      ROW.format(box="0, 0, 2, 1.5", noisy=1, split=2)])  # fmt: skip
    assert detect_format(root) == "deeplesion"
    ds = load_dataset(root, slices=5)
    assert ds.task == "detection" and ds.spatial_dims == 2 and ds.labels == {1: "lesion"}
    (case,) = ds.cases
    assert case.case_id == "000001_02_01_002" and case.images == (root / "Images_png/000001_02_01/002.png",)
    grid = Grid((8, 10), (0.8, 0.5), (0.0, 0.0), np.eye(2))
    # x1, y1, x2, y2 with pixel centres at integers -> (y1, x1, y2, x2) + 0.5 in voxel boxes
    np.testing.assert_allclose(case.boxes, voxel_to_world([[2.5, 1.5, 6.5, 5.5], [0.5, 0.5, 2.0, 2.5]], grid))
    assert ds.description["split"] == {case.case_id: "val"} and ds.description["noisy"] == [case.case_id]
    names = [Path(p).name for p in ds.description["slices"][case.case_id]]
    assert names == ["001.png", "001.png", "002.png", "003.png", "004.png"]  # clamped at the series start
    image = DeepLesionReader.of(ds)(case.images[0])
    assert image.array.shape == (5, 8, 10) and image.spatial_dims == 2 and image.spacing == (0.8, 0.5)
    np.testing.assert_array_equal(image.array[:, 0, 0], [10, 10, 20, 30, 40])  # HU = PNG - 32768


def test_deeplesion_bad_rows_name_the_line(tmp_path):
    root = hand_deeplesion(tmp_path, [ROW.format(box="1, 2, 5", noisy=0, split=1)])
    with pytest.raises(DataError, match=r"DL_info.csv:2: Bounding_boxes = '1, 2, 5', expected 4"):
        load_dataset(root)
    root = hand_deeplesion(tmp_path, [ROW.format(box="1, 2, 5, 6", noisy=0, split=7)])
    with pytest.raises(DataError, match=r"DL_info.csv:2: Train_Val_Test = '7'"):
        load_dataset(root)
    with pytest.raises(DataError, match="slices=4: the number of slices must be odd"):
        load_dataset(hand_deeplesion(tmp_path, [ROW.format(box="1, 2, 5, 6", noisy=0, split=1)]), slices=4)


def test_deeplesion_phantoms_prepare_as_2p5d_stacks(tmp_path):
    root = write_detection_phantoms(tmp_path / "dl", 3, 2, "deeplesion", **SMALL)
    ds = load_dataset(root)
    assert set(ds.description["split"].values()) == {"train", "val", "test"}
    cache = PreparedCache(tmp_path / "cache")
    cache.prepare(ds, Pipeline([preset("deeplesion")]), workers=1, progress=False)
    case = ds.cases[0]
    image, _, meta = cache.load(case.case_id)
    assert image.shape == (9, 40, 40)
    key = read_image(case.images[0]).array.astype(np.float32) - 32768
    expected = (np.clip(key, -1024, 1050) + 1024) / 2074
    np.testing.assert_allclose(image[4], expected, atol=1e-6)  # the centre channel is the key slice
    boxes, labels = cache.boxes(case.case_id)
    assert boxes.shape[1] == 4 and (labels == 1).all()
    np.testing.assert_allclose(voxel_to_world(boxes, Grid.of(meta)), case.boxes, atol=1e-4)
    # a changed neighbouring slice redoes the key slices that stack it, and only those
    neighbour = ds.description["slices"][case.case_id][0]
    users = {cid for cid, files in ds.description["slices"].items() if neighbour in files}
    write_image(Image(np.full((40, 40), 32768, np.uint16), (1.0, 1.0), (0.0, 0.0), np.eye(2)), neighbour)
    assert set(cache.pending(ds, Pipeline([preset("deeplesion")]), workers=1)) == users


# --------------------------------------------------------------------------------------------- boxes from masks


def test_boxes_from_masks_of_a_segmentation_dataset(tmp_path):
    label = np.zeros((16, 16, 16), np.uint8)
    label[2:5, 3:6, 4:8] = 1
    label[10:12, 10:14, 1:3] = 1
    label[8:9, 1:2, 12:16] = 2
    spacing = (2.0, 1.0, 0.5)
    for name, arr in (("img", np.zeros(label.shape, np.float32)), ("lab", label)):
        write_image(Image(arr, spacing, (0.0, 0.0, 0.0), np.eye(3)), tmp_path / f"{name}.nii.gz")
    write_dataset_json(tmp_path, "toy", {0: "background", 1: "tumour", 2: "cyst"}, ["CT"],
                       [(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz")])  # fmt: skip
    ds = load_dataset(tmp_path, boxes_from="labels")
    assert ds.task == "detection" and ds.labels == {1: "tumour", 2: "cyst"}
    grid = Grid((16, 16, 16), spacing, (0.0, 0.0, 0.0), np.eye(3))
    expected = voxel_to_world([[2, 3, 4, 5, 6, 8], [10, 10, 1, 12, 14, 3], [8, 1, 12, 9, 2, 16]], grid)
    np.testing.assert_allclose(ds.cases[0].boxes, expected, atol=1e-6)
    assert ds.cases[0].box_labels == (1, 1, 2)
    ds = load_dataset(tmp_path, boxes_from="instances")
    assert ds.cases[0].box_labels == (1, 1) and ds.labels == {1: "object"}
    with pytest.raises(DataError, match="boxes_from='boxes'"):
        load_dataset(tmp_path, boxes_from="boxes")
