"""3D ResNets of MedicalNet (Med3D) and VDT, with the official state_dict names so published files load key for key.

- **MedicalNet**: S. Chen, K. Ma, Y. Zheng, "Med3D: Transfer Learning for 3D Medical Image Analysis",
  arXiv:1904.00625, 2019; official code ``Tencent/MedicalNet`` (``models/resnet.py``). ResNet-10..200 with an
  output stride of 8: ``layer3``/``layer4`` keep stride 1 and dilate by 2/4 instead, and the segmentation head
  ``conv_seg`` predicts at input/4.
- **VDT**: S. Zhang, Z. Li, H.-Y. Zhou, J. Ma, Y. Yu, "Advancing 3D Medical Image Analysis with Variable Dimension
  Transform based Supervised 3D Pre-training", Neurocomputing 2023, arXiv:2201.01426; official code
  ``urmagicsmine/CSPR`` (``mmcls/models/backbones/resnet3d.py``). A ResNet3D-18 pretrained on ImageNet, each RGB image
  seen as a 3-slice single-channel volume, so by default it never strides along depth.

Both families share the residual blocks and the two shortcut types; they differ in the stem, the stage strides and
dilations, and the rule that decides where a stage's first block gets a shortcut branch (see ``needs_shortcut`` in
:class:`ResNet3dTrunk`). Written from the spec (``spec/seed-systems.md`` sections 1a, 2a, 7), no code copied.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .heads import ClassificationHead, UNetDecoder, upsample_to
from .pretrained import PretrainedCfg
from .registry import TASKS, ZooModel, register_model

Triple = tuple[int, int, int]
SHORTCUTS = ("A", "B")


# -- building blocks shared by both families -------------------------------------------------------------------------
class ZeroPadShortcut(nn.Module):
    """Shortcut type A (He et al. 2016, option A): take every stride-th voxel, append zero channels after the input's.

    It has no parameters, so shortcut-A checkpoints hold no ``downsample`` keys. The official code rebuilds the
    tensor from ``.data`` and so also cuts the gradient through the subsampled identity; we let it flow (the
    forward values are identical), since a residual branch that blocks gradients is a bug, not a design choice.
    """

    def __init__(self, out_channels: int, stride: Triple):
        super().__init__()
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A kernel-1 average pool is exact subsampling (ceil(L / s) voxels per axis, like the official code).
        out = F.avg_pool3d(x, kernel_size=1, stride=self.stride) if self.stride != (1, 1, 1) else x
        missing = self.out_channels - out.shape[1]
        zeros = out.new_zeros((out.shape[0], missing, *out.shape[2:]))
        return torch.cat([out, zeros], dim=1)


def make_shortcut(kind: str, in_channels: int, out_channels: int, stride: Triple) -> nn.Module:
    """Type A: :class:`ZeroPadShortcut`; type B: 1x1x1 convolution (no bias) + BatchNorm (keys ``downsample.{0,1}``)."""
    if kind == "A":
        return ZeroPadShortcut(out_channels, stride)
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm3d(out_channels),
    )


class BasicBlock3d(nn.Module):
    """Two 3x3x3 Conv-BN with a residual; the stride sits on ``conv1`` and *both* convolutions are dilated.

    MedicalNet dilates both convolutions; VDT's ``conv2`` never is, which is the same network because VDT only
    builds dilation 1.
    """

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: Triple, dilation: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck3d(nn.Module):
    """1x1x1 reduce, 3x3x3 (carrying stride and dilation, "pytorch" style), 1x1x1 expand by 4, plus residual."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: Triple, dilation: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = type[BasicBlock3d] | type[Bottleneck3d]


def make_stage(
    block: Block,
    in_channels: int,
    planes: int,
    num_blocks: int,
    *,
    stride: Triple,
    dilation: int,
    shortcut: str,
    with_shortcut: bool,
) -> nn.Sequential:
    """One stage: the first block strides (and gets the shortcut branch if asked); every block uses ``dilation``."""
    out_channels = planes * block.expansion
    downsample = make_shortcut(shortcut, in_channels, out_channels, stride) if with_shortcut else None
    blocks = [block(in_channels, planes, stride, dilation, downsample)]
    blocks += [block(out_channels, planes, (1, 1, 1), dilation, None) for _ in range(1, num_blocks)]
    return nn.Sequential(*blocks)


def conv_seg_head(in_channels: int, num_classes: int, mid_channels: int = 32) -> nn.Sequential:
    """MedicalNet's light segmentation head (indices 0-6 as in the official ``conv_seg``): x2 up, so input/4 out.

    Public because MedicalNet pretraining co-trains one such head per dataset on a shared encoder
    (:class:`medtransfer.pretext.multi_dataset.ConvSegHead`). ``mid_channels=32`` is the official width.
    """
    return nn.Sequential(
        nn.ConvTranspose3d(in_channels, mid_channels, kernel_size=2, stride=2),
        nn.BatchNorm3d(mid_channels),
        nn.ReLU(inplace=True),
        nn.Conv3d(mid_channels, mid_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm3d(mid_channels),
        nn.ReLU(inplace=True),
        nn.Conv3d(mid_channels, num_classes, kernel_size=1, bias=False),
    )


# -- the trunk: stem + four stages -----------------------------------------------------------------------------------
class ResNet3dTrunk(ZooModel):
    """Stem (7^3 conv, BN, ReLU, optional 3^3 max-pool) and ``layer1..4``, named as both official codes name them.

    ``needs_shortcut(stride, in_channels, out_channels)`` is the family's rule for a stage's first block: MedicalNet
    adds one when any stride is not 1 or the width changes; VDT looks only at the *depth* stride and the width.
    """

    encoder_prefixes = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")
    first_conv_keys = ("conv1.weight",)
    spatial_dims = 3

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        *,
        in_channels: int,
        stem_stride: Triple,
        use_maxpool: bool,
        strides: Sequence[Triple],
        dilations: Sequence[int],
        shortcut: str,
        needs_shortcut: Callable[[Triple, int, int], bool],
        task: str,
    ):
        super().__init__()
        self.task = task
        self.in_channels = in_channels
        self.use_maxpool = use_maxpool
        self.conv1 = nn.Conv3d(in_channels, 64, kernel_size=7, stride=stem_stride, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        # The pool strides like the stem conv (VDT: in-plane only, yet its kernel still spans 3 slices).
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=stem_stride, padding=1)
        widths = (64, 128, 256, 512)
        channels = 64
        for i, (planes, n, stride, dilation) in enumerate(zip(widths, layers, strides, dilations), start=1):
            out = planes * block.expansion
            stage = make_stage(
                block,
                channels,
                planes,
                n,
                stride=stride,
                dilation=dilation,
                shortcut=shortcut,
                with_shortcut=needs_shortcut(stride, channels, out),
            )
            self.add_module(f"layer{i}", stage)
            channels = out
        self.out_channels = channels
        # Channels of forward_pyramid's maps: [stem, layer1, layer2, layer3, layer4].
        self.pyramid_channels = (64,) + tuple(w * block.expansion for w in widths)

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"{type(self).__name__} expects a 5-D input (N, C, D, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} was built for {self.in_channels} input channel(s), got {x.shape[1]} "
                f"(input shape {tuple(x.shape)})"
            )
        return x

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[stem ReLU output (before the max-pool), layer1, layer2, layer3, layer4]."""
        x = self._check_input(x)
        feats = [self._stem(x)]
        x = self.maxpool(feats[0]) if self.use_maxpool else feats[0]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem(self._check_input(x))
        if self.use_maxpool:
            x = self.maxpool(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _kaiming_init(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU gain) on Conv3d, BatchNorm weight 1 / bias 0; transposed convs keep defaults."""
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _make_unet(trunk: ResNet3dTrunk, num_classes: int, decoder_channels: Sequence[int] | None) -> UNetDecoder:
    *skips, deep = trunk.pyramid_channels
    return UNetDecoder(3, skips, deep, num_classes, decoder_channels)


# -- MedicalNet ------------------------------------------------------------------------------------------------------
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


# -- VDT -------------------------------------------------------------------------------------------------------------
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


# -- argument checks -------------------------------------------------------------------------------------------------
def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}")


def _check_common(task: str, num_classes: int | None, in_channels: int) -> None:
    _check_choice("task", task, TASKS)
    if task != "features" and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"task '{task}' needs num_classes >= 1, got {num_classes!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")


def _reject_unknown(model: str, kwargs: Mapping[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"{model} got unknown argument(s) {', '.join(unknown)}; it accepts {', '.join(allowed)}")
