"""The embedded phantom dataset: determinism, anatomy in HU, labels, case classes, radiographs, files on disk."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from medtransfer.data.datasets import load_dataset
from medtransfer.data.io import read_image
from medtransfer.data.phantoms import (
    CLASSES,
    FINDINGS_2D,
    LABELS,
    case_seeds,
    make_ct_phantom,
    write_phantom_dataset,
)
from medtransfer.data.phantoms_2d import (
    MU_WATER_PER_MM,
    cardiothoracic_ratio,
    line_integrals,
    project_mask,
    radiograph,
)
from medtransfer.errors import DataError

SMALL = (32, 32, 32)
MEDIUM = (48, 48, 48)


@pytest.fixture(scope="module")
def twenty_small():
    return [make_ct_phantom(seed, shape=SMALL) for seed in range(20)]


@pytest.fixture(scope="module")
def six_medium():
    return [make_ct_phantom(seed, shape=MEDIUM) for seed in range(6)]


# ---------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_case():
    a, b = make_ct_phantom(7, shape=SMALL), make_ct_phantom(7, shape=SMALL)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.label.tobytes() == b.label.tobytes()
    assert a.drr.tobytes() == b.drr.tobytes()
    assert a.lung_mask_2d.tobytes() == b.lung_mask_2d.tobytes()
    assert a.findings == b.findings and a.target == b.target


def test_different_seeds_give_different_anatomy(twenty_small):
    a, b = twenty_small[0], twenty_small[1]
    assert not np.array_equal(a.image, b.image)
    assert not np.array_equal(a.label, b.label)
    # Not just noise: organ volumes differ between cases.
    volumes = {tuple(int((c.label == k).sum()) for k in (1, 2, 3)) for c in twenty_small}
    assert len(volumes) == 20


def test_case_seeds_are_stable_prefixes():
    assert case_seeds(5, 3) == case_seeds(5, 10)[:3]
    assert len(set(case_seeds(5, 10))) == 10
    assert case_seeds(5, 3) != case_seeds(6, 3)


# ---------------------------------------------------------------- anatomy


def test_arrays_shapes_dtypes_and_label_set(twenty_small):
    seen: set[int] = set()
    for case in twenty_small:
        assert case.image.shape == SMALL and case.image.dtype == np.float32
        assert case.label.shape == SMALL and case.label.dtype == np.uint8
        values = set(np.unique(case.label).tolist())
        assert values <= set(LABELS)
        assert {0, 1, 2, 3, 4, 5} <= values  # every case has the organs; lesions only where drawn
        seen |= values
    assert seen == set(LABELS) == {0, 1, 2, 3, 4, 5, 6}
    assert LABELS[1] == "lung" and LABELS[6] == "lesion"


def test_hounsfield_ranges_per_structure(six_medium):
    for case in six_medium:
        hu, lab = case.image, case.label
        assert -950 <= hu[lab == 1].mean() <= -700, "lung"
        assert 20 <= hu[lab == 3].mean() <= 100, "liver"
        assert hu[lab == 4].mean() > 250, "spine"
        assert -60 <= hu[lab == 2].mean() <= 100, "heart"
        assert hu[:, :3, :3].mean() < -950, "air outside the body"
        assert -1024 <= hu.min() and hu.max() <= 3071


def test_anatomical_layout(six_medium):
    """Canonical orientation: z superior, y posterior, x patient-left."""
    for case in six_medium:
        idx = {k: np.argwhere(case.label == k).mean(axis=0) for k in (1, 2, 3, 4)}
        assert idx[3][0] < idx[1][0], "liver below the lungs"
        assert idx[4][1] > idx[2][1], "spine behind the heart"
        assert idx[2][2] > case.label.shape[2] / 2 - 0.5, "heart on the patient's left"
        assert idx[3][2] < case.label.shape[2] / 2, "liver mostly on the patient's right"


def test_nodule_present_iff_findings_say_so(twenty_small):
    for case in twenty_small:
        f = case.findings
        lesion = case.label == 6
        if f["nodule"]:
            assert case.label[tuple(f["nodule_center"])] == 6
            assert f["nodule_radius_mm"] > 0
        if f["liver_lesion"]:
            assert case.label[tuple(f["liver_lesion_center"])] == 6
        if not (f["nodule"] or f["liver_lesion"]):
            assert not lesion.any()
        assert case.target == int(f["malignant"])
        assert not f["malignant"] or f["nodule"]
        assert case.findings_2d.tolist() == [float(bool(f[name])) for name in FINDINGS_2D]
        assert f["cardiomegaly"] == (f["cardiothoracic_ratio"] > 0.5)
        json.dumps(f)  # findings are plain JSON


def test_classes_and_findings_are_not_degenerate(twenty_small):
    targets = [c.target for c in twenty_small]
    assert set(targets) == set(CLASSES) == {0, 1}
    findings = np.stack([c.findings_2d for c in twenty_small])
    assert findings.shape == (20, len(FINDINGS_2D))
    assert (findings.max(axis=0) == 1).all() and (findings.min(axis=0) == 0).all()


def test_malignant_nodules_carry_visible_cues(twenty_small):
    cases = [c for c in twenty_small if c.findings["nodule"]]
    malignant = [c.findings["nodule_radius_mm"] for c in cases if c.target == 1]
    benign = [c.findings["nodule_radius_mm"] for c in cases if c.target == 0]
    assert malignant and benign
    assert min(malignant) > max(benign)  # larger
    assert not any(c.findings["nodule_calcified"] for c in cases if c.target == 1)
    assert not any(c.findings["nodule_spiculated"] for c in cases if c.target == 0)


# ---------------------------------------------------------------- radiographs


def test_line_integrals_and_radiograph_by_hand():
    hu = np.full((2, 4, 3), -1000.0, dtype=np.float32)
    hu[1, :, 1] = 0.0  # a water column, 4 voxels of 2 mm along y, in the upper slice
    hu[0, 1:3, 0] = 1000.0  # 2 voxels of bone-like (twice water) in the lower slice
    p = line_integrals(hu, 2.0)
    assert p.shape == (2, 3)
    np.testing.assert_allclose(p[1, 1], 4 * 2.0 * MU_WATER_PER_MM, rtol=1e-6)
    np.testing.assert_allclose(p[0, 0], 2 * 2.0 * 2 * MU_WATER_PER_MM, rtol=1e-6)
    assert p[0, 1] == 0.0  # air attenuates nothing
    image = radiograph(hu, (1.0, 2.0, 1.0), percentile=100)
    # Superior (z = 1) at the top row; equal path integrals here, so both dense pixels are the brightest.
    np.testing.assert_allclose(image, [[0, 1, 0], [1, 0, 0]], atol=1e-6)


def test_cardiothoracic_ratio_by_hand():
    heart = np.zeros((4, 5, 10), bool)
    thorax = np.zeros((4, 5, 10), bool)
    thorax[1:3, :, 1:9] = True  # 8 columns wide
    heart[2, 1:3, 3:7] = True  # 4 columns wide
    assert cardiothoracic_ratio(heart, thorax) == 0.5


def test_drr_shape_range_and_bones_brighter_than_lungs(six_medium):
    for case in six_medium:
        assert case.drr.shape == (MEDIUM[0], MEDIUM[2]) and case.drr.dtype == np.float32
        assert 0.0 <= case.drr.min() and case.drr.max() <= 1.0
        assert case.lung_mask_2d.shape == case.drr.shape and set(np.unique(case.lung_mask_2d)) == {0, 1}
        spine = project_mask(case.label == 4).astype(bool)
        heart = project_mask(case.label == 2).astype(bool)
        lungs = case.lung_mask_2d.astype(bool) & ~spine & ~heart
        assert case.drr[spine].mean() > case.drr[lungs].mean() + 0.2
        assert case.drr[:, :1].max() < 0.05  # air beside the body is black
        # Superior at the top: the liver's shadow sits in the lower half, the lung apices in the upper.
        liver_rows = np.argwhere(project_mask(case.label == 3))[:, 0]
        assert liver_rows.mean() > MEDIUM[0] / 2
        assert np.argwhere(case.lung_mask_2d)[:, 0].min() < MEDIUM[0] / 4


def test_drr_resized():
    case = make_ct_phantom(3, shape=(24, 40, 32), spacing=(5.0, 2.0, 2.5), drr_size=(30, 20))
    assert case.drr.shape == case.lung_mask_2d.shape == (30, 20)
    assert case.drr_spacing == (24 * 5.0 / 30, 32 * 2.5 / 20)
    assert 0.0 <= case.drr.min() and case.drr.max() <= 1.0
    square = make_ct_phantom(3, shape=SMALL, drr_size=64)
    assert square.drr.shape == (64, 64)


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shape": (8, 32, 32)}, "at least 16 voxels"),
        ({"shape": (32, 32)}, "at least 16 voxels"),
        ({"spacing": (2.5, -1.0, 2.5)}, "positive spacings"),
        ({"spacing": (2.5, float("nan"), 2.5)}, "positive spacings"),
    ],
)
def test_bad_geometry_is_refused(kwargs, message):
    with pytest.raises(DataError, match=message):
        make_ct_phantom(0, **kwargs)


@pytest.mark.parametrize("size", [0, (64,), (30, 2), 32.0, "64"])
def test_bad_drr_size_is_refused(size):
    with pytest.raises(DataError, match="drr_size="):
        make_ct_phantom(0, shape=SMALL, drr_size=size)


def test_bad_seed_and_count_are_refused(tmp_path):
    with pytest.raises(DataError, match="non-negative integer"):
        make_ct_phantom(-1, shape=SMALL)
    with pytest.raises(DataError, match="positive integer"):
        write_phantom_dataset(tmp_path / "x", 0, 0, shape=SMALL)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- files


def test_written_dataset_is_readable(tmp_path):
    shape, spacing = (20, 24, 28), (3.0, 2.0, 1.5)
    root = write_phantom_dataset(tmp_path / "ph", 3, 11, shape=shape, spacing=spacing)
    desc = json.loads((root / "dataset.json").read_text())
    assert desc["name"] == "phantoms" and desc["modality"] == {"0": "CT"}
    assert desc["labels"] == {str(k): v for k, v in LABELS.items()}
    assert desc["numTraining"] == 3 and len(desc["training"]) == 3
    assert desc["training"][0]["image"] == "./imagesTr/phantom_000.nii.gz"
    assert desc["training"][0]["label"] == "./labelsTr/phantom_000.nii.gz"
    assert desc["medtransfer"]["case_seeds"] == case_seeds(11, 3)
    for folder in ("imagesTr", "labelsTr", "images2d", "masks2d"):
        assert len(list((root / folder).iterdir())) == 3, folder
    assert not list(root.rglob("*.tmp"))

    expected = [make_ct_phantom(s, shape=shape, spacing=spacing) for s in case_seeds(11, 3)]
    assert [item["target"] for item in desc["training"]] == [c.target for c in expected]
    with open(root / "classification.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "class"]
    assert rows[1:] == [[f"imagesTr/phantom_{i:03d}.nii.gz", str(c.target)] for i, c in enumerate(expected)]
    with open(root / "findings2d.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", *FINDINGS_2D]
    assert [list(map(float, r[1:])) for r in rows[1:]] == [c.findings_2d.tolist() for c in expected]

    # NIfTI as any tool sees it: (x, y, z) voxel order, zooms in that order, LPS axes flipped to RAS for x and y.
    nii = nib.load(root / "imagesTr" / "phantom_001.nii.gz")
    assert nii.shape == shape[::-1]
    np.testing.assert_allclose(nii.header.get_zooms(), spacing[::-1])
    np.testing.assert_allclose(np.sign(np.diag(nii.affine)[:3]), [-1, -1, 1])
    np.testing.assert_array_equal(np.asarray(nii.dataobj).transpose(2, 1, 0), expected[1].image)

    image = read_image(root / "imagesTr" / "phantom_001.nii.gz")
    label = read_image(root / "labelsTr" / "phantom_001.nii.gz")
    assert image.array.shape == shape and image.spacing == spacing
    np.testing.assert_allclose(image.direction, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(image.origin, expected[1].origin)
    np.testing.assert_array_equal(label.array, expected[1].label)
    drr = read_image(root / "images2d" / "phantom_001.png").array
    np.testing.assert_array_equal(drr, np.round(expected[1].drr * 255).astype(np.uint8))
    mask = read_image(root / "masks2d" / "phantom_001.png").array
    np.testing.assert_array_equal(mask, expected[1].lung_mask_2d)

    msd = load_dataset(root)
    assert msd.format == "msd" and len(msd) == 3 and msd.labels == LABELS
    assert [c.target for c in msd.cases] == [c.target for c in expected]
    findings = load_dataset(root / "findings2d.csv")
    assert findings.task == "classification" and findings.labels == dict(enumerate(FINDINGS_2D))


def test_dataset_without_2d_and_with_progress_bar(tmp_path):
    root = write_phantom_dataset(tmp_path / "ph", 9, 0, shape=(16, 16, 16), with_2d=False)
    assert len(list((root / "imagesTr").iterdir())) == 9
    assert not (root / "images2d").exists() and not (root / "findings2d.csv").exists()
    assert json.loads((root / "dataset.json").read_text())["numTraining"] == 9


def test_rewriting_a_folder_drops_files_of_the_earlier_run(tmp_path):
    root = write_phantom_dataset(tmp_path / "ph", 4, 0, shape=(16, 16, 16))
    (root / "imagesTr" / "notes.txt").write_text("kept")
    write_phantom_dataset(root, 2, 1, shape=(16, 16, 16))
    assert sorted(p.name for p in (root / "masks2d").iterdir()) == ["phantom_000.png", "phantom_001.png"]
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == ["notes.txt", "phantom_000.nii.gz",
                                                                     "phantom_001.nii.gz"]  # fmt: skip
    write_phantom_dataset(root, 2, 1, shape=(16, 16, 16), with_2d=False)
    assert not list((root / "images2d").iterdir()) and not (root / "findings2d.csv").exists()
    assert len(load_dataset(root)) == 2
