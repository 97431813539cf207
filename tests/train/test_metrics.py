"""Metrics against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from medtransfer.train.metrics import (
    ClassificationMetrics,
    SegmentationMetrics,
    build_metrics,
    metric_for,
    roc_auc,
)


def _logits_from_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, num_classes).movedim(-1, 1).float() * 5


def test_roc_auc_by_hand():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: pairs won 1 + 0 + 1 + 1 = 3 of 4
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # a tie between a positive and a negative counts one half: (0.5 + 1 + 1 + 1) / 4
    assert roc_auc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == pytest.approx(0.875)
    assert roc_auc([0.3, 0.3, 0.3], [0, 1, 1]) == pytest.approx(0.5)
    assert math.isnan(roc_auc([0.1, 0.9], [1, 1]))


def test_multilabel_auc_skips_single_valued_class_and_uncertain_targets():
    scores = torch.tensor(
        [[0.1, 0.2, 0.5], [0.4, 0.7, 0.5], [0.35, 0.6, 0.5], [0.8, 0.9, 0.5]]
    )
    target = torch.tensor([[0, 0, 1], [0, 1, 1], [1, -1, 1], [1, 1, 1]], dtype=torch.float)
    m = ClassificationMetrics(3, multilabel=True)
    m.update(torch.logit(scores), target)
    out = m.compute()
    assert out["auc_0"] == pytest.approx(0.75)
    assert out["auc_1"] == pytest.approx(1.0)  # the -1 entry (0.6) is left out: 0.2 vs 0.7, 0.9
    assert math.isnan(out["auc_2"])  # all positive
    assert out["auc_mean"] == pytest.approx((0.75 + 1.0) / 2)
    # 0.5 thresholds: class 0 right on 3 of 4 (0.4 -> 0 ok, 0.35 -> 0 wrong), class 1 on 3 of 3, class 2: 0.5 is
    # not > 0.5, so 0 of 4 -> 6 of 11 valid entries
    assert out["accuracy"] == pytest.approx(6 / 11)


def test_single_label_accuracy_auc_and_merge_across_ranks():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    target = torch.tensor([0, 1, 1, 1])
    whole = ClassificationMetrics(2)
    whole.update(logits, target)
    out = whole.compute()
    assert out["accuracy"] == pytest.approx(0.75)
    # class-1 softmax scores: s(-2) < s(-1) < s(1) < s(3); positives at ranks 2, 3, 4 -> (9 - 6) / 3 = 1
    assert out["auc_1"] == pytest.approx(1.0)
    assert out["auc_0"] == pytest.approx(1.0)
    rank0, rank1 = ClassificationMetrics(2), ClassificationMetrics(2)
    rank0.update(logits[:2], target[:2])
    rank1.update(logits[2:], target[2:])
    rank0.merge([rank1.state()])
    assert rank0.compute() == pytest.approx(out)
    rank0.reset()
    assert math.isnan(rank0.compute()["accuracy"])


def test_segmentation_dice_iou_per_class_on_tiny_label_maps():
    target = torch.tensor([[[0, 1, 1, 2]], [[0, 1, 1, 0]]])  # (2, 1, 4)
    pred = torch.tensor([[[0, 1, 2, 2]], [[0, 1, 1, 0]]])
    m = SegmentationMetrics(3)
    m.update(_logits_from_labels(pred, 3), target)
    out = m.compute()
    # case A: class 1 tp 1 fn 1 -> Dice 2/3, IoU 1/2; class 2 tp 1 fp 1 -> 2/3, 1/2
    # case B: class 1 perfect -> 1, 1; class 2 absent from both -> no score
    assert out["dice_1"] == pytest.approx(5 / 6)
    assert out["dice_2"] == pytest.approx(2 / 3)
    assert out["dice_mean"] == pytest.approx(3 / 4)
    assert out["iou_1"] == pytest.approx(3 / 4)
    assert out["iou_mean"] == pytest.approx(5 / 8)
    # pooled counts: class 1 tp 3 fn 1 -> 6/7; class 2 -> 2/3
    assert out["dice_global_mean"] == pytest.approx((6 / 7 + 2 / 3) / 2)
    assert "dice_0" not in out
    with_bg = SegmentationMetrics(3, include_background=True)
    with_bg.update(_logits_from_labels(pred, 3), target[:, None])  # (N, 1, *spatial) layout
    assert with_bg.compute()["dice_0"] == pytest.approx(1.0)
    assert with_bg.compute()["dice_mean"] == pytest.approx(3 / 4)  # the mean stays over the foreground


def test_segmentation_state_merge_equals_one_pass():
    target = torch.tensor([[[0, 1, 1, 2]], [[0, 1, 1, 0]]])
    pred = torch.tensor([[[0, 1, 2, 2]], [[0, 1, 1, 0]]])
    a, b, whole = SegmentationMetrics(3), SegmentationMetrics(3), SegmentationMetrics(3)
    whole.update(_logits_from_labels(pred, 3), target)
    a.update(_logits_from_labels(pred[:1], 3), target[:1])
    b.update(_logits_from_labels(pred[1:], 3), target[1:])
    a.merge([b.state()])
    assert a.compute() == pytest.approx(whole.compute())


def test_binary_segmentation_hd95_and_empty_masks():
    target = torch.zeros(2, 5, 5, dtype=torch.long)
    target[0, :, 2] = 1
    logits = torch.full((2, 1, 5, 5), -5.0)
    logits[0, 0, :, 0] = 5.0  # predicted column 0, true column 2: every surface distance is 2
    logits[1, 0, 0, 0] = 5.0  # a false positive in a case with an empty target
    m = SegmentationMetrics(1, hd95=True)
    m.update(logits, target)
    out = m.compute()
    assert out["hd95_1"] == pytest.approx(2.0)
    assert out["hd95_skipped_1"] == 1.0
    assert out["dice_1"] == pytest.approx(0.0)  # both cases score 0
    mm = SegmentationMetrics(1, hd95=True, spacing=(1.0, 0.5))
    mm.update(logits[:1], target[:1])
    assert mm.compute()["hd95_mean"] == pytest.approx(1.0)
    empty = SegmentationMetrics(1, hd95=True)
    empty.update(torch.full((1, 1, 3, 3), -5.0), torch.zeros(1, 3, 3, dtype=torch.long))
    assert math.isnan(empty.compute()["dice_mean"]) and math.isnan(empty.compute()["hd95_mean"])


def test_metric_for_and_build_metrics():
    assert metric_for("segmentation") == ("dice_mean", "max")
    assert metric_for("classification", multilabel=True) == ("auc_mean", "max")
    assert metric_for("multilabel") == ("auc_mean", "max")
    assert metric_for("classification") == ("accuracy", "max")
    with pytest.raises(ValueError, match="task"):
        metric_for("detection")
    assert isinstance(build_metrics("segmentation", num_classes=2), SegmentationMetrics)
    assert build_metrics("multilabel", num_classes=3).multilabel


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="logits must be"):
        ClassificationMetrics(3).update(torch.zeros(2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="target shape"):
        SegmentationMetrics(2).update(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 3))
