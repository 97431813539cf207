"""FROC / sensitivity@FP / mAP against hand-computed examples (the curves are worked out in the comments)."""

import math

import numpy as np
import pytest
import torch

from medtransfer.train.detection_metrics import (
    DetectionMetrics,
    coco_map,
    deeplesion_sensitivity,
    froc,
    froc_points,
    match_detections,
)

KEYS = ["sensitivity@0.125", "sensitivity@0.25", "sensitivity@0.5", "sensitivity@1", "sensitivity@2",
        "sensitivity@4", "sensitivity@8", "cpm"]


def luna_example():
    nodules = [("s1", (0, 0, 0), 5.0), ("s1", (50, 0, 0), 3.0), ("s2", (0, 0, 0), 4.0)]
    candidates = [
        ("s1", 0.9, (1, 0, 0)),  # hits N1
        ("s1", 0.5, (0, 2, 0)),  # second hit on N1: ignored, not an FP
        ("s1", 0.8, (20, 0, 0)),  # FP
        ("s2", 0.7, (0, 0, 3.9)),  # hits N3
        ("s2", 0.6, (0, 0, 4.0)),  # exactly on the radius: LUNA16's test is strict -> FP
    ]  # N2 is hit by none
    return candidates, nodules


def test_froc_points_luna16_rules():
    # TP scores {0.9, 0.7}, FP scores {0.8, 0.6}, 3 nodules, 2 scans; curve (fps, sens):
    # (0,0) (0,1/3) (0.5,1/3) (0.5,2/3) (1,2/3): linear interpolation, top of the step at 0.5
    out = froc_points(*luna_example(), n_scans=2)
    assert list(out) == KEYS
    expect = [1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3]
    assert [out[k] for k in KEYS[:-1]] == pytest.approx(expect)
    assert out["cpm"] == pytest.approx(4 / 7)


def test_matching_double_detection_and_missed_lesion():
    cands, nods = luna_example()
    m = match_detections(cands, nods, lambda d, n: ((d - np.asarray(n[1])) ** 2).sum(1) < n[2] ** 2)
    assert m.lesion_hit_by.tolist() == [0, -1, 3]
    assert m.is_fp.tolist() == [False, False, True, False, True]
    assert np.isnan(m.lesion_score[1]) and m.lesion_score[0] == 0.9


def test_froc_boxes_equal_points_form():
    # cubes of side 2r around the same centres: the inscribed sphere is the nodule sphere
    cands, nods = luna_example()
    dets = [(c, s, np.r_[np.asarray(p) - 0.5, np.asarray(p) + 0.5]) for c, s, p in cands]
    les = [(c, np.r_[np.asarray(p) - r, np.asarray(p) + r]) for c, p, r in nods]
    assert froc(dets, les, n_scans=2) == pytest.approx(froc_points(cands, nods, n_scans=2))
    with_radius = [(c, np.r_[np.asarray(p) - 1, np.asarray(p) + 1], r) for c, p, r in nods]
    assert froc(dets, with_radius, n_scans=2) == pytest.approx(froc_points(cands, nods, n_scans=2))


def test_tied_scores_enter_together():
    # one TP and one FP both at 0.5, one scan: the curve jumps (0,0) -> (1,1)
    cands = [("a", 0.5, (0, 0, 0)), ("a", 0.5, (30, 0, 0))]
    nods = [("a", (0, 0, 0), 5.0)]
    out = froc_points(cands, nods, n_scans=1)
    assert [out[k] for k in KEYS[:-1]] == pytest.approx([0.125, 0.25, 0.5, 1, 1, 1, 1])
    assert out["cpm"] == pytest.approx(4.875 / 7)
    # same in the DeepLesion step curve: nothing is reached below 1 FP per image
    dl = deeplesion_sensitivity([("a", 0.5, (0, 0, 10, 10)), ("a", 0.5, (50, 50, 60, 60))],
                                [("a", (0, 0, 10, 10))], n_images=1)
    assert [dl[f"sensitivity@{f}"] for f in ("0.5", "1", "2")] == [0.0, 1.0, 1.0]


def test_no_detections_and_no_lesions():
    nods = [("a", (0, 0, 0), 5.0)]
    out = froc_points([], nods, n_scans=3)
    assert all(out[k] == 0.0 for k in KEYS)
    out = froc_points([("a", 0.9, (0, 0, 0))], [], n_scans=1)
    assert all(math.isnan(out[k]) for k in KEYS)
    with pytest.raises(ValueError, match="n_scans"):
        froc_points([], nods, n_scans=0)


def test_one_detection_inside_two_nodules_hits_both():
    out = froc_points([("a", 0.9, (0, 0, 0))], [("a", (1, 0, 0), 5.0), ("a", (-1, 0, 0), 5.0)], n_scans=1)
    assert out["cpm"] == 1.0


def test_deeplesion_sensitivity_step_curve():
    gts = [("a", (0, 0, 10, 10)), ("b", (0, 0, 10, 10)), ("b", (20, 20, 30, 30))]
    dets = [
        ("a", 0.9, (0, 0, 10, 10)),  # TP
        ("a", 0.85, (1, 1, 10, 10)),  # IoU 0.81 with the same lesion: duplicate, not an FP
        ("a", 0.8, (50, 50, 60, 60)),  # FP
        ("a", 0.75, (70, 70, 80, 80)),  # FP
        ("b", 0.7, (20, 20, 30, 30)),  # TP
        ("b", 0.6, (0, 0, 4, 4)),  # IoU 0.16 < 0.5: FP
        ("b", 0.3, (100, 100, 110, 110)),  # FP
    ]
    # points (fps/img, sens): (0,1/3)@.9 (0,1/3)@.85 (.5,1/3)@.8 (1,1/3)@.75 (1,2/3)@.7 (1.5,2/3)@.6 (2,2/3)@.3
    out = deeplesion_sensitivity(dets, gts, n_images=2)
    assert list(out) == [f"sensitivity@{f}" for f in ("0.5", "1", "2", "4", "8", "16")] + ["cpm"]
    assert [out[k] for k in list(out)[:-1]] == pytest.approx([1 / 3] + [2 / 3] * 5)
    assert out["cpm"] == pytest.approx(11 / 18)


def test_coco_map_at_iou_01():
    gt = [(np.array([[0, 0, 0, 4, 4, 4.]]), np.array([1]))]
    # a higher-scored FP before the TP: precision 1/2 at recall 1 -> AP 0.5 (101-point interpolation)
    pred = [(np.array([[10, 10, 10, 12, 12, 12.], [0, 0, 0, 4, 4, 5.]]), np.array([0.9, 0.8]), np.array([1, 1]))]
    assert coco_map(pred, gt, num_classes=1) == pytest.approx(0.5)
    # IoU 0.125 passes at 0.1, not at 0.5
    shifted = [(np.array([[0, 0, 0, 4, 4, 4.]]) + [[0, 0, 3.1, 0, 0, 3.1]], np.array([0.9]), np.array([1]))]
    assert coco_map(shifted, gt, num_classes=1) == pytest.approx(1.0)
    assert coco_map(shifted, gt, num_classes=1, iou=0.5) == pytest.approx(0.0)


def _fake_postprocess(per_batch):
    calls = iter(per_batch)
    return lambda out, shape: next(calls)


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_detection_metrics_merge_equals_single_process():
    # two images: image 0 one lesion hit; image 1 one lesion missed plus one FP; padded targets
    img0 = (_t([[0, 0, 0, 4, 4, 4]]), _t([0.9]), torch.tensor([1]))
    img1 = (_t([[20, 20, 20, 24, 24, 24]]), _t([0.8]), torch.tensor([1]))
    tgt0 = _t([[[0, 0, 0, 4, 4, 4, 1], [-1] * 7]])
    tgt1 = _t([[[8, 8, 8, 12, 12, 12, 1], [-1] * 7]])
    whole = DetectionMetrics(_fake_postprocess([[img0, img1]]))
    whole.update(torch.zeros(2), torch.cat([tgt0, tgt1]))
    r0, r1 = DetectionMetrics(_fake_postprocess([[img0]])), DetectionMetrics(_fake_postprocess([[img1]]))
    r0.update(torch.zeros(1), tgt0)
    r1.update(torch.zeros(1), tgt1)
    r0.merge([{k: v.cpu() for k, v in r1.state().items()}])
    a, b = whole.compute(), r0.compute()
    assert a == pytest.approx(b)
    # curve (0,0) (0,1/2) (1/2,1/2): sensitivity 1/2 everywhere; mAP: TP ranked first, recall 1/2 -> AP ~0.5
    assert a["cpm"] == pytest.approx(0.5)
    assert a["map_iou0.1"] == pytest.approx(0.5, abs=0.01)
    whole.reset()
    assert whole.compute() == {"cpm": pytest.approx(float("nan"), nan_ok=True),
                               "map_iou0.1": pytest.approx(float("nan"), nan_ok=True)}


@pytest.mark.parametrize("dims", [2, 3])
def test_detection_metrics_no_detections_at_all(dims):
    # a validation where the detector finds nothing (score threshold above every score): sensitivity 0, not a crash
    empty = (torch.zeros(0, 2 * dims), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    box = [0.0] * dims + [4.0] * dims
    metric = DetectionMetrics(_fake_postprocess([[empty, empty]]), protocol="luna16" if dims == 3 else "deeplesion")
    metric.update(torch.zeros(2), _t([[box + [1]], [[-1] * (2 * dims + 1)]]))
    out = metric.compute()
    assert out["cpm"] == 0.0 and out["map_iou0.1"] == 0.0
