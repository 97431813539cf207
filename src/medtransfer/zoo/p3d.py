"""MP3D's P3D-63 backbone (mmdet ``P3D``, depth 63) with the official state_dict names, registered as ``p3d63``.

S. Zhang et al., "Revisiting 3D Context Modeling with Supervised Pre-training for Universal Lesion Detection in CT
Slices", MICCAI 2020, arXiv:2012.08770; official code ``urmagicsmine/MP3D``. A 2.5D network: a stack of 9 CT slices
goes in as a one-channel volume, the depth is pooled away stage by stage, and each stage hands the *centre* depth
slice to a 2D detector (Faster R-CNN + FPN on DeepLesion). Written by us from a reading of the official code; none
of it is copied.

Read from ``mmdet/models/backbones/p3d.py`` and ``configs/deeplesion/p3d.py`` (commit 08e5ace5) and reproduced:

- stem ``conv1_custom``: Conv3d 1 -> 64, kernel (1, 7, 7), stride (1, 2, 2), padding (0, 3, 3), no bias; ``norm1``;
  ReLU; ``maxpool`` (1, 3, 3), stride (1, 2, 2), padding (0, 1, 1). Depth is untouched by the stem.
- ``layer1..4``: 3/4/6/3 bottlenecks (widths 64/128/256/512, expansion 4). All 16 are 3D: the 2D "res5" branch of
  the official class is only built for blocks numbered >= the total block count, which four stages never reach.
- A block is 1x1x1 ``conv1`` -> ``norm_1`` -> ReLU, then the factorised 3x3x3: ``conv2`` (1, 3, 3) spatial and
  ``conv3`` (3, 1, 1) temporal, each followed by its norm and ReLU, combined in style A (serial S then T),
  B (parallel S + T on the same input) or C (S, then S + T(S)); then 1x1x1 ``conv4`` -> ``norm_4``, plus the
  shortcut, ReLU. The style cycles A, B, C over the blocks counted across the whole network (block 0 of layer2 is
  block 3: style A).
- The first block of layer2-4 strides (1, 2, 2) in its ``conv1`` and in its shortcut (``downsample.0`` 1x1x1 conv +
  ``downsample.1`` norm); layer1's first block does not stride, its shortcut only widens 64 -> 256.
- Depth pooling between stages, *after* each stage's output is taken: MaxPool3d (3, 1, 1) stride (2, 1, 1) padding
  (1, 0, 0) after layer1 and layer2, MaxPool3d (3, 1, 1) without padding after layer3, none after layer4: 9 slices
  give depths 5, 3, 1, 1 at the four outputs. Fewer than 9 slices fail in the official forward (the pool after
  layer3 needs 3); here they are refused up front.
- Outputs: the centre depth slice ``d // 2`` of each pooled stage output, ``(N, C, H, W)`` with C 256/512/1024/2048
  at strides 4/8/16/32 in-plane.
- Norm: GroupNorm with 32 groups in the DeepLesion config. The constructor's default ``norm_cfg=dict(type='BN')`` is
  mmcv's BatchNorm2d, which refuses these 5-D tensors, so BN works there only as ``BN3d``/``SyncBN``; ``norm='bn'``
  here is BatchNorm3d (same key names plus running statistics). The official ``norm_eval`` (BN frozen in train mode)
  is not reproduced.
- Scratch init as ``init_weights`` without a checkpoint: Xavier-uniform on Conv3d, norm weight 1 and bias 0.
- Unused by the official forward and therefore absent here: ``avgpool``, ``dropout``, the ``num_classes`` argument.

Classification (ours, the official backbone has no head): global average pooling of the last output and ``fc``.
Segmentation is not offered: the network keeps no depth, so it cannot predict a volume.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .pretrained import PretrainedCfg
from .registry import ZooModel, register_model
from .resnet3d_trunk import _check_choice, _check_common

NORMS = ("gn", "bn")
STYLES = ("A", "B", "C")
P3D63_LAYERS = (3, 4, 6, 3)
MIN_SLICES = 9


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.GroupNorm(32, channels) if kind == "gn" else nn.BatchNorm3d(channels)


class P3DBottleneck(nn.Module):
    """One P3D bottleneck; ``style`` says how the spatial (``conv2``) and temporal (``conv3``) convolutions combine."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, *, style: str, stride: tuple[int, int, int], norm: str,
                 downsample: nn.Module | None):
        super().__init__()
        self.downsample = downsample  # registered first, as officially: its keys lead the block's state_dict
        self.style = style
        self.conv1 = nn.Conv3d(in_channels, planes, kernel_size=1, stride=stride, bias=False)
        self.norm_1 = _norm(norm, planes)
        self.conv2 = nn.Conv3d(planes, planes, kernel_size=(1, 3, 3), padding=(0, 1, 1), bias=False)
        self.norm_2 = _norm(norm, planes)
        self.conv3 = nn.Conv3d(planes, planes, kernel_size=(3, 1, 1), padding=(1, 0, 0), bias=False)
        self.norm_3 = _norm(norm, planes)
        self.conv4 = nn.Conv3d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.norm_4 = _norm(norm, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)

    def _spatial(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.norm_2(self.conv2(x)))

    def _temporal(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.norm_3(self.conv3(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.norm_1(self.conv1(x)))
        if self.style == "A":
            out = self._temporal(self._spatial(out))
        elif self.style == "B":
            out = self._spatial(out) + self._temporal(out)
        else:
            out = self._spatial(out)
            out = out + self._temporal(out)
        out = self.norm_4(self.conv4(out))
        return self.relu(out + identity)


class P3D63(ZooModel):
    """P3D-63 as MP3D builds it for DeepLesion; :meth:`forward_features` returns the official backbone's 4 outputs.

    Input ``(N, C, D, H, W)`` with ``D >= 9`` slices (9 in MP3D), or ``(N, D, H, W)``: slices as channels become a
    one-channel volume, as for VDT.
    """

    encoder_prefixes = ("conv1_custom.", "norm1.", "layer1.", "layer2.", "layer3.", "layer4.")
    first_conv_keys = ("conv1_custom.weight",)
    spatial_dims = 3  # of the input; every output is 2D
    stage_channels = (256, 512, 1024, 2048)
    stage_strides = (4, 8, 16, 32)  # in-plane, relative to the input
    size_divisor = (1, 32, 32)  # any depth >= 9 and any H, W run; MP3D pads H and W to multiples of 32 for its FPN

    def __init__(self, *, task: str, num_classes: int | None, in_channels: int = 1, norm: str = "gn"):
        super().__init__()
        _check_common(task, num_classes, in_channels)
        _check_choice("norm", norm, NORMS)
        if task == "segmentation":
            raise ValueError("p3d63 pools the depth away (9 slices -> 1), so it cannot segment a volume; use task "
                             "'classification' or 'features' (2D maps of the centre slice for a 2D head)")
        self.task = task
        self.in_channels = in_channels
        self.norm = norm
        self.conv1_custom = nn.Conv3d(in_channels, 64, kernel_size=(1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3),
                                      bias=False)
        self.norm1 = _norm(norm, 64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        # Depth pooling after layer1/layer2 (9 -> 5 -> 3) and after layer3 (3 -> 1); official names.
        self.maxpool_2 = nn.MaxPool3d(kernel_size=(3, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0))
        self.maxpool_3 = nn.MaxPool3d(kernel_size=(3, 1, 1), stride=1)
        channels, index = 64, 0
        for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), P3D63_LAYERS), start=1):
            stride = (1, 1, 1) if stage == 1 else (1, 2, 2)
            out = planes * P3DBottleneck.expansion
            downsample = nn.Sequential(nn.Conv3d(channels, out, kernel_size=1, stride=stride, bias=False),
                                       _norm(norm, out))
            layer = []
            for i in range(blocks):
                layer.append(P3DBottleneck(channels, planes, style=STYLES[index % 3], norm=norm,
                                           stride=stride if i == 0 else (1, 1, 1),
                                           downsample=downsample if i == 0 else None))
                channels, index = out, index + 1
            self.add_module(f"layer{stage}", nn.Sequential(*layer))
        self.out_channels = channels
        if task == "classification":
            self.fc = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.xavier_uniform_(m.weight)
            elif isinstance(m, (nn.GroupNorm, nn.BatchNorm3d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(getattr(self, "fc", None), nn.Linear):
            nn.init.normal_(self.fc.weight, std=0.01)
            nn.init.zeros_(self.fc.bias)

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            if self.in_channels != 1:
                raise ValueError(f"a 4-D input {tuple(x.shape)} is read as slices-as-channels (N, D, H, W) and becomes "
                                 f"(N, 1, D, H, W), but this model was built with in_channels={self.in_channels}")
            x = x.unsqueeze(1)
        if x.ndim != 5:
            raise ValueError(f"p3d63 expects (N, C, D, H, W) or (N, D, H, W) slices, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"p3d63 was built for {self.in_channels} input channel(s), got {x.shape[1]} "
                             f"(input shape {tuple(x.shape)})")
        if x.shape[2] < MIN_SLICES:
            raise ValueError(f"p3d63 needs at least {MIN_SLICES} slices (its depth pooling takes 9 -> 5 -> 3 -> 1; "
                             f"MP3D feeds 9), got {x.shape[2]} in input shape {tuple(x.shape)}")
        return x

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four official outputs: the centre depth slice of each pooled stage, ``(N, C, H, W)``, C 256-2048."""
        x = self.maxpool(self.relu(self.norm1(self.conv1_custom(self._check_input(x)))))
        outs = []
        for layer, pool in ((self.layer1, self.maxpool_2), (self.layer2, self.maxpool_2),
                            (self.layer3, self.maxpool_3), (self.layer4, None)):
            x = layer(x)
            if pool is not None:
                x = pool(x)
            outs.append(x[:, :, x.shape[2] // 2])
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        feats = self.forward_features(x)
        if self.task == "features":
            return feats
        return self.fc(feats[-1].mean(dim=(2, 3)))


# Top-level modules of an mmdet detector besides its backbone.
DETECTOR_PARTS = ("neck.", "rpn_head.", "roi_head.", "bbox_head.")


def infer_p3d_kwargs(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The norm a checkpoint was trained with (BatchNorm keeps running statistics), the classes of an ``fc`` head,
    and a note on the detector parts of a full MP3D file that no zoo model uses."""
    out: dict[str, Any] = {}
    if "norm1.running_mean" in sd:
        out["norm"] = "bn"
    elif "norm1.weight" in sd:
        out["norm"] = "gn"
    fc = sd.get("fc.weight")
    if fc is not None and fc.ndim == 2:
        out["head_classes"] = {"classification": int(fc.shape[0])}
    parts = sorted({k.split(".", 1)[0] for k in sd if k.startswith(DETECTOR_PARTS)})
    if parts:
        count = sum(k.startswith(DETECTOR_PARTS) for k in sd)
        out["notes"] = [f"the file is a full MP3D detector: its {count} tensors of {', '.join(parts)} are not used "
                        "(the zoo model is the backbone; detection heads are built separately)"]
    return out


_P3D_OPTIONS = ("norm",)


@register_model(
    "p3d63",
    family="MP3D",
    description=(
        "MP3D P3D-63 (mmdet, DeepLesion): 2.5D pseudo-3D ResNet on 9 CT slices, depth pooled 9->5->3->1; "
        "features are 4 2D maps of the centre slice (strides 4-32)"
    ),
    tasks=("classification", "features"),
    default_num_classes=2,
    example_size=(9, 64, 64),
    options=_P3D_OPTIONS,
    infer_kwargs=infer_p3d_kwargs,
    pretrained=(
        PretrainedCfg(
            model="p3d63",
            tag="coco",
            file_name="mp3d63-d720bda1.pth",
            url="https://drive.google.com/file/d/1jKdJQ83vZrvOT4N_iZeRvhDuyKWiboqi/view?usp=sharing",
            source="mmdet",
            arch_kwargs={"norm": "gn"},
            num_classes=None,
            modality="CT (DeepLesion key slice with 8 neighbours)",
            in_channels=1,
            intensity=(
                "PNG value - 32768 = HU, clipped to [-1024, 1050], scaled to [0, 255], then (x - 123.675) / 58.395 "
                "on every slice (MP3D's Normalize with is_3d_input: the first ImageNet mean/std for all 9 slices), "
                "i.e. [-1024, 1050] HU -> [-2.1179, 2.2489]"
            ),
            preset=None,
            spacing=None,
            patch_size=(9, 512, 512),
            pretraining=(
                "per the MP3D README 'pre-trained on COCO'; both DeepLesion configs load it into the GN(32) backbone "
                "through init_cfg (load_checkpoint with rm_backbone=True: each key's first component dropped, "
                "loaded non-strictly)"
            ),
            license="no licence stated for the weights; urmagicsmine/MP3D carries mmdetection's Apache-2.0 LICENSE",
            citation=(
                "S. Zhang et al., 'Revisiting 3D Context Modeling with Supervised Pre-training for Universal Lesion "
                "Detection in CT Slices', MICCAI 2020, arXiv:2012.08770"
            ),
            notes=(
                "Mirror: BaiduYun https://pan.baidu.com/s/1zMyw2tcPY1q0SPRpZKSKbQ (code bbrc). Input as MP3D feeds "
                "DeepLesion: the key slice and 8 neighbours 2.5 mm apart (interpolated linearly when the slice interval "
                "does not divide 2.5 mm; past the series end the last slice repeats), in-plane resized to 512 "
                "(training 448/512/576 in configs/deeplesion/p3d.py), padded to a multiple of 32. The file's contents were not inspected here (not downloadable from this machine)."
            ),
        ),
    ),
)
def p3d63(*, task: str = "features", num_classes: int | None = 2, in_channels: int = 1, norm: str = "gn") -> P3D63:
    return P3D63(task=task, num_classes=num_classes, in_channels=in_channels, norm=norm)
