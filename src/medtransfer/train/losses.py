"""Loss functions for fine-tuning, all taking LOGITS (medtransfer models never apply sigmoid/softmax).

Targets are taken as the data layer gives them:

* segmentation: an integer label map ``(N, *spatial)`` or ``(N, 1, *spatial)``;
* classification, single label: class indices ``(N,)``;
* classification, multi-label (or binary with one logit): float 0/1 ``(N, C)`` (``(N,)`` is accepted for ``C == 1``).

Names and defaults, with the seed system each follows (``spec/seed-systems.md``):

=========  ==========================================================================================================
``ce``     cross-entropy; ``ignore_index`` (MedicalNet uses -1, 1c; default -100 as torch) and ``label_smoothing``
           (VDT's LIDC config "cos_smoo", 2c). Logits ``(N, C, ...)``.
``bce``    binary cross-entropy with logits (BenchmarkTransferLearning 5c, Models Genesis classification 3c).
           Target entries < 0 (CheXpert's -1 "uncertain") are **masked out**: they add nothing to the loss and the
           mean is over the remaining entries. Map them to 0/1 or LSR values in the dataset to train on them instead.
``dice``   soft Dice, ``smooth`` 1 in numerator and denominator, the sums taken over the whole batch (Models Genesis
           ``dice_coef`` flattens the batch, 3c; PyMIC does the same). ``num_classes == 1``: sigmoid on the single
           logit channel (binary); else softmax against a one-hot target, background included unless
           ``include_background=False``. Built on MONAI ``DiceLoss``.
``dice_ce`` ``lambda_dice * dice + lambda_ce * ce`` with 0.5/0.5 as PyMIC/MIS-FM (4c); with ``num_classes == 1``
           the CE term is the BCE above.
``focal``  focal loss, gamma 2 (Lin et al. 2017, "Focal Loss for Dense Object Detection"); sigmoid form for one
           channel or multi-label, softmax form otherwise.
=========  ==========================================================================================================
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

LOSSES = ("ce", "bce", "dice", "dice_ce", "focal")
TASKS = ("segmentation", "classification")


def _label_map(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """A segmentation target as an integer ``(N, *spatial)`` map, whichever of the two layouts it came in."""
    if target.ndim == logits.ndim and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not fit logits {tuple(logits.shape)}: expected a label map "
            f"(N, *spatial) or (N, 1, *spatial) with the logits' spatial size"
        )
    return target.long()


def _binary_target(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """A 0/1 (or -1 uncertain) target shaped like the logits, as float."""
    if target.ndim == logits.ndim - 1 and logits.shape[1] == 1:
        target = target.unsqueeze(1)
    if target.shape != logits.shape:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not fit logits {tuple(logits.shape)} for a sigmoid loss: "
            f"expected the logits' shape (or that shape without a channel axis of 1)"
        )
    return target.to(logits.dtype)


class CrossEntropyLoss(nn.Module):
    """Softmax cross-entropy on logits ``(N, C, ...)``; accepts ``(N, 1, *spatial)`` label maps."""

    def __init__(self, *, ignore_index: int = -100, label_smoothing: float = 0.0, weight=None):
        super().__init__()
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = _label_map(target, logits)
        return F.cross_entropy(
            logits, target, weight=self.weight, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing
        )


class MaskedBCEWithLogitsLoss(nn.Module):
    """BCE with logits whose targets < 0 (uncertain, CheXpert's -1) are left out of the loss and of the mean."""

    def __init__(self, *, pos_weight=None):
        super().__init__()
        pos_weight = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = _binary_target(target, logits)
        valid = target >= 0
        pos_weight = self.pos_weight
        if pos_weight is not None and logits.ndim > 2:  # per-channel weight broadcast over the spatial axes
            pos_weight = pos_weight.view(-1, *([1] * (logits.ndim - 2)))
        per_entry = F.binary_cross_entropy_with_logits(
            logits, target.clamp(min=0), pos_weight=pos_weight, reduction="none"
        )
        # an all-uncertain batch gives 0 with a gradient path, not NaN
        return (per_entry * valid).sum() / valid.sum().clamp(min=1)


class SoftDiceLoss(nn.Module):
    """Soft Dice on logits through MONAI ``DiceLoss``: sigmoid for one channel, softmax + one-hot otherwise."""

    def __init__(
        self,
        *,
        num_classes: int,
        smooth: float = 1.0,
        include_background: bool = True,
        batch: bool = True,
        ignore_index: int | None = None,
    ):
        super().__init__()
        self.num_classes = num_classes
        binary = num_classes == 1
        self.dice = DiceLoss(
            include_background=True if binary else include_background,
            to_onehot_y=not binary,
            sigmoid=binary,
            softmax=not binary,
            smooth_nr=smooth,
            smooth_dr=smooth,
            batch=batch,
            ignore_index=ignore_index,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits have {logits.shape[1]} channels but the loss was built for num_classes={self.num_classes}"
            )
        if self.num_classes == 1:
            return self.dice(logits, _binary_target(target, logits))
        return self.dice(logits, _label_map(target, logits).unsqueeze(1))


class DiceCELoss(nn.Module):
    """``lambda_dice * Dice + lambda_ce * CE`` (BCE for a single channel); PyMIC's 0.5/0.5 by default."""

    def __init__(self, dice: nn.Module, ce: nn.Module, *, lambda_dice: float = 0.5, lambda_ce: float = 0.5):
        super().__init__()
        self.dice, self.ce = dice, ce
        self.lambda_dice, self.lambda_ce = lambda_dice, lambda_ce

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.lambda_dice * self.dice(logits, target) + self.lambda_ce * self.ce(logits, target)


class FocalLoss(nn.Module):
    """Focal loss ``-(1 - p_t)^gamma log p_t`` (Lin et al. 2017), mean over entries; ``gamma=0`` gives (B)CE."""

    def __init__(self, *, sigmoid: bool, gamma: float = 2.0, ignore_index: int = -100):
        super().__init__()
        self.sigmoid, self.gamma, self.ignore_index = sigmoid, gamma, ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.sigmoid:
            target = _binary_target(target, logits)
            valid = target >= 0
            t = target.clamp(min=0)
            log_pt = -F.binary_cross_entropy_with_logits(logits, t, reduction="none")
        else:
            labels = _label_map(target, logits)
            valid = labels != self.ignore_index
            log_p = F.log_softmax(logits, dim=1)
            log_pt = log_p.gather(1, labels.clamp(min=0).masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
        loss = -((1 - log_pt.exp()) ** self.gamma) * log_pt
        return (loss * valid).sum() / valid.sum().clamp(min=1)


def build_loss(name: str, *, task: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """The loss ``name`` for ``task`` ("segmentation" | "classification") with ``num_classes`` output channels.

    Keyword options: ``ce``: ``ignore_index``, ``label_smoothing``, ``weight``; ``bce``: ``pos_weight``; ``dice``:
    ``smooth``, ``include_background``, ``batch``, ``ignore_index``; ``dice_ce``: those of dice and ce plus
    ``lambda_dice``, ``lambda_ce``; ``focal``: ``gamma``, ``ignore_index``, ``multilabel`` (classification)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if name not in LOSSES:
        raise ValueError(f"loss name must be one of {LOSSES}, got {name!r}")
    if name in ("dice", "dice_ce") and task != "segmentation":
        raise ValueError(f"loss {name!r} is for task='segmentation', not {task!r}")
    if name == "ce" and num_classes == 1:
        raise ValueError("loss 'ce' needs num_classes >= 2 (softmax); use 'bce' for a single output channel")

    def take(*names: str) -> dict[str, Any]:
        return {n: kwargs.pop(n) for n in names if n in kwargs}

    if name == "ce":
        loss: nn.Module = CrossEntropyLoss(**take("ignore_index", "label_smoothing", "weight"))
    elif name == "bce":
        loss = MaskedBCEWithLogitsLoss(**take("pos_weight"))
    elif name == "dice":
        loss = SoftDiceLoss(num_classes=num_classes, **take("smooth", "include_background", "batch", "ignore_index"))
    elif name == "dice_ce":
        weights = take("lambda_dice", "lambda_ce")
        ignore = take("ignore_index")
        dice = SoftDiceLoss(num_classes=num_classes, **ignore, **take("smooth", "include_background", "batch"))
        if num_classes == 1:
            ce: nn.Module = MaskedBCEWithLogitsLoss(**take("pos_weight"))
        else:
            ce = CrossEntropyLoss(**ignore, **take("label_smoothing", "weight"))
        loss = DiceCELoss(dice, ce, **weights)
    else:
        multilabel = kwargs.pop("multilabel", False)
        loss = FocalLoss(sigmoid=num_classes == 1 or multilabel, **take("gamma", "ignore_index"))
    if kwargs:
        raise ValueError(f"unknown option(s) for loss {name!r}: {sorted(kwargs)}")
    return loss
