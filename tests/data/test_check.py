"""Every problem the checker knows, produced on purpose, and named with its file."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from medtransfer.data.check import check_dataset
from medtransfer.data.io import write_image
from medtransfer.data.types import Case, Dataset, Image

SHAPE = (6, 8, 8)


def _img(array, spacing=(2.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> Image:
    return Image(np.asarray(array), tuple(spacing), tuple(origin), np.eye(len(spacing)))


def _case(root, cid, image=None, label=None, **label_geometry):
    rng = np.random.default_rng(len(cid))
    image = rng.normal(0, 100, SHAPE).astype(np.float32) if image is None else image
    if label is None:
        label = np.zeros(SHAPE, np.uint8)
        label[2:4, 2:5, 3:6] = 1
    img_path = write_image(_img(image), root / f"{cid}.nii.gz")
    lab_path = write_image(_img(label, **label_geometry), root / f"{cid}_seg.nii.gz")
    return Case(cid, (img_path,), lab_path)


def _dataset(root, cases, labels=None, task="segmentation", channel_names=("CT",)):
    return Dataset("toy", root, "msd", task, list(cases), labels or {0: "background", 1: "lesion"}, list(channel_names))


def test_a_clean_dataset_is_summarised(tmp_path):
    ds = _dataset(tmp_path, [_case(tmp_path, "a"), _case(tmp_path, "b")])
    report = check_dataset(ds, workers=2)
    assert report.ok and report.problems == []
    s = report.summary()
    assert s["cases"] == 2 and s["shape"]["min"] == list(SHAPE) and s["spacing"]["median"] == [2.0, 1.0, 1.0]
    assert s["label_voxels"] == {0: 2 * (6 * 8 * 8 - 18), 1: 36} and s["label_cases"] == {0: 2, 1: 2}


def _only(report, severity="error"):
    probs = [p for p in report.problems if p.severity == severity]
    assert len(probs) == 1, [str(p) for p in report.problems]
    return probs[0]


def test_missing_file(tmp_path):
    case = _case(tmp_path, "a")
    case.label.unlink()
    p = _only(check_dataset(_dataset(tmp_path, [case])))
    assert p.file == str(case.label) and p.message == "file is missing"


def test_truncated_gzip(tmp_path):
    case = _case(tmp_path, "a", image=np.random.default_rng(0).normal(size=(20, 30, 30)).astype(np.float32),
                 label=np.zeros((20, 30, 30), np.uint8))
    data = case.images[0].read_bytes()
    case.images[0].write_bytes(data[: len(data) // 2])
    p = _only(check_dataset(_dataset(tmp_path, [case])))
    assert p.file == str(case.images[0]) and "cannot be read" in p.message and "truncated" in p.message


def test_shape_and_geometry_mismatch(tmp_path):
    bad_shape = _case(tmp_path, "a", label=np.zeros((6, 8, 7), np.uint8))
    p = _only(check_dataset(_dataset(tmp_path, [bad_shape])))
    assert "label shape (6, 8, 7) differs from image shape (6, 8, 8)" in p.message
    moved = _case(tmp_path, "b", origin=(0.0, 0.0, 5.0))
    p = _only(check_dataset(_dataset(tmp_path, [moved])))
    assert "label geometry" in p.message and "resample it onto the image" in p.fix


def test_labels_outside_the_declared_classes(tmp_path):
    label = np.zeros(SHAPE, np.uint8)
    label[0, 0, :3] = [1, 3, 7]
    p = _only(check_dataset(_dataset(tmp_path, [_case(tmp_path, "a", label=label)])))
    assert p.message == "label values [3, 7] are outside the declared classes [0, 1]"


def test_nan_voxels_and_empty_labels(tmp_path):
    image = np.zeros(SHAPE, np.float32)
    image[1, 1, 1] = np.nan
    image[2, 2, 2] = np.inf
    report = check_dataset(_dataset(tmp_path, [_case(tmp_path, "a", image=image, label=np.zeros(SHAPE, np.uint8))]))
    assert _only(report).message == "2 voxels are NaN or Inf"
    assert _only(report, "warning").message == "label is empty (background only)"


def test_duplicate_ids_inconsistent_channels_and_empty_dataset(tmp_path):
    a = _case(tmp_path, "a")
    two_channels = Case("b", (a.images[0], a.images[0]), a.label)
    report = check_dataset(_dataset(tmp_path, [a, a, two_channels]))
    messages = sorted(p.message for p in report.errors)
    assert "case id 'a' appears 2 times" in messages
    assert "has 2 channels, the dataset declares 1 (CT)" in messages
    assert any(m.startswith("inconsistent channel counts {1: 2, 2: 1}") for m in messages)
    empty = check_dataset(_dataset(tmp_path, []))
    assert not empty.ok and _only(empty).message == "the dataset has no cases"


def test_classification_balance_and_unknown_class(tmp_path):
    a = _case(tmp_path, "a")
    cases = [Case("a", a.images, None, 0), Case("b", a.images, None, 0), Case("c", a.images, None, 5)]
    report = check_dataset(_dataset(tmp_path, cases, labels={0: "benign", 1: "malignant"}, task="classification"))
    assert report.class_balance == {"benign": 2, "5": 1}
    assert _only(report).message == "class 5 is not one of the declared classes [0, 1]"
    assert _only(report, "warning").message == "class 1 ('malignant') has no example"


@pytest.mark.parametrize("bad", ["float_label"])
def test_non_integer_labels(tmp_path, bad):
    label = np.zeros(SHAPE, np.float32)
    label[0, 0, 0] = 0.5
    p = _only(check_dataset(_dataset(tmp_path, [_case(tmp_path, "a", label=label)])))
    assert p.message == "label holds non-integer values"


def test_gzip_module_agrees_the_fixture_is_truncated(tmp_path):
    # guard for test_truncated_gzip: the cut file really is an incomplete gzip stream
    case = _case(tmp_path, "a")
    data = case.images[0].read_bytes()
    case.images[0].write_bytes(data[: len(data) // 2])
    with pytest.raises((EOFError, OSError)):
        gzip.decompress(case.images[0].read_bytes())
