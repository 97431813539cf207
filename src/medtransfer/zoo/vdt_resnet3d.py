"""VDT's ResNet3D-18 (mmcls ``ResNet3D``) with the official state_dict names, registered as ``vdt_resnet18_3d``.

S. Zhang, Z. Li, H.-Y. Zhou, J. Ma, Y. Yu, "Advancing 3D Medical Image Analysis with Variable Dimension Transform
based Supervised 3D Pre-training", Neurocomputing 2023, arXiv:2201.01426; official code ``urmagicsmine/CSPR``
(``mmcls/models/backbones/resnet3d.py``). Pretrained on ImageNet, each RGB image seen as a 3-slice single-channel
volume, so by default it never strides along depth. Written from the spec (``spec/seed-systems.md`` sections 2a,
7), no code copied.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .pretrained import PretrainedCfg
from .registry import register_model
from .resnet3d_trunk import (
    SHORTCUTS,
    BasicBlock3d,
    Block,
    Bottleneck3d,
    ResNet3dTrunk,
    Triple,
    _check_choice,
    _check_common,
    _kaiming_init,
    _make_unet,
    _reject_unknown,
)

class VDTResNet3d(ResNet3dTrunk):
    """mmcls ``ResNet3D`` as used by VDT, plus its classifier (3D GAP + ``fc`` Linear) or our U-Net ``decoder``.

    ``depth_stride=False`` (pretraining default) strides the stem conv, the max-pool and the stages in-plane only,
    ``(1, s, s)``; ``True`` makes them isotropic. ``stem_stride=False`` gives the stem stride 1 and skips the pool.
    A 4-D input ``(N, C, H, W)`` becomes ``(N, 1, C, H, W)``: the variable dimension transform, under which the
    colour channels of an image are the depth slices of a one-channel volume.
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        *,
        task: str,
        num_classes: int | None,
        in_channels: int = 1,
        depth_stride: bool = False,
        stem_stride: bool = True,
        strides: Sequence[int] = (1, 2, 2, 2),
        shortcut: str = "B",
        decoder: str = "unet",
        decoder_channels: Sequence[int] | None = None,
        zero_init_residual: bool = True,
    ):
        _check_common(task, num_classes, in_channels)
        _check_choice("shortcut", shortcut, SHORTCUTS)
        _check_choice("decoder", decoder, ("unet",))
        if len(strides) != 4 or not all(isinstance(s, int) and s >= 1 for s in strides):
            raise ValueError(f"strides must be 4 positive integers (one per stage), got {strides!r}")
        if not depth_stride and strides[0] != 1:
            # layer1 keeps the width, and mmcls's rule adds no shortcut for an in-plane-only stride: the identity
            # would not match the strided branch (the official network fails in forward).
            raise ValueError(f"strides[0] must be 1 when depth_stride=False (no shortcut matches it), got {strides!r}")

        def stride3(s: int) -> Triple:
            return (s, s, s) if depth_stride else (1, s, s)

        super().__init__(
            block,
            layers,
            in_channels=in_channels,
            stem_stride=stride3(2 if stem_stride else 1),
            use_maxpool=stem_stride,
            strides=[stride3(s) for s in strides],
            dilations=(1, 1, 1, 1),
            shortcut=shortcut,
            # mmcls tests only the depth stride, so an in-plane-only stride alone adds no shortcut branch.
            needs_shortcut=lambda stride, cin, cout: stride[0] != 1 or cin != cout,
            task=task,
        )
        self.depth_stride = depth_stride
        self.stem_stride = stem_stride
        if task == "classification":
            self.fc = nn.Linear(self.out_channels, num_classes)
        elif task == "segmentation":
            self.decoder = _make_unet(self, num_classes, decoder_channels)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # mmcls meant mmcv's kaiming_init (fan_out, normal) for convolutions but matched only nn.Conv2d, leaving
        # Conv3d at PyTorch's default; we apply it to Conv3d. Zeroing each block's last BN is the official default.
        _kaiming_init(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock3d):
                    nn.init.zeros_(m.bn2.weight)
                elif isinstance(m, Bottleneck3d):
                    nn.init.zeros_(m.bn3.weight)
        if isinstance(getattr(self, "fc", None), nn.Linear):
            nn.init.normal_(self.fc.weight, std=0.01)  # mmcls LinearClsHead
            nn.init.zeros_(self.fc.bias)

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            if self.in_channels != 1:
                raise ValueError(
                    f"a 4-D input {tuple(x.shape)} becomes a one-channel volume (N, 1, C, H, W), but this model was "
                    f"built with in_channels={self.in_channels}"
                )
            x = x.unsqueeze(1)
        return super()._check_input(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task == "features":
            return self.forward_features(x)
        if self.task == "classification":
            return self.fc(torch.flatten(self.forward_features(x), start_dim=2).mean(dim=2))
        size = x.shape[2:] if x.ndim == 5 else x.shape[1:]
        return self.decoder(self.forward_pyramid(x), size)


def infer_vdt_kwargs(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Class count of a full mmcls classifier (``head.fc`` becomes ``fc`` on conversion)."""
    fc = sd.get("fc.weight")
    return {"head_classes": {"classification": int(fc.shape[0])}} if fc is not None else {}


_VDT_ALLOWED = (
    "depth_stride", "stem_stride", "strides", "shortcut", "decoder", "decoder_channels", "zero_init_residual"
)


@register_model(
    "vdt_resnet18_3d",
    family="VDT",
    description=(
        "VDT ResNet3D-18 (mmcls, CSPR): 3D ResNet pretrained on ImageNet through the variable dimension transform; "
        "in-plane strides only by default"
    ),
    default_num_classes=2,
    pretrained=(
        PretrainedCfg(
            model="vdt_resnet18_3d",
            tag="imagenet",
            file_name="res3d18_imagenet_BN_73.07-5ff2ecb7.pth",
            url="https://drive.google.com/file/d/1vyyQvGxlffvOxZ8HpGcwJgrMeS00RWxW/view?usp=sharing",
            source="mmcv",
            arch_kwargs={},
            num_classes=None,
            modality="natural images (ImageNet-1k via the variable dimension transform)",
            in_channels=1,
            intensity="(x - 114.495) / 57.63, one mean/std shared by all channels (RGB order)",
            patch_size=(3, 224, 224),
            pretraining=(
                "supervised ImageNet-1k classification, each 224x224 RGB crop seen as a 3-slice one-channel volume, "
                "colour channels shuffled (p=1), label smoothing 0.1, 100 epochs (73.07% top-1 per the file name)"
            ),
            license="no license file in urmagicsmine/CSPR (built on mmclassification, Apache-2.0)",
            citation=(
                "S. Zhang, Z. Li, H.-Y. Zhou, J. Ma, Y. Yu, 'Advancing 3D Medical Image Analysis with Variable "
                "Dimension Transform based Supervised 3D Pre-training', Neurocomputing, 2023, arXiv:2201.01426"
            ),
            notes=(
                "Mirror: BaiduYun https://pan.baidu.com/s/1Qk86bVLKLISUZ1L4FmqK6A (code 9hgg). Backbone weights of an "
                "mmcv checkpoint; built with depth_stride=False as in pretraining."
            ),
        ),
    ),
    infer_kwargs=infer_vdt_kwargs,
    options=_VDT_ALLOWED,
)
def vdt_resnet18_3d(*, task: str = "segmentation", num_classes: int | None = 2, in_channels: int = 1, **kwargs):
    _reject_unknown("vdt_resnet18_3d", kwargs, _VDT_ALLOWED)
    return VDTResNet3d(
        BasicBlock3d, (2, 2, 2, 2), task=task, num_classes=num_classes, in_channels=in_channels, **kwargs
    )

