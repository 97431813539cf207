"""The 3D ResNet trunk shared by the MedicalNet and VDT families (:mod:`.medicalnet`, :mod:`.vdt_resnet3d`):
residual blocks, the two shortcut types, the stem/stage trunk with its per-family shortcut rule, MedicalNet's
``conv_seg`` head (also used by multi-dataset pretraining), weight init and argument checks. Sources and the
differences between the families: :mod:`medtransfer.zoo.resnet3d`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .heads import UNetDecoder
from .registry import TASKS, ZooModel


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
    """Stem (7^3 conv unless ``stem_kernel`` says otherwise, BN, ReLU, optional 3^3 max-pool) and ``layer1..4``, named as both official codes name them.

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
        stem_kernel: Triple = (7, 7, 7),
        pool_stride: Triple | None = None,
    ):
        super().__init__()
        self.task = task
        self.in_channels = in_channels
        self.use_maxpool = use_maxpool
        padding = tuple(k // 2 for k in stem_kernel)
        self.conv1 = nn.Conv3d(in_channels, 64, kernel_size=stem_kernel, stride=stem_stride, padding=padding, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        # The pool strides like the stem conv unless told otherwise (VDT: in-plane only, yet its kernel still spans
        # 3 slices).
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=pool_stride or stem_stride, padding=1)
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
