"""Losses against values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from medtransfer.train.losses import build_loss

LN2, LN3 = math.log(2), math.log(3)


def test_ce_known_values_and_label_layouts():
    loss = build_loss("ce", task="classification", num_classes=2)
    assert loss(torch.tensor([[0.0, 0.0]]), torch.tensor([0])).item() == pytest.approx(LN2)
    # softmax([ln3, 0]) = [3/4, 1/4]
    assert loss(torch.tensor([[LN3, 0.0]]), torch.tensor([0])).item() == pytest.approx(math.log(4 / 3))
    seg = build_loss("ce", task="segmentation", num_classes=2)
    logits = torch.tensor([[[[LN3, 0.0]], [[0.0, 0.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])  # (1, 1, 2): voxel 0 class 0 (p 3/4), voxel 1 class 1 (p 1/2)
    expected = (math.log(4 / 3) + LN2) / 2
    assert seg(logits, target).item() == pytest.approx(expected)
    assert seg(logits, target[:, None]).item() == pytest.approx(expected)  # (N, 1, *spatial) labels


def test_ce_ignore_index_and_label_smoothing():
    loss = build_loss("ce", task="classification", num_classes=2, ignore_index=-1)
    logits = torch.tensor([[LN3, 0.0], [50.0, -50.0]])
    assert loss(logits, torch.tensor([0, -1])).item() == pytest.approx(math.log(4 / 3))
    smooth = build_loss("ce", task="classification", num_classes=2, label_smoothing=0.2)
    # smoothed target [0.9, 0.1] against p = [3/4, 1/4]
    expected = -(0.9 * math.log(0.75) + 0.1 * math.log(0.25))
    assert smooth(logits[:1], torch.tensor([0])).item() == pytest.approx(expected)


def test_bce_masks_uncertain_targets():
    loss = build_loss("bce", task="classification", num_classes=3)
    logits = torch.tensor([[0.0, 100.0, LN3]], requires_grad=True)
    target = torch.tensor([[1.0, -1.0, 0.0]])
    value = loss(logits, target)
    # entries: -log(1/2) and -log(1 - 3/4); the -1 entry is left out of the sum and the count
    assert value.item() == pytest.approx((LN2 + math.log(4)) / 2)
    value.backward()
    assert logits.grad[0, 1].item() == 0.0
    all_uncertain = loss(logits, torch.full((1, 3), -1.0))
    assert all_uncertain.item() == 0.0


def test_bce_single_channel_accepts_target_without_channel_axis():
    loss = build_loss("bce", task="classification", num_classes=1)
    assert loss(torch.zeros(2, 1), torch.tensor([0.0, 1.0])).item() == pytest.approx(LN2)


def test_binary_dice_hand_value_and_perfect_prediction():
    loss = build_loss("dice", task="segmentation", num_classes=1)
    target = torch.tensor([[[0, 0, 1, 1]]])  # (1, 1, 4) label map
    # p = 1/2 everywhere: tp = 1, sum p = 2, sum t = 2 -> (2 + 1) / (2 + 2 + 1) = 3/5 with smooth 1
    assert loss(torch.zeros(1, 1, 1, 4), target).item() == pytest.approx(0.4)
    perfect = (target[:, None].float() * 2 - 1) * 30
    assert loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)


def test_multiclass_dice_with_and_without_background():
    target = torch.tensor([[[0, 0, 0, 1]]])
    logits = torch.zeros(1, 3, 1, 4)  # p = 1/3 for every class
    # class 0: tp 1, sum p 4/3, sum t 3 -> 3 / (16/3) = 9/16; class 1: (2/3 + 1) / (4/3 + 1 + 1) = 1/2;
    # class 2 (absent): 1 / (4/3 + 1) = 3/7
    with_bg = build_loss("dice", task="segmentation", num_classes=3)
    assert with_bg(logits, target).item() == pytest.approx(1 - (9 / 16 + 1 / 2 + 3 / 7) / 3)
    no_bg = build_loss("dice", task="segmentation", num_classes=3, include_background=False)
    assert no_bg(logits, target).item() == pytest.approx(1 - (1 / 2 + 3 / 7) / 2)
    perfect = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 40
    assert with_bg(perfect, target).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_ce_default_weights_are_half_half():
    target = torch.tensor([[[0, 0, 1, 1]]])
    logits = torch.zeros(1, 2, 1, 4, requires_grad=True)
    value = build_loss("dice_ce", task="segmentation", num_classes=2)(logits, target)
    # Dice: each class 3/5 -> 0.4; CE: ln 2
    assert value.item() == pytest.approx(0.5 * 0.4 + 0.5 * LN2)
    value.backward()
    assert logits.grad.abs().sum() > 0
    weighted = build_loss("dice_ce", task="segmentation", num_classes=2, lambda_dice=1.0, lambda_ce=0.3)
    assert weighted(logits, target).item() == pytest.approx(0.4 + 0.3 * LN2)
    binary = build_loss("dice_ce", task="segmentation", num_classes=1)
    assert binary(torch.zeros(1, 1, 1, 4), target).item() == pytest.approx(0.5 * 0.4 + 0.5 * LN2)


def test_focal_reduces_to_ce_and_downweights_easy_examples():
    logits, target = torch.tensor([[LN3, 0.0]]), torch.tensor([0])
    ce = build_loss("focal", task="classification", num_classes=2, gamma=0.0)
    assert ce(logits, target).item() == pytest.approx(math.log(4 / 3))
    focal = build_loss("focal", task="classification", num_classes=2)
    assert focal(logits, target).item() == pytest.approx(0.25**2 * math.log(4 / 3))
    sig = build_loss("focal", task="classification", num_classes=2, multilabel=True)
    # p = 1/2 for both entries: 0.5^2 * ln 2; the -1 entry is masked
    assert sig(torch.zeros(1, 2), torch.tensor([[1.0, -1.0]])).item() == pytest.approx(0.25 * LN2)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("nope", {"task": "segmentation", "num_classes": 2}, "loss name"),
        ("dice", {"task": "classification", "num_classes": 2}, "task='segmentation'"),
        ("ce", {"task": "classification", "num_classes": 1}, "num_classes >= 2"),
        ("ce", {"task": "detection", "num_classes": 2}, "task must be"),
        ("ce", {"task": "classification", "num_classes": 2, "smooth": 1}, "unknown option"),
        ("dice", {"task": "segmentation", "num_classes": 0}, "num_classes"),
    ],
)
def test_bad_arguments_name_the_field(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_loss(name, **kwargs)


def test_shape_mismatch_is_explained():
    loss = build_loss("dice", task="segmentation", num_classes=2)
    with pytest.raises(ValueError, match="label map"):
        loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 3, dtype=torch.long))
