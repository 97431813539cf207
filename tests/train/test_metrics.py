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
    assert metric_for("detection") == ("cpm", "max")
    with pytest.raises(ValueError, match="task"):
        metric_for("regression")
    assert isinstance(build_metrics("segmentation", num_classes=2), SegmentationMetrics)
    assert build_metrics("multilabel", num_classes=3).multilabel


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="logits must be"):
        ClassificationMetrics(3).update(torch.zeros(2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="target shape"):
        SegmentationMetrics(2).update(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 3))


def _mann_whitney_auc(scores, labels) -> float:
    """AUC as the Mann-Whitney U of the positives over P * N (scipy, exact float64 scores)."""
    from scipy.stats import mannwhitneyu

    scores, labels = torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels).bool()
    pos, neg = scores[labels].numpy(), scores[~labels].numpy()
    return float(mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))


def test_binary_auc_ranks_confident_logits_without_float32_ties():
    # float32 sigmoid(18) == sigmoid(20) == sigmoid(25) == 1.0: ranked as probabilities, AUC was 0.75
    logits = torch.tensor([[20.0], [25.0], [18.0], [-1.0]])
    target = torch.tensor([1, 1, 0, 0])
    m = ClassificationMetrics(1)
    m.update(logits, target)
    assert m.compute()["auc_0"] == 1.0
    assert _mann_whitney_auc(logits[:, 0], target) == 1.0


def test_two_class_softmax_auc_is_symmetric_for_large_logits():
    # margins of 40..70: float32 softmax gives p_0 == 1.0 to rows 0, 1, 2, 4, and float64 log_softmax gives
    # exactly 0.0 to the winner; before, auc_0 was 5 / 9 (the ties) and auc_1 7 / 9
    logits = torch.tensor([[30.0, -30.0], [35.0, -35.0], [25.0, -25.0], [-20.0, 20.0], [25.0, -20.0], [-1.0, 2.0]])
    target = torch.tensor([0, 0, 1, 1, 1, 0])
    m = ClassificationMetrics(2)
    m.update(logits, target)
    out = m.compute()
    margin = logits[:, 0] - logits[:, 1]  # p_0 is monotone in it
    # class 0 positives (margins 60, 70, -3) vs negatives (50, -40, 45): won 3 + 3 + 1 of 9 pairs
    assert _mann_whitney_auc(margin, target == 0) == pytest.approx(7 / 9)
    assert out["auc_0"] == pytest.approx(7 / 9, abs=1e-12)
    assert out["auc_1"] == pytest.approx(7 / 9, abs=1e-12)
    assert out["auc_0"] == out["auc_1"]
    # the same cases split across two ranks and merged through state() give the same values
    rank0, rank1 = ClassificationMetrics(2), ClassificationMetrics(2)
    rank0.update(logits[:3], target[:3])
    rank1.update(logits[3:], target[3:])
    rank0.merge([rank1.state()])
    assert rank0.compute() == out


def test_three_class_auc_matches_mann_whitney_on_exact_log_odds():
    logits = torch.tensor(
        [[40.0, 1.0, 0.0], [45.0, 0.0, 2.0], [38.0, 3.0, 3.0], [0.0, 50.0, 1.0], [1.0, 0.0, 60.0], [42.0, 42.0, 0.0]]
    )
    target = torch.tensor([0, 1, 0, 1, 2, 2])
    m = ClassificationMetrics(3)
    m.update(logits, target)
    out = m.compute()
    x = logits.double()
    for c in range(3):
        rest = torch.cat([x[:, :c], x[:, c + 1 :]], dim=1)
        exact = x[:, c] - torch.logsumexp(rest, dim=1)  # log(p_c / (1 - p_c))
        assert out[f"auc_{c}"] == pytest.approx(_mann_whitney_auc(exact, target == c), abs=1e-12)
    # class 0 by hand: positives 40 - log(e + 1) = 38.69 and 38 - log(2 e^3) = 34.31 against negatives
    # 45 - log(1 + e^2) = 42.87, about -50, -59 and -e^-42: each positive beats 3 of the 4 -> 6 / 8 (float32
    # softmax gave 1.0 to rows 0, 1, 2 and so 7 / 8)
    assert out["auc_0"] == pytest.approx(6 / 8)


def test_one_decision_rule_logit_above_zero_in_metrics_and_label_maps():
    from medtransfer.train.inference import logits_to_labels

    tiny = 1e-8  # float32 sigmoid(1e-8) == 0.5 exactly, so "sigmoid > 0.5" called it negative
    assert float(torch.sigmoid(torch.tensor(tiny))) == 0.5
    logits = torch.tensor([[tiny], [0.0], [-tiny]])
    m = ClassificationMetrics(1)
    m.update(logits, torch.tensor([1, 0, 0]))
    assert m.compute()["accuracy"] == 1.0
    wrong = ClassificationMetrics(1)
    wrong.update(logits, torch.tensor([0, 1, 1]))
    assert wrong.compute()["accuracy"] == 0.0
    multi = ClassificationMetrics(2, multilabel=True)
    multi.update(torch.tensor([[tiny, 0.0]]), torch.tensor([[1.0, 0.0]]))
    assert multi.compute()["accuracy"] == 1.0
    # the same three logits as a one-channel segmentation: 1, 0, 0 in the label map and in the Dice
    seg = logits.T.reshape(1, 1, 3)
    assert logits_to_labels(seg).tolist() == [[1, 0, 0]]
    sm = SegmentationMetrics(1)
    sm.update(seg, torch.tensor([[1, 0, 0]]))
    assert sm.compute()["dice_1"] == 1.0
