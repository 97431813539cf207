"""Validation and test metrics that accumulate over batches and combine across DDP ranks.

Every metric object has ``update(logits, target)``, ``compute() -> dict[str, float]``, ``reset()``, and
``state() -> dict[str, Tensor]`` / ``merge(states)``: a DDP loop gathers each rank's ``state()`` (e.g. with
``torch.distributed.all_gather_object``) and calls ``merge`` on rank 0 (or on all ranks) before ``compute``.
Segmentation states are sums, so ``torch.distributed.all_reduce`` on each state tensor works as well.

Conventions (documented choices, with the seed system they follow, see ``spec/seed-systems.md``):

* Segmentation predictions are ``argmax`` over classes, or ``logit > 0`` for one channel (the same rule as
  :func:`medtransfer.train.inference.logits_to_labels`; a float32 ``sigmoid > 0.5`` would call logits in (0, 1e-7)
  negative), whose foreground is then class 1. Dice and IoU are computed **per case and per class**, then
  averaged over cases (MedicalNet 1c averages per-class Dice over the test list; BenchmarkTransferLearning's
  "mean per-image Dice" 5c).
  A case where a class is absent from both prediction and target has no Dice for that class: it is left out of
  that class's mean (not counted as 1). ``dice_mean``/``iou_mean`` average over the foreground classes (MedicalNet
  skips class 0). ``dice_global_mean`` pools voxel counts over all cases (BenchmarkTransferLearning's global Dice).
* HD95 (optional, slow): MONAI ``compute_hausdorff_distance`` with percentile 95, in millimetres when ``spacing``
  is given. A case where the class is empty in the prediction *or* the target is skipped for that class (MONAI
  would return inf/NaN), and counted in ``hd95_skipped_<c>``. A class with no measurable case reports NaN.
* Classification: ``accuracy`` is argmax accuracy (single-label) or the fraction of correct ``logit > 0`` decisions
  over all (case, class) entries (multi-label). ROC-AUC per class, computed from the Mann-Whitney rank statistic
  with tied scores given their mean rank (identical to sklearn's ``roc_auc_score`` on the same scores). The scores
  ranked are the float64 logits (multi-label/binary; the sigmoid is monotone) or the one-vs-rest log-odds of the
  softmax (single-label, :func:`one_vs_rest_log_odds`), never float32 probabilities, which round to 1.0 past a
  logit of ~16.7 and tie confident cases. A class whose targets are all one value has no AUC: NaN, left out of
  ``auc_mean`` (BenchmarkTransferLearning 5c averages per-class AUC). Multi-label targets < 0 (CheXpert
  uncertain) are left out of that class's AUC and accuracy.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable

import numpy as np
import torch

__all__ = [
    "SegmentationMetrics",
    "ClassificationMetrics",
    "roc_auc",
    "one_vs_rest_log_odds",
    "metric_for",
    "build_metrics",
]


def metric_for(task: str, *, multilabel: bool = False) -> tuple[str, str]:
    """The default validation metric for a task and whether higher is better ("max") or lower ("min").

    ``task``: "segmentation", "classification" (single-label unless ``multilabel``), "multilabel" or "detection"."""
    if task == "segmentation":
        return "dice_mean", "max"
    if task == "multilabel" or (task == "classification" and multilabel):
        return "auc_mean", "max"
    if task == "classification":
        return "accuracy", "max"
    if task == "detection":  # train/detection_metrics.py: mean sensitivity over the protocol's FP rates
        return "cpm", "max"
    raise ValueError(f"task must be 'segmentation', 'classification', 'multilabel' or 'detection', got {task!r}")


def _nanmean(values: Iterable[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(sum(kept) / len(kept)) if kept else float("nan")


def _mean_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, ties sharing the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # start index of each run of equal values
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    run_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=float)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def roc_auc(scores, targets) -> float:
    """Area under the ROC curve of ``scores`` for binary ``targets`` (1 = positive), via the rank statistic:
    ``(sum of positive ranks - P(P+1)/2) / (P * N)``. NaN when only one target value is present."""
    s = np.asarray(scores, dtype=float).ravel()
    t = np.asarray(targets).ravel() > 0.5
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _mean_ranks(s)
    return float((ranks[t].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def one_vs_rest_log_odds(logits: torch.Tensor) -> torch.Tensor:
    """``log(p_c / (1 - p_c))`` of the softmax of ``logits`` (N, C), C >= 2, in float64: ``x_c - logsumexp`` of
    the other logits. It orders cases as ``p_c`` does and, unlike ``log_softmax`` (which reaches exactly 0 for the
    top class once it leads by ~37 even in float64), does not saturate; for two classes it is ``x_0 - x_1`` and its
    negation, so ``auc_0 == auc_1``."""
    x = logits.double()
    k = x.shape[1]
    others = x.unsqueeze(1).expand(-1, k, -1).masked_fill(torch.eye(k, dtype=torch.bool), float("-inf"))
    return x - torch.logsumexp(others, dim=2)


def _seg_labels(logits: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)


class SegmentationMetrics:
    """Per-class Dice, IoU and optionally HD95 of label-map predictions, averaged over cases."""

    def __init__(
        self,
        num_classes: int,
        *,
        include_background: bool = False,
        hd95: bool = False,
        spacing: tuple[float, ...] | None = None,
    ):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        # one logit channel: a binary problem whose foreground is label 1
        n_labels = 2 if num_classes == 1 else num_classes
        first = 0 if include_background and num_classes > 1 else 1
        self.classes = list(range(first, n_labels))
        self.foreground = [c for c in self.classes if c != 0]
        self.hd95, self.spacing = hd95, spacing
        self.reset()

    def reset(self) -> None:
        k = len(self.classes)
        names = ["dice_sum", "dice_n", "iou_sum", "iou_n", "tp", "fp", "fn", "hd_sum", "hd_n", "hd_skipped"]
        self._state = {n: torch.zeros(k, dtype=torch.float64) for n in names}

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """``logits`` (N, C, *spatial); ``target`` (N, *spatial) or (N, 1, *spatial) integer labels."""
        pred = _seg_labels(logits.detach())
        if target.ndim == logits.ndim:
            target = target[:, 0]
        target = target.detach().to(pred.device).long()
        if target.shape != pred.shape:
            raise ValueError(f"target shape {tuple(target.shape)} does not fit logits {tuple(logits.shape)}")
        n = pred.shape[0]
        classes = torch.as_tensor(self.classes, device=pred.device).view(1, -1, *([1] * (pred.ndim - 1)))
        p = (pred.unsqueeze(1) == classes).flatten(2)  # (N, K, voxels)
        t = (target.unsqueeze(1) == classes).flatten(2)
        tp = (p & t).sum(-1).double().cpu()
        fp = (p & ~t).sum(-1).double().cpu()
        fn = (~p & t).sum(-1).double().cpu()
        present = (tp + fp + fn) > 0  # both empty -> no score for this (case, class)
        dice = torch.where(present, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.zeros_like(tp))
        iou = torch.where(present, tp / (tp + fp + fn).clamp(min=1), torch.zeros_like(tp))
        s = self._state
        s["dice_sum"] += dice.sum(0)
        s["iou_sum"] += iou.sum(0)
        s["dice_n"] += present.sum(0)
        s["iou_n"] += present.sum(0)
        s["tp"] += tp.sum(0)
        s["fp"] += fp.sum(0)
        s["fn"] += fn.sum(0)
        if self.hd95:
            grid = (n, len(self.classes), *pred.shape[1:])
            self._update_hd95(p.view(grid), t.view(grid))

    def _update_hd95(self, p: torch.Tensor, t: torch.Tensor) -> None:
        from monai.metrics import compute_hausdorff_distance

        measurable = (p.flatten(2).any(-1) & t.flatten(2).any(-1)).cpu()
        s = self._state
        s["hd_skipped"] += (~measurable).sum(0)
        for b, k in measurable.nonzero().tolist():
            with warnings.catch_warnings():  # MONAI 1.6 warns about its own deprecated internal argument
                warnings.simplefilter("ignore", FutureWarning)
                hd = compute_hausdorff_distance(
                    p[b : b + 1, k : k + 1].float(),
                    t[b : b + 1, k : k + 1].float(),
                    include_background=True,
                    percentile=95,
                    spacing=self.spacing,
                )
            s["hd_sum"][k] += float(hd.item())
            s["hd_n"][k] += 1

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._state.items()}

    def merge(self, states: Iterable[dict[str, torch.Tensor]]) -> None:
        """Add other ranks' states (sums) into this one."""
        for other in states:
            for k, v in other.items():
                self._state[k] += v.to(self._state[k])

    def compute(self) -> dict[str, float]:
        s = self._state
        out: dict[str, float] = {}

        def ratio(num, den):
            return [float(a / b) if b > 0 else float("nan") for a, b in zip(num.tolist(), den.tolist())]

        dice = ratio(s["dice_sum"], s["dice_n"])
        iou = ratio(s["iou_sum"], s["iou_n"])
        glob = ratio(2 * s["tp"], 2 * s["tp"] + s["fp"] + s["fn"])
        hd = ratio(s["hd_sum"], s["hd_n"])
        for i, c in enumerate(self.classes):
            out[f"dice_{c}"] = dice[i]
            out[f"iou_{c}"] = iou[i]
            if self.hd95:
                out[f"hd95_{c}"] = hd[i]
                out[f"hd95_skipped_{c}"] = float(s["hd_skipped"][i])
        fg = [i for i, c in enumerate(self.classes) if c != 0]
        out["dice_mean"] = _nanmean(dice[i] for i in fg)
        out["iou_mean"] = _nanmean(iou[i] for i in fg)
        out["dice_global_mean"] = _nanmean(glob[i] for i in fg)
        if self.hd95:
            out["hd95_mean"] = _nanmean(hd[i] for i in fg)
        return out


class ClassificationMetrics:
    """Accuracy and per-class ROC-AUC; keeps every score, since AUC is not a sum over batches."""

    def __init__(self, num_classes: int, *, multilabel: bool = False):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        # a single logit is a binary (sigmoid) problem, handled like one multi-label class
        self.num_classes, self.multilabel = num_classes, multilabel or num_classes == 1
        self.reset()

    def reset(self) -> None:
        self._logits: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """``logits`` (N, C); ``target`` class indices (N,) or 0/1 (-1 uncertain) floats (N, C)."""
        # float64 logits, not probabilities: a float32 sigmoid/softmax rounds to 1.0 past a logit of ~16.7 and
        # would tie confident scores in the AUC ranking
        logits = logits.detach().cpu().double()
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must be (N, {self.num_classes}), got {tuple(logits.shape)}")
        target = target.detach().cpu()
        if self.multilabel:
            if target.ndim == 1 and self.num_classes == 1:
                target = target.unsqueeze(1)
            target = target.float()
        else:
            target = target.long()
        expected = logits.shape if self.multilabel else logits.shape[:1]
        if target.shape != expected:
            raise ValueError(f"target shape {tuple(target.shape)} does not fit logits {tuple(logits.shape)}")
        self._logits.append(logits)
        self._targets.append(target)

    def state(self) -> dict[str, torch.Tensor]:
        empty_t = torch.zeros((0, self.num_classes) if self.multilabel else (0,))
        empty_l = torch.zeros(0, self.num_classes, dtype=torch.float64)
        return {
            "logits": torch.cat(self._logits) if self._logits else empty_l,
            "targets": torch.cat(self._targets) if self._targets else empty_t,
        }

    def merge(self, states: Iterable[dict[str, torch.Tensor]]) -> None:
        """Append other ranks' logits and targets to this one's."""
        for other in states:
            self._logits.append(other["logits"].cpu().double())
            self._targets.append(other["targets"].cpu())

    def compute(self) -> dict[str, float]:
        st = self.state()
        logits, targets = st["logits"], st["targets"].numpy()
        out: dict[str, float] = {}
        if self.multilabel:
            # the sigmoid is monotone: rank the logits themselves; decide positive where logit > 0
            scores = logits.numpy()
            valid = targets >= 0
            correct = ((scores > 0) == (targets > 0.5)) & valid
            out["accuracy"] = float(correct.sum() / valid.sum()) if valid.any() else float("nan")
            aucs = [roc_auc(scores[valid[:, c], c], targets[valid[:, c], c]) for c in range(self.num_classes)]
        else:
            scores = one_vs_rest_log_odds(logits).numpy()
            n = len(targets)
            out["accuracy"] = float((logits.argmax(1).numpy() == targets).mean()) if n else float("nan")
            aucs = [roc_auc(scores[:, c], targets == c) for c in range(self.num_classes)]
        for c, a in enumerate(aucs):
            out[f"auc_{c}"] = a
        out["auc_mean"] = _nanmean(aucs)
        return out


def build_metrics(task: str, *, num_classes: int, multilabel: bool = False, **kwargs):
    """The metric object for ``task`` ("segmentation" | "classification" | "multilabel")."""
    if task == "segmentation":
        return SegmentationMetrics(num_classes, **kwargs)
    if task in ("classification", "multilabel"):
        return ClassificationMetrics(num_classes, multilabel=multilabel or task == "multilabel", **kwargs)
    raise ValueError(f"task must be 'segmentation', 'classification' or 'multilabel', got {task!r}")
