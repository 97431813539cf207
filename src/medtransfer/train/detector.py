"""RetinaNet on any zoo encoder, built from MONAI's detection components, in the shape the standard loop trains.

It lives in ``train/`` rather than ``zoo/``: it is not a registry family (no weights of its own, any zoo encoder is
its backbone) and most of it is the training-side loss and postprocessing.

* :class:`EncoderPyramid` takes the stage maps of a zoo model (``forward_pyramid`` of the ResNets, the encoder
  outputs of Genesis' UNet3D / FMUNet / PCT-Net, or a list from ``forward_features``, e.g. P3D-63's four 2D stage
  maps), keeps one map per distinct resolution (the deepest one: a dilated MedicalNet, whose layer2..4 all stay
  at stride 8, gives layer1 and layer4), drops maps finer than ``min_stride`` and keeps at most ``num_levels``.
  Which stages these are is found once by a probe forward at construction and stated in ``describe()``.
* MONAI's ``FeaturePyramidNetwork`` turns them into ``fpn_channels`` maps; MONAI's RetinaNet classification and
  regression heads run on each level.
* The network returns **one tensor** (the loop calls ``out.float()`` and ``loss_fn(out, target)``):
  ``(B, A + 1, C + 4d + 1)``: per anchor ``[class logits (C) | box deltas (2d) | anchor box (2d) | level]``, in
  MONAI's anchor order (location-major, then anchor); the last row carries the padded input's spatial size in the
  anchor columns and level -1.
* :class:`DetectionLoss` and :class:`Postprocess` hand these to a MONAI ``RetinaNetDetector`` used as an engine
  (its network is a stub): ATSS matching, hard-negative sampling, focal (or BCE) classification loss and smooth-L1
  box loss exactly as ``RetinaNetDetector.compute_loss``; decoding, score threshold, top-k per level and NMS as
  ``postprocess_detections``.

Targets: a padded tensor (B, Nmax, 2d + 1): voxel corner boxes in array order (``data/boxes.py``) + 1-based
label, rows of -1 padding. Detections come back in the same convention with 1-based labels.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medtransfer.errors import MedTransferError

__all__ = [
    "EncoderPyramid",
    "RetinaNetDetectionModel",
    "DetectionLoss",
    "Postprocess",
    "build_detector",
    "unpack",
    "targets_from_padded",
    "pad_targets",
]

log = logging.getLogger(__name__)

# MONAI's LUNA16 RetinaNet (model-zoo lung_nodule_ct_detection configs/train.json): anchor shapes in voxels at the
# finest level, doubled per level.
MONAI_LUNA_ANCHOR_SHAPES = ((6, 8, 4), (8, 6, 5), (10, 10, 6))


def _stage_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every stage output a zoo model exposes, finest first."""
    if hasattr(model, "forward_pyramid"):
        return list(model.forward_pyramid(x))
    if hasattr(model, "_encode"):
        out = model._encode(x)
        flat: list[torch.Tensor] = []
        for item in out if isinstance(out, (list, tuple)) else [out]:
            flat.extend(item if isinstance(item, (list, tuple)) else [item])
        return flat
    feats = model.forward_features(x)
    return list(feats) if isinstance(feats, (list, tuple)) else [feats]


class EncoderPyramid(nn.Module):
    """The distinct-resolution stage maps of a zoo encoder, finest first (see the module docstring)."""

    def __init__(self, encoder: nn.Module, *, spatial_dims: int, in_channels: int, min_stride: int = 4,
                 num_levels: int = 3, probe_size: Optional[Sequence[int]] = None):
        super().__init__()
        self.encoder = encoder
        self.spatial_dims = spatial_dims
        enc_dims = int(getattr(encoder, "spatial_dims", spatial_dims))
        # a 3D encoder on a 2.5D stack (P3D-63): the K slices become its depth axis, its stage maps are 2D
        self.unsqueeze = enc_dims == 3 and spatial_dims == 2
        if probe_size is None:
            probe_size = (32,) * spatial_dims if spatial_dims == 3 else (64,) * spatial_dims
        probe_size = tuple(int(s) for s in probe_size)
        was_training = encoder.training
        encoder.eval()
        with torch.no_grad():
            maps = _stage_maps(encoder, self._prepare(torch.zeros(1, in_channels, *probe_size)))
        encoder.train(was_training)
        shapes = [tuple(m.shape[2:]) for m in maps]
        if any(len(s) != spatial_dims for s in shapes):
            raise MedTransferError(
                f"{type(encoder).__name__} returns {len(shapes[0])}D stage maps; a {spatial_dims}D detector needs "
                f"{spatial_dims}D maps"
            )
        keep = [i for i in range(len(maps)) if i + 1 == len(maps) or shapes[i + 1] != shapes[i]]
        strides = {i: tuple(p // s for p, s in zip(probe_size, shapes[i])) for i in keep}
        keep = [i for i in keep if max(strides[i]) >= min_stride][:num_levels]
        if not keep:
            raise MedTransferError(f"{type(encoder).__name__} has no stage at stride >= {min_stride}")
        self.indices = keep
        self.strides = [strides[i] for i in keep]
        self.channels = [int(maps[i].shape[1]) for i in keep]
        # the input is padded to a multiple of the coarsest stage of the whole encoder
        self.size_divisible = tuple(p // s for p, s in zip(probe_size, shapes[-1]))
        self.all_shapes = shapes

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1) if self.unsqueeze else x

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = _stage_maps(self.encoder, self._prepare(x))
        return [maps[i] for i in self.indices]


def _anchor_generator(spatial_dims: int, strides: Sequence[Sequence[int]], anchor_shapes, anchor_scale, anchor_ratios):
    from monai.apps.detection.utils.anchor_utils import AnchorGenerator, AnchorGeneratorWithAnchorShape

    if anchor_shapes is not None:
        shapes = [tuple(float(v) for v in s) for s in anchor_shapes]
        if any(len(s) != spatial_dims for s in shapes):
            raise MedTransferError(f"anchor shapes must have {spatial_dims} values each, got {anchor_shapes}")
        base = max(strides[0])
        return AnchorGeneratorWithAnchorShape(feature_map_scales=[max(s) / base for s in strides],
                                              base_anchor_shapes=shapes), len(shapes)
    ratios = tuple(float(r) for r in anchor_ratios)
    # mmdet's AnchorGenerator(scales=[s], ratios): base size = scale * stride of the level, h/w = ratio
    sizes = [(anchor_scale * max(s),) for s in strides]
    if spatial_dims == 2:
        return AnchorGenerator(sizes=sizes, aspect_ratios=(ratios,) * len(strides)), len(ratios)
    return AnchorGenerator(sizes=sizes, aspect_ratios=(tuple((r, 1.0) for r in ratios),) * len(strides)), len(ratios)


class RetinaNetDetectionModel(nn.Module):
    """Zoo encoder -> FPN -> RetinaNet heads; returns the packed tensor described in the module docstring."""

    cls_key, box_reg_key = "classification", "box_regression"

    def __init__(self, encoder: nn.Module, *, spatial_dims: int, in_channels: int, num_classes: int = 1,
                 fpn_channels: int = 128, min_stride: int = 4, num_levels: int = 3,
                 anchor_shapes: Optional[Sequence[Sequence[float]]] = None, anchor_scale: float = 4.0,
                 anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0), probe_size: Optional[Sequence[int]] = None):
        super().__init__()
        from monai.apps.detection.networks.retinanet_network import (
            RetinaNetClassificationHead,
            RetinaNetRegressionHead,
        )
        from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork

        self.spatial_dims, self.num_classes, self.in_channels = spatial_dims, num_classes, in_channels
        self.pyramid = EncoderPyramid(encoder, spatial_dims=spatial_dims, in_channels=in_channels,
                                      min_stride=min_stride, num_levels=num_levels, probe_size=probe_size)
        self.fpn = FeaturePyramidNetwork(spatial_dims, self.pyramid.channels, fpn_channels)
        self.anchor_generator, self.num_anchors = _anchor_generator(
            spatial_dims, self.pyramid.strides, anchor_shapes, anchor_scale, anchor_ratios)
        self.classification_head = RetinaNetClassificationHead(fpn_channels, self.num_anchors, num_classes,
                                                               spatial_dims=spatial_dims)
        self.regression_head = RetinaNetRegressionHead(fpn_channels, self.num_anchors, spatial_dims=spatial_dims)
        self.size_divisible = self.pyramid.size_divisible
        prefixes = tuple(getattr(encoder, "encoder_prefixes", ()) or ())
        self.encoder_prefixes = tuple(f"pyramid.encoder.{p}" for p in prefixes)
        self.load_report = getattr(encoder, "load_report", None)
        self._anchor_cache: dict[Any, torch.Tensor] = {}

    @property
    def encoder(self) -> nn.Module:
        return self.pyramid.encoder

    def describe(self) -> str:
        s = ", ".join(f"stage {i} stride {'x'.join(map(str, st))} ({c} ch)"
                      for i, st, c in zip(self.pyramid.indices, self.pyramid.strides, self.pyramid.channels))
        return f"RetinaNet on {type(self.encoder).__name__}: {s}; {self.num_anchors} anchors per location"

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        target = [-(-s // d) * d for s, d in zip(size, self.size_divisible)]
        if list(size) == target:
            return x
        pad: list[int] = []
        for s, t in reversed(list(zip(size, target))):
            pad += [0, t - s]  # at the far end only: voxel coordinates of boxes do not move
        return F.pad(x, pad)

    def _anchors(self, image: torch.Tensor, maps: list[torch.Tensor]) -> torch.Tensor:
        shapes = tuple(tuple(m.shape[2:]) for m in maps)
        key = (tuple(image.shape[2:]), shapes, image.device)
        if key not in self._anchor_cache:
            # float32 stand-ins: MONAI takes the anchors' dtype from these, and bf16 anchors (autocast) lose voxels
            dummies = [torch.empty((1, 1) + s, device=image.device) for s in shapes]
            anchors = self.anchor_generator(torch.empty((1, 1) + tuple(image.shape[2:]), device=image.device),
                                            dummies)[0]
            levels = torch.cat([torch.full((s.numel() * self.num_anchors,), float(i), device=image.device)
                                for i, s in enumerate(map(torch.Size, shapes))])
            self._anchor_cache = {key: torch.cat([anchors, levels[:, None]], 1)}
        return self._anchor_cache[key]

    def _flatten(self, maps: list[torch.Tensor], channels: int) -> torch.Tensor:
        out = []
        for m in maps:
            b, spatial = m.shape[0], m.shape[2:]
            m = m.view(b, self.num_anchors, channels, *spatial)
            m = m.permute(0, *range(3, 3 + self.spatial_dims), 1, 2)  # MONAI's order: location, then anchor
            out.append(m.reshape(b, -1, channels))
        return torch.cat(out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"the {self.spatial_dims}D detector expects (N, C, {'D, ' if self.spatial_dims == 3 else ''}"
                             f"H, W) input, got shape {tuple(x.shape)}")
        x = self._pad(x)
        feats = self.pyramid(x)
        feats = list(self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats))).values())
        cls = self._flatten(self.classification_head(feats), self.num_classes)
        box = self._flatten(self.regression_head(feats), 2 * self.spatial_dims)
        anchors = self._anchors(x, feats)
        b = x.shape[0]
        body = torch.cat([cls.float(), box.float(), anchors.expand(b, -1, -1)], 2)
        shape_row = torch.full((b, 1, body.shape[2]), -1.0, device=x.device)
        start = self.num_classes + 2 * self.spatial_dims  # the anchor columns
        shape_row[:, 0, start:start + self.spatial_dims] = torch.tensor(x.shape[2:], dtype=torch.float32,
                                                                        device=x.device)
        return torch.cat([body, shape_row], 1)


def unpack(out: torch.Tensor, num_classes: int, spatial_dims: int) -> dict[str, Any]:
    """Split the packed output: cls (B, A, C), box (B, A, 2d), anchors (A, 2d), per-level anchor-location counts,
    padded image size."""
    c, d2 = num_classes, 2 * spatial_dims
    body, shape_row = out[:, :-1], out[0, -1]
    level = body[0, :, c + 2 * d2].round().long()
    counts = torch.bincount(level).tolist()
    return {
        "cls": body[:, :, :c], "box": body[:, :, c:c + d2], "anchors": body[0, :, c + d2:c + 2 * d2].detach(),
        "counts": counts, "image_size": [int(v) for v in shape_row[c + d2:c + d2 + spatial_dims].tolist()],
    }


def targets_from_padded(target: torch.Tensor, spatial_dims: int) -> list[dict[str, torch.Tensor]]:
    """(B, Nmax, 2d + 1) padded rows -> MONAI's per-image {"boxes", "labels"} with 0-based labels."""
    d2 = 2 * spatial_dims
    if target.ndim != 3 or target.shape[2] != d2 + 1:
        raise ValueError(f"detection targets must be (B, Nmax, {d2 + 1}) (box + label, -1 rows padding), "
                         f"got shape {tuple(target.shape)}")
    out = []
    for t in target:
        rows = t[t[:, -1] >= 0]
        if bool((rows[:, spatial_dims:d2] <= rows[:, :spatial_dims]).any()):
            bad = rows[(rows[:, spatial_dims:d2] <= rows[:, :spatial_dims]).any(1)][0, :d2].tolist()
            raise MedTransferError(f"a target box has zero or negative size: {bad} (lo..., hi...); "
                                   "every box needs hi > lo on every axis")
        out.append({"boxes": rows[:, :d2].float(), "labels": rows[:, -1].long() - 1})
    return out


def pad_targets(boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], n_max: Optional[int] = None
                ) -> torch.Tensor:
    """Per-image boxes (N_i, 2d) and 1-based labels (N_i,) -> (B, Nmax, 2d + 1) with -1 rows padding."""
    n_max = max([len(b) for b in boxes] + [1]) if n_max is None else n_max
    d2 = boxes[0].shape[1] if len(boxes) and boxes[0].ndim == 2 else 6
    out = torch.full((len(boxes), n_max, d2 + 1), -1.0)
    for i, (b, l) in enumerate(zip(boxes, labels)):
        if len(b) > n_max:
            raise ValueError(f"image {i} has {len(b)} boxes, more than n_max={n_max}")
        out[i, :len(b), :d2] = torch.as_tensor(b, dtype=torch.float32).reshape(-1, d2)
        out[i, :len(b), d2] = torch.as_tensor(l, dtype=torch.float32)
    return out


class _StubNetwork(nn.Module):
    def __init__(self, spatial_dims: int, num_classes: int, num_anchors: int):
        super().__init__()
        self.spatial_dims, self.num_classes, self.num_anchors = spatial_dims, num_classes, num_anchors
        self.size_divisible = 1
        self.cls_key, self.box_reg_key = RetinaNetDetectionModel.cls_key, RetinaNetDetectionModel.box_reg_key


def make_engine(model: RetinaNetDetectionModel, *, cls_loss: str = "focal", atss_candidates: int = 4,
                hard_negative: Optional[dict] = None, score_thresh: float = 0.02, topk_per_level: int = 1000,
                nms_thresh: float = 0.22, detections_per_image: int = 100):
    """A MONAI ``RetinaNetDetector`` configured for ``model``'s anchors (its own network is a stub)."""
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector

    engine = RetinaNetDetector(_StubNetwork(model.spatial_dims, model.num_classes, model.num_anchors),
                               model.anchor_generator)
    if cls_loss == "focal":
        from monai.losses import FocalLoss

        engine.set_cls_loss(FocalLoss(reduction="mean", gamma=2.0))
    elif cls_loss != "bce":
        raise MedTransferError(f"detection cls_loss must be 'focal' or 'bce', got {cls_loss!r}")
    engine.set_atss_matcher(num_candidates=atss_candidates, center_in_gt=False)
    hn = {"batch_size_per_image": 64, "positive_fraction": 0.3, "pool_size": 20, "min_neg": 16, **(hard_negative or {})}
    engine.set_hard_negative_sampler(**hn)
    engine.set_box_selector_parameters(score_thresh=score_thresh, topk_candidates_per_level=topk_per_level,
                                       nms_thresh=nms_thresh, detections_per_img=detections_per_image)
    return engine


class DetectionLoss(nn.Module):
    """Classification + box-regression loss of the packed output against padded targets, as MONAI's
    ``RetinaNetDetector.compute_loss`` (ATSS matching, hard-negative sampling, then its ``compute_cls_loss`` and ``compute_box_loss``); returns
    their sum (``box_weight`` scales the box term; MONAI adds them with weight 1)."""

    def __init__(self, engine, *, num_classes: int, spatial_dims: int, box_weight: float = 1.0):
        super().__init__()
        self.engine, self.num_classes, self.spatial_dims, self.box_weight = engine, num_classes, spatial_dims, box_weight
        self.last: dict[str, float] = {}

    def _match(self, anchors: torch.Tensor, target: dict[str, torch.Tensor], locs: list[int]) -> torch.Tensor:
        # RetinaNetDetector.compute_anchor_matched_idxs with the ATSS branch only: its isinstance test against
        # torchvision's Matcher fails without torchvision
        if target["boxes"].numel() == 0:
            return torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
        _, idx = self.engine.proposal_matcher(target["boxes"], anchors, locs, self.engine.num_anchors_per_loc)
        return idx

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        u = unpack(out, self.num_classes, self.spatial_dims)
        targets = [{k: v.to(out.device) for k, v in t.items()} for t in targets_from_padded(target, self.spatial_dims)]
        anchors = [u["anchors"]] * out.shape[0]
        a = self.engine.num_anchors_per_loc
        locs = [n // a for n in u["counts"]]
        matched = [self._match(a_img, t, locs) for a_img, t in zip(anchors, targets)]
        cls = self.engine.compute_cls_loss(u["cls"], targets, matched)
        box = self.engine.compute_box_loss(u["box"], targets, anchors, matched).to(out.device)
        self.last = {"cls": float(cls.detach()), "box": float(box.detach())}
        return cls + self.box_weight * box


class Postprocess:
    """Packed output -> per image ``(boxes (P, 2d) voxel corners, scores (P,), labels (P,) 1-based)``: decode,
    sigmoid, score threshold, top-k per level, NMS, the best ``detections_per_image`` (MONAI's ``BoxSelector``);
    boxes are clipped to ``image_shape`` (default: the padded input size)."""

    def __init__(self, engine, *, num_classes: int, spatial_dims: int):
        self.engine, self.num_classes, self.spatial_dims = engine, num_classes, spatial_dims

    def __call__(self, out: torch.Tensor, image_shape: Optional[Sequence[int]] = None):
        u = unpack(out.detach(), self.num_classes, self.spatial_dims)
        size = list(image_shape)[-self.spatial_dims:] if image_shape is not None else u["image_size"]
        a = self.engine.num_anchors_per_loc
        locs = [n // a for n in u["counts"]]
        dets = self.engine.postprocess_detections(
            {self.engine.cls_key: u["cls"], self.engine.box_reg_key: u["box"]}, [u["anchors"]] * out.shape[0],
            [size] * out.shape[0], locs)
        return [(d["boxes"].float(), d["labels_scores"].float(), d["labels"].long() + 1) for d in dets]


def build_detector(
    backbone: str,
    *,
    spatial_dims: int,
    in_channels: int = 1,
    num_classes: int = 1,
    pretrained: Any = False,
    source: str = "auto",
    detector: Optional[dict] = None,
):
    """``(model, loss, postprocess)`` for a zoo ``backbone`` (weights through :func:`create_model`, with its load
    report on ``model.load_report``). ``detector`` holds the options of :class:`RetinaNetDetectionModel` and
    :func:`make_engine` (``fpn_channels``, ``num_levels``, ``min_stride``, ``anchor_shapes`` / ``anchor_scale`` +
    ``anchor_ratios``, ``cls_loss``, ``score_thresh``, ``nms_thresh``, ``detections_per_image``, ...)."""
    from medtransfer.zoo.builder import create_model

    opts = dict(detector or {})
    net_keys = ("fpn_channels", "min_stride", "num_levels", "anchor_shapes", "anchor_scale", "anchor_ratios",
                "probe_size")
    eng_keys = ("cls_loss", "atss_candidates", "hard_negative", "score_thresh", "topk_per_level", "nms_thresh",
                "detections_per_image")
    unknown = sorted(set(opts) - set(net_keys) - set(eng_keys) - {"box_weight"})
    if unknown:
        raise MedTransferError(f"unknown detector option(s) {', '.join(unknown)}; known: "
                               f"{', '.join(net_keys + eng_keys + ('box_weight',))}")
    from medtransfer.zoo.builder import split_name
    from medtransfer.zoo.registry import get_entry

    # a 3D encoder on a 2.5D stack (P3D-63) sees the K slices as depth with one channel
    stack = get_entry(split_name(backbone)[0]).spatial_dims == 3 and spatial_dims == 2
    encoder = create_model(backbone, task="features", in_channels=1 if stack else in_channels,
                           pretrained=pretrained, source=source)
    if spatial_dims == 3 and "anchor_shapes" not in opts and "anchor_scale" not in opts:
        opts["anchor_shapes"] = MONAI_LUNA_ANCHOR_SHAPES
    model = RetinaNetDetectionModel(encoder, spatial_dims=spatial_dims, in_channels=in_channels,
                                    num_classes=num_classes, **{k: opts[k] for k in net_keys if k in opts})
    model.model_name = f"retinanet:{backbone}"
    engine = make_engine(model, **{k: opts[k] for k in eng_keys if k in opts})
    loss = DetectionLoss(engine, num_classes=num_classes, spatial_dims=spatial_dims,
                         box_weight=float(opts.get("box_weight", 1.0)))
    log.info("%s", model.describe())
    return model, loss, Postprocess(engine, num_classes=num_classes, spatial_dims=spatial_dims)
