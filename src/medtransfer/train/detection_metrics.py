"""Detection metrics: FROC (LUNA16's CPM, DeepLesion's sensitivity at FPs per image) and COCO mAP.

Rules, read from LUNA16's official ``noduleCADEvaluationLUNA16.py`` (evaluationScript) and followed here:

* a detection *hits* a nodule when its centre lies strictly inside the nodule's sphere
  (``squared distance < (diameter / 2) ** 2``);
* several detections on one nodule count **one** true positive, scored with the highest of their scores; the other
  detections on it are dropped, *not* counted as false positives ("double detections ignored");
* one detection inside two nodules hits both;
* every detection that hits no nodule is a false positive; a nodule no detection hits stays in the denominator;
* the FROC curve has one point per distinct score threshold ``t``: ``fps(t) = #FP >= t / n_scans``,
  ``sens(t) = #TP >= t / #nodules`` (sklearn's ``roc_curve`` groups tied scores the same way), starting at (0, 0);
  the sensitivity at an FP rate is the **linear interpolation** of that curve (``np.interp``; at a vertical step the
  top of the step); CPM = the mean over 1/8, 1/4, 1/2, 1, 2, 4, 8 FPs per scan.
  Not implemented: ``annotations_excluded.csv`` (detections on excluded findings ignored) and the bootstrap.

DeepLesion (Yan et al.'s ``sens_at_FP``): a hit is ``IoU >= 0.5`` with a lesion box, the same one-TP-per-lesion and
no-FP-for-duplicates rules, per-image FP rates 0.5 .. 16, and a **step** curve: the sensitivity at the lowest
threshold whose FP rate is <= the target. Deviation: tied scores enter together (the original adds detections one
by one in ``argsort`` order, so its result depends on the order of ties).

mAP at IoU 0.1: MONAI's ``COCOMetric`` (``AP_IoU_0.10_MaxDet_100`` averaged over classes) on MONAI's
``matching_batch``. :class:`DetectionMetrics` is the loop's metric object; its ``state``/``merge`` carry every
detection and lesion so ranks combine through :func:`medtransfer.train.distributed.all_gather_object`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Optional, Sequence

import numpy as np
import torch

from medtransfer.train.distributed import all_gather_object, get_rank

__all__ = [
    "LUNA16_FPS",
    "DEEPLESION_FPS",
    "Matching",
    "match_detections",
    "box_hit",
    "froc",
    "froc_points",
    "deeplesion_sensitivity",
    "coco_map",
    "DetectionMetrics",
    "gather_metrics",
]

LUNA16_FPS = (0.125, 0.25, 0.5, 1, 2, 4, 8)
DEEPLESION_FPS = (0.5, 1, 2, 4, 8, 16)


@dataclass
class Matching:
    """The outcome of matching detections to lesions.

    ``lesion_score[j]``: the highest score of a detection hitting lesion ``j`` (NaN when missed);
    ``lesion_hit_by[j]``: the index of that detection in the input list (-1 when missed);
    ``is_fp[i]``: detection ``i`` hits no lesion."""

    lesion_score: np.ndarray
    lesion_hit_by: np.ndarray
    is_fp: np.ndarray
    scores: np.ndarray

    @property
    def tp_scores(self) -> np.ndarray:
        return self.lesion_score[~np.isnan(self.lesion_score)]

    @property
    def fp_scores(self) -> np.ndarray:
        return self.scores[self.is_fp]


def _centre_in_ellipsoid(det_centres: np.ndarray, lesion_centre: np.ndarray, radius: np.ndarray) -> np.ndarray:
    d = (det_centres - lesion_centre) / radius
    return (d * d).sum(axis=1) < 1.0  # strict, as LUNA16's ``dist < radiusSquared``


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of corner boxes ``a`` (N, 2d) with ``b`` (M, 2d) -> (N, M); float64, no MONAI dtype casts."""
    d = a.shape[1] // 2
    lo = np.maximum(a[:, None, :d], b[None, :, :d])
    hi = np.minimum(a[:, None, d:], b[None, :, d:])
    inter = np.clip(hi - lo, 0, None).prod(axis=2)
    va = np.clip(a[:, d:] - a[:, :d], 0, None).prod(axis=1)
    vb = np.clip(b[:, d:] - b[:, :d], 0, None).prod(axis=1)
    union = va[:, None] + vb[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_detections(
    detections: Sequence[tuple], lesions: Sequence[tuple], hit: Callable[[np.ndarray, tuple], np.ndarray]
) -> Matching:
    """Match ``detections`` [(case_id, score, geometry)] to ``lesions`` [(case_id, *geometry)] case by case;
    ``hit(det_geometries (n, k), lesion_entry) -> bool (n,)`` decides a hit."""
    scores = np.array([float(d[1]) for d in detections], dtype=np.float64)
    is_fp = np.ones(len(detections), dtype=bool)
    by_case: dict[Hashable, list[int]] = defaultdict(list)
    for i, d in enumerate(detections):
        by_case[d[0]].append(i)
    lesion_score = np.full(len(lesions), np.nan)
    lesion_hit_by = np.full(len(lesions), -1, dtype=np.int64)
    geoms = {c: np.asarray([np.asarray(detections[i][2], dtype=np.float64) for i in idx]) for c, idx in by_case.items()}
    for j, les in enumerate(lesions):
        idx = by_case.get(les[0])
        if not idx:
            continue
        hits = np.asarray(hit(geoms[les[0]], les), dtype=bool)
        if hits.any():
            members = np.asarray(idx)[hits]
            best = members[np.argmax(scores[members])]
            lesion_score[j], lesion_hit_by[j] = scores[best], best
            is_fp[members] = False
    return Matching(lesion_score, lesion_hit_by, is_fp, scores)


def _curve(tp_scores: np.ndarray, fp_scores: np.ndarray, n_lesions: int, n_scans: int) -> tuple[np.ndarray, np.ndarray]:
    """FROC points (fps per scan, sensitivity) at every distinct threshold, highest first, from (0, 0)."""
    thresholds = np.unique(np.concatenate([tp_scores, fp_scores]))[::-1]
    tp_sorted, fp_sorted = np.sort(tp_scores), np.sort(fp_scores)
    n_tp = len(tp_sorted) - np.searchsorted(tp_sorted, thresholds, side="left")  # count of scores >= t
    n_fp = len(fp_sorted) - np.searchsorted(fp_sorted, thresholds, side="left")
    fps = np.concatenate([[0.0], n_fp / n_scans])
    sens = np.concatenate([[0.0], n_tp / n_lesions if n_lesions else np.zeros(len(thresholds))])
    return fps, sens


def _at(fps: np.ndarray, sens: np.ndarray, targets: Iterable[float], interpolation: str) -> list[float]:
    out = []
    for f in targets:
        if interpolation == "linear":
            out.append(float(np.interp(f, fps, sens)))
        else:  # step: the last (lowest-threshold) point still within the FP budget
            out.append(float(sens[np.nonzero(fps <= f)[0][-1]]))
    return out


def _summary(m: Matching, n_lesions: int, n_scans: int, fps: Sequence[float], interpolation: str) -> dict[str, float]:
    if n_scans <= 0:
        raise ValueError(f"n_scans must be > 0, got {n_scans}")
    if interpolation not in ("linear", "step"):
        raise ValueError(f"interpolation must be 'linear' or 'step', got {interpolation!r}")
    if n_lesions == 0:
        nan = float("nan")
        return {**{f"sensitivity@{f:g}": nan for f in fps}, "cpm": nan}
    curve = _curve(m.tp_scores, m.fp_scores, n_lesions, n_scans)
    values = _at(*curve, fps, interpolation)
    out = {f"sensitivity@{f:g}": v for f, v in zip(fps, values)}
    out["cpm"] = float(np.mean(values))
    return out


def box_hit(kind: str, iou: float = 0.5) -> Callable[[np.ndarray, tuple], np.ndarray]:
    if kind == "iou":
        return lambda dets, les: _iou(dets, np.asarray(les[1], dtype=np.float64)[None])[:, 0] >= iou

    def centre_in_radius(dets: np.ndarray, les: tuple) -> np.ndarray:
        box = np.asarray(les[1], dtype=np.float64)
        d = box.shape[0] // 2
        centre = (box[:d] + box[d:]) / 2
        # without a radius, the ellipsoid inscribed in the box (the LUNA16 sphere when the box is a cube)
        radius = np.full(d, float(les[2])) if len(les) > 2 else (box[d:] - box[:d]) / 2
        return _centre_in_ellipsoid((dets[:, :d] + dets[:, d:]) / 2, centre, radius)

    if kind != "centre_in_radius":
        raise ValueError(f"hit must be 'centre_in_radius' or 'iou', got {kind!r}")
    return centre_in_radius


def froc(
    detections: Sequence[tuple],
    lesions: Sequence[tuple],
    *,
    n_scans: int,
    fps: Sequence[float] = LUNA16_FPS,
    hit: str = "centre_in_radius",
    iou: float = 0.5,
    interpolation: Optional[str] = None,
) -> dict[str, float]:
    """FROC of corner-mode boxes: ``detections`` [(case_id, score, box (2d,))], ``lesions`` [(case_id, box[, radius])]
    in the same coordinates; ``n_scans`` counts every scan evaluated, including those without detections.

    ``hit="centre_in_radius"``: the detection box centre inside the lesion sphere of ``radius`` (or inside the
    ellipsoid inscribed in the lesion box); ``hit="iou"``: ``IoU >= iou``. ``interpolation`` defaults to LUNA16's
    "linear" for centre hits and DeepLesion's "step" for IoU hits. Returns ``{"sensitivity@<fp>": .., "cpm": mean}``
    (NaN when there are no lesions)."""
    m = match_detections(detections, lesions, box_hit(hit, iou))
    interpolation = interpolation or ("linear" if hit == "centre_in_radius" else "step")
    return _summary(m, len(lesions), n_scans, fps, interpolation)


def froc_points(
    candidates: Sequence[tuple],
    nodules: Sequence[tuple],
    *,
    n_scans: int,
    fps: Sequence[float] = LUNA16_FPS,
) -> dict[str, float]:
    """LUNA16 FROC of points: ``candidates`` [(case_id, score, centre)], ``nodules`` [(case_id, centre, radius)]
    (e.g. world mm and ``diameter_mm / 2``; LUNA16 takes 10 mm for a negative diameter, the caller's choice here)."""

    def hit(dets: np.ndarray, nod: tuple) -> np.ndarray:
        centre = np.asarray(nod[1], dtype=np.float64)
        return _centre_in_ellipsoid(dets, centre, np.full(centre.shape, float(nod[2])))

    return _summary(match_detections(candidates, nodules, hit), len(nodules), n_scans, fps, "linear")


def deeplesion_sensitivity(
    detections: Sequence[tuple], lesions: Sequence[tuple], *, n_images: int, fps: Sequence[float] = DEEPLESION_FPS,
    iou: float = 0.5,
) -> dict[str, float]:
    """DeepLesion's sensitivity at 0.5 .. 16 FPs per image at ``IoU >= iou`` (step curve); "cpm" is their mean."""
    return froc(detections, lesions, n_scans=n_images, fps=fps, hit="iou", iou=iou, interpolation="step")


def coco_map(
    pred: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    gt: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    num_classes: int,
    iou: float = 0.1,
    max_detections: int = 100,
) -> float:
    """Mean AP over classes at one IoU with MONAI's ``COCOMetric``: ``pred`` per image (boxes (D, 2d), scores (D,),
    labels (D,) 1-based), ``gt`` per image (boxes (G, 2d), labels (G,) 1-based)."""
    from monai.apps.detection.metrics.coco import COCOMetric
    from monai.apps.detection.metrics.matching import matching_batch
    from monai.data.box_utils import box_iou

    metric = COCOMetric(classes=[str(c) for c in range(1, num_classes + 1)], iou_list=[iou],
                        iou_range=(iou, iou, 0.05), max_detection=[max_detections], verbose=False)
    results = matching_batch(
        iou_fn=box_iou, iou_thresholds=metric.iou_thresholds,
        pred_boxes=[np.asarray(p[0], dtype=np.float64) for p in pred],
        pred_scores=[np.asarray(p[1], dtype=np.float64) for p in pred],
        pred_classes=[np.asarray(p[2], dtype=np.int64) - 1 for p in pred],
        gt_boxes=[np.asarray(g[0], dtype=np.float64) for g in gt],
        gt_classes=[np.asarray(g[1], dtype=np.int64) - 1 for g in gt],
        max_detections=max_detections,
    )
    values, _ = metric(results)
    return float(values[f"AP_IoU_{iou:.2f}_MaxDet_{max_detections}"])


class DetectionMetrics:
    """The loop's metric object for detection: ``update(out, target)`` runs ``postprocess(out, image_shape)`` (the
    detector's) and keeps every image's detections and lesions; ``compute`` gives FROC, CPM and mAP@0.1.

    ``target`` is the padded (B, Nmax, 2d + 1) box tensor (box + label, rows of -1 padding). ``protocol``:
    "luna16" (centre hits, 1/8..8 FPs per scan) or "deeplesion" (IoU >= 0.5, 0.5..16 FPs per image)."""

    def __init__(self, postprocess: Callable, *, num_classes: int = 1, protocol: str = "luna16",
                 image_shape: Optional[Sequence[int]] = None):
        if protocol not in ("luna16", "deeplesion"):
            raise ValueError(f"protocol must be 'luna16' or 'deeplesion', got {protocol!r}")
        self.postprocess, self.num_classes, self.protocol = postprocess, num_classes, protocol
        self.image_shape = image_shape
        self.reset()

    def reset(self) -> None:
        self._det: list[torch.Tensor] = []  # rows: image, box..., score, label
        self._gt: list[torch.Tensor] = []  # rows: image, box..., label
        self._n_images = 0

    def update(self, out: torch.Tensor, target: torch.Tensor, image_shape: Optional[Sequence[int]] = None) -> None:
        per_image = self.postprocess(out, image_shape or self.image_shape)
        target = target.detach().cpu().double()
        for b, (boxes, scores, labels) in enumerate(per_image):
            idx = float(self._n_images)
            self._det.append(torch.cat([torch.full((len(boxes), 1), idx, dtype=torch.float64), boxes.double().cpu(),
                                        scores.double().cpu()[:, None], labels.double().cpu()[:, None]], 1))
            rows = target[b][target[b, :, -1] >= 0]
            self._gt.append(torch.cat([torch.full((len(rows), 1), idx, dtype=torch.float64), rows], 1))
            self._n_images += 1

    def state(self) -> dict[str, torch.Tensor]:
        det = torch.cat(self._det) if self._det else torch.zeros(0, 0, dtype=torch.float64)
        gt = torch.cat(self._gt) if self._gt else torch.zeros(0, 0, dtype=torch.float64)
        return {"det": det, "gt": gt, "n_images": torch.tensor(self._n_images)}

    def merge(self, states: Iterable[dict[str, torch.Tensor]]) -> None:
        """Append other ranks' images (renumbered after this rank's)."""
        for other in states:
            offset, n = float(self._n_images), int(other["n_images"])
            for key, store in (("det", self._det), ("gt", self._gt)):
                t = other[key].double().cpu().clone()
                if t.numel():
                    t[:, 0] += offset
                    store.append(t)
            self._n_images += n

    def _per_image(self):
        st = self.state()
        det, gt, n = st["det"].numpy(), st["gt"].numpy(), self._n_images
        gt = gt.reshape(-1, gt.shape[1]) if gt.size else np.zeros((0, 3))
        # no detections at all (an untrained model's validation): columns image, box, score, label all the same,
        # as the box width is read from the lesions
        det = det.reshape(-1, det.shape[1]) if det.size else np.zeros((0, gt.shape[1] + 1 if len(gt) else 4))
        return det, gt, n

    def compute(self) -> dict[str, float]:
        det, gt, n = self._per_image()
        if n == 0:
            return {"cpm": float("nan"), "map_iou0.1": float("nan")}
        dim2 = (gt.shape[1] - 2) if len(gt) else (det.shape[1] - 3)
        detections = [(int(r[0]), float(r[1 + dim2]), r[1:1 + dim2]) for r in det]
        lesions = [(int(r[0]), r[1:1 + dim2]) for r in gt]
        if self.protocol == "luna16":
            out = froc(detections, lesions, n_scans=n)
        else:
            out = deeplesion_sensitivity(detections, lesions, n_images=n)
        pred = [(det[det[:, 0] == i, 1:1 + dim2], det[det[:, 0] == i, 1 + dim2], det[det[:, 0] == i, 2 + dim2])
                for i in range(n)]
        truth = [(gt[gt[:, 0] == i, 1:1 + dim2], gt[gt[:, 0] == i, 1 + dim2]) for i in range(n)]
        out["map_iou0.1"] = coco_map(pred, truth, num_classes=self.num_classes) if len(gt) else float("nan")
        return out


def gather_metrics(metrics: DetectionMetrics) -> DetectionMetrics:
    """Merge every DDP rank's detections into ``metrics`` (a no-op single-process); for callers outside the loop."""
    states = all_gather_object({k: v.cpu() for k, v in metrics.state().items()})
    metrics.merge([s for r, s in enumerate(states) if r != get_rank()])
    return metrics
