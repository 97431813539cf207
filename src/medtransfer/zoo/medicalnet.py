"""MedicalNet (Med3D) 3D ResNet-10..200 with the official state_dict names, registered as ``medicalnet_resnet*``.

S. Chen, K. Ma, Y. Zheng, "Med3D: Transfer Learning for 3D Medical Image Analysis", arXiv:1904.00625, 2019;
official code ``Tencent/MedicalNet`` (``models/resnet.py``). Output stride 8: ``layer3``/``layer4`` keep stride 1 and
dilate by 2/4 instead, and the segmentation head ``conv_seg`` predicts at input/4. Written from the spec
(``spec/seed-systems.md`` sections 1a, 7), no code copied.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from .heads import ClassificationHead, upsample_to
from .pretrained import PretrainedCfg
from .registry import ZooModel, register_model
from .resnet3d_trunk import (
    SHORTCUTS,
    BasicBlock3d,
    Block,
    Bottleneck3d,
    ResNet3dTrunk,
    _check_choice,
    _check_common,
    _kaiming_init,
    _make_unet,
    _reject_unknown,
    conv_seg_head,
)

class MedicalNetResNet(ResNet3dTrunk):
    """MedicalNet 3D ResNet: stride-2 stem and pool, stages strided 1/2/1/1 and dilated 1/1/2/4 (output stride 8).

    Heads: ``conv_seg`` (official; its input/4 logits are upsampled trilinearly to the input size), our ``decoder``
    (U-Net over the pyramid), or ``fc`` (global average pooling + Linear).
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        *,
        task: str,
        num_classes: int | None,
        in_channels: int = 1,
        shortcut: str = "B",
        decoder: str = "conv_seg",
        decoder_channels: Sequence[int] | None = None,
    ):
        _check_common(task, num_classes, in_channels)
        _check_choice("shortcut", shortcut, SHORTCUTS)
        _check_choice("decoder", decoder, ("conv_seg", "unet"))
        super().__init__(
            block,
            layers,
            in_channels=in_channels,
            stem_stride=(2, 2, 2),
            use_maxpool=True,
            strides=((1, 1, 1), (2, 2, 2), (1, 1, 1), (1, 1, 1)),
            dilations=(1, 1, 2, 4),
            shortcut=shortcut,
            needs_shortcut=lambda stride, cin, cout: stride != (1, 1, 1) or cin != cout,
            task=task,
        )
        self.shortcut = shortcut
        self.decoder_kind = decoder
        if task == "segmentation" and decoder == "conv_seg":
            self.conv_seg = conv_seg_head(self.out_channels, num_classes)
        elif task == "segmentation":
            self.decoder = _make_unet(self, num_classes, decoder_channels)
        elif task == "classification":
            self.fc = ClassificationHead(self.out_channels, num_classes)
        _kaiming_init(self)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        """The official network's output: ``conv_seg`` logits at input/4, for recipes that downsample the labels."""
        if not hasattr(self, "conv_seg"):
            raise ValueError("forward_native needs task='segmentation' with decoder='conv_seg'")
        return self.conv_seg(self.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task == "features":
            return self.forward_features(x)
        if self.task == "classification":
            return self.fc(self.forward_features(x))
        if self.decoder_kind == "conv_seg":
            return upsample_to(self.forward_native(x), x.shape[2:], mode="trilinear")
        return self.decoder(self.forward_pyramid(x), x.shape[2:])


MEDICALNET_ARCHS: dict[int, tuple[Block, tuple[int, int, int, int]]] = {
    10: (BasicBlock3d, (1, 1, 1, 1)),
    18: (BasicBlock3d, (2, 2, 2, 2)),
    34: (BasicBlock3d, (3, 4, 6, 3)),
    50: (Bottleneck3d, (3, 4, 6, 3)),
    101: (Bottleneck3d, (3, 4, 23, 3)),
    152: (Bottleneck3d, (3, 8, 36, 3)),
    200: (Bottleneck3d, (3, 24, 36, 3)),
}
# The shortcut each published file was trained with (README "parameters settings"); also our default per depth.
MEDICALNET_SHORTCUT = {10: "B", 18: "A", 34: "A", 50: "B", 101: "B", 152: "B", 200: "B"}


_MEDICALNET_OPTIONS = ("shortcut", "decoder", "decoder_channels")


def medicalnet_resnet(depth: int, *, task: str, num_classes: int | None, in_channels: int, **kwargs) -> ZooModel:
    _reject_unknown(f"medicalnet_resnet{depth}", kwargs, _MEDICALNET_OPTIONS)
    block, layers = MEDICALNET_ARCHS[depth]
    if kwargs.get("shortcut") is None:
        kwargs["shortcut"] = MEDICALNET_SHORTCUT[depth]
    return MedicalNetResNet(block, layers, task=task, num_classes=num_classes, in_channels=in_channels, **kwargs)


def infer_medicalnet_kwargs(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Shortcut type from the presence of ``layer2.0.downsample`` (type A has no parameters), class count from
    ``conv_seg.6`` (a fine-tuned whole network)."""
    out: dict[str, Any] = {}
    if any(k.startswith("layer") for k in sd):
        out["shortcut"] = "B" if "layer2.0.downsample.0.weight" in sd else "A"
    head = sd.get("conv_seg.6.weight")
    if head is not None:
        out["head_classes"] = {"segmentation": int(head.shape[0])}
    return out


_MEDICALNET_URL = "https://drive.google.com/file/d/13tnSvXY7oDIEloNFiGTsjUIYfS3g3BfG/view?usp=sharing"
_MEDICALNET_COMMON = dict(
    url=_MEDICALNET_URL,
    source="medicalnet",
    num_classes=None,
    modality="CT and MRI",
    in_channels=1,
    intensity="z-score over voxels > 0 (MRBrainS18 demo recipe)",
    license="MIT (Tencent/MedicalNet README)",
    citation=(
        "S. Chen, K. Ma, Y. Zheng, 'Med3D: Transfer Learning for 3D Medical Image Analysis', "
        "arXiv:1904.00625, 2019"
    ),
)
_MEDICALNET_NOTES = (
    "Inside MedicalNet_pytorch_files.zip (folder pretrain/); mirror: Tencent Weiyun https://share.weiyun.com/55sZyIx. "
    "Encoder only (no conv_seg), keys prefixed 'module.'. The MRBrainS18 demo fine-tunes at 56x448x448 (D, H, W)."
)


def _medicalnet_cfgs(depth: int) -> tuple[PretrainedCfg, ...]:
    name = f"medicalnet_resnet{depth}"
    kwargs = {"shortcut": MEDICALNET_SHORTCUT[depth]}
    cfgs = [
        PretrainedCfg(
            model=name,
            tag="3dseg8",
            file_name=f"resnet_{depth}.pth",
            arch_kwargs=kwargs,
            pretraining=(
                "supervised segmentation on 3DSeg-8 (8 public CT/MRI datasets), one shared encoder co-trained with "
                "8 dataset-specific conv_seg decoders"
            ),
            notes=_MEDICALNET_NOTES,
            **_MEDICALNET_COMMON,
        )
    ]
    if depth in (10, 18, 34, 50):
        cfgs.append(
            PretrainedCfg(
                model=name,
                tag="23dataset",
                file_name=f"resnet_{depth}_23dataset.pth",
                arch_kwargs=kwargs,
                pretraining="supervised segmentation on 23 public 3D datasets (list not published; README 2019/07/30)",
                notes=_MEDICALNET_NOTES,
                **_MEDICALNET_COMMON,
            )
        )
    return tuple(cfgs)


def _register_medicalnet(depth: int):
    block = "BasicBlock" if MEDICALNET_ARCHS[depth][0] is BasicBlock3d else "Bottleneck"
    return register_model(
        f"medicalnet_resnet{depth}",
        family="MedicalNet",
        description=(
            f"MedicalNet 3D ResNet-{depth} ({block}, shortcut {MEDICALNET_SHORTCUT[depth]}), output stride 8 with "
            "dilated layer3/4; conv_seg head at input/4"
        ),
        pretrained=_medicalnet_cfgs(depth),
        infer_kwargs=infer_medicalnet_kwargs,
        options=_MEDICALNET_OPTIONS,
    )


@_register_medicalnet(10)
def medicalnet_resnet10(*, task: str = "segmentation", num_classes: int | None = 2, in_channels: int = 1, **kwargs):
    return medicalnet_resnet(10, task=task, num_classes=num_classes, in_channels=in_channels, **kwargs)


@_register_medicalnet(18)
def medicalnet_resnet18(*, task: str = "segmentation", num_classes: int | None = 2, in_channels: int = 1, **kwargs):
    return medicalnet_resnet(18, task=task, num_classes=num_classes, in_channels=in_channels, **kwargs)


@_register_medicalnet(34)
def medicalnet_resnet34(*, task: str = "segmentation", num_classes: int | None = 2, in_channels: int = 1, **kwargs):
    return medicalnet_resnet(34, task=task, num_classes=num_classes, in_channels=in_channels, **kwargs)


@_register_medicalnet(50)
def medicalnet_resnet50(*, task: str = "segmentation", num_classes: int | None = 2, in_channels: int = 1, **kwargs):
    return medicalnet_resnet(50, task=task, num_classes=num_classes, in_channels=in_channels, **kwargs)


@_register_medicalnet(101)
def medicalnet_resnet101(*, task: str = "segmentation", num_classes: int | None = 2, in_channels: int = 1, **kwargs):
    return medicalnet_resnet(101, task=task, num_classes=num_classes, in_channels=in_channels, **kwargs)


@_register_medicalnet(152)
def medicalnet_resnet152(*, task: str = "segmentation", num_classes: int | None = 2, in_channels: int = 1, **kwargs):
    return medicalnet_resnet(152, task=task, num_classes=num_classes, in_channels=in_channels, **kwargs)


@_register_medicalnet(200)
def medicalnet_resnet200(*, task: str = "segmentation", num_classes: int | None = 2, in_channels: int = 1, **kwargs):
    return medicalnet_resnet(200, task=task, num_classes=num_classes, in_channels=in_channels, **kwargs)
