"""Plain 3D ResNet-18..152 with strided stages, registered as ``resnet3d_{18,34,50,101,152}``.

The network most inflated and video-pretrained 3D files were trained in: the 2D torchvision ResNet (He et al.,
CVPR 2016) with every kernel made 3D, as in I3D (Carreira & Zisserman, CVPR 2017), the Kinetics 3D ResNets
(Hara et al., CVPR 2018) and torchvision's ``r3d_18`` (Tran et al., CVPR 2018). Stride 2 at the stem, the max-pool
and the first block of ``layer2..4`` (output stride 32), no dilation: unlike MedicalNet's ResNets
(:mod:`.medicalnet`), which keep ``layer3``/``layer4`` at stride 1 and dilate them, with the *same* key names.

Keys follow the inflated torchvision 2D layout: ``conv1`` (64, C, kd, 7, 7), ``bn1``, ``layer{1..4}.{j}.conv{1,2[,3]}``
/ ``bn{1,2[,3]}``, ``downsample.0/1`` and the classifier ``fc``. torchvision's own video layout (``stem.0``,
``layer1.0.conv1.0``, ...) is renamed to it on reading (source ``torchvision_video``, :mod:`..weights.sources3d`).
Written from the papers and the layer lists above, no code copied.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

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

RESNET3D_ARCHS: dict[int, tuple[Block, tuple[int, int, int, int]]] = {
    18: (BasicBlock3d, (2, 2, 2, 2)),
    34: (BasicBlock3d, (3, 4, 6, 3)),
    50: (Bottleneck3d, (3, 4, 6, 3)),
    101: (Bottleneck3d, (3, 4, 23, 3)),
    152: (Bottleneck3d, (3, 8, 36, 3)),
}


def _triple(value: Any, name: str) -> Triple:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * 3
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        raise ValueError(f"{name} must be a positive integer or 3 of them (D, H, W), got {value!r}")
    return tuple(value)  # type: ignore[return-value]


class ResNet3d(ResNet3dTrunk):
    """Strided 3D ResNet: stem ``stem_depth`` x 7 x 7, max-pool, stages strided 1/2/2/2, no dilation.

    ``stem_stride`` / ``pool_stride`` (``None``: no max-pool) and ``depth_stride`` (False: ``layer2..4`` stride
    in-plane only, ``(1, 2, 2)``) reproduce the common variants; torchvision's ``r3d_18`` is ``stem_depth=3,
    stem_stride=(1, 2, 2), pool_stride=None, in_channels=3``. Heads: ``fc`` (3D global average pooling + Linear,
    the torchvision/Kinetics classifier) and our U-Net ``decoder`` over the pyramid.
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        *,
        task: str,
        num_classes: int | None,
        in_channels: int = 1,
        stem_depth: int = 7,
        stem_stride: int | Sequence[int] = 2,
        pool_stride: int | Sequence[int] | None = 2,
        depth_stride: bool = True,
        shortcut: str = "B",
        decoder: str = "unet",
        decoder_channels: Sequence[int] | None = None,
    ):
        _check_common(task, num_classes, in_channels)
        _check_choice("shortcut", shortcut, SHORTCUTS)
        _check_choice("decoder", decoder, ("unet",))
        if not isinstance(stem_depth, int) or isinstance(stem_depth, bool) or stem_depth < 1 or stem_depth % 2 == 0:
            # an even kernel has no centre tap: its padding would shift the output by half a voxel
            raise ValueError(f"stem_depth must be an odd positive integer (1, 3, 5, 7), got {stem_depth!r}")
        if not isinstance(depth_stride, bool):
            raise ValueError(f"depth_stride must be True or False, got {depth_stride!r}")
        stem = _triple(stem_stride, "stem_stride")
        pool = None if pool_stride is None else _triple(pool_stride, "pool_stride")
        down: Triple = (2, 2, 2) if depth_stride else (1, 2, 2)
        super().__init__(
            block,
            layers,
            in_channels=in_channels,
            stem_stride=stem,
            use_maxpool=pool is not None,
            strides=((1, 1, 1), down, down, down),
            dilations=(1, 1, 1, 1),
            shortcut=shortcut,
            needs_shortcut=lambda stride, cin, cout: stride != (1, 1, 1) or cin != cout,
            task=task,
            stem_kernel=(stem_depth, 7, 7),
            pool_stride=pool,
        )
        self.stem_depth = stem_depth
        self.shortcut = shortcut
        if task == "classification":
            self.fc = nn.Linear(self.out_channels, num_classes)
        elif task == "segmentation":
            self.decoder = _make_unet(self, num_classes, decoder_channels)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task == "features":
            return self.forward_features(x)
        if self.task == "classification":
            return self.fc(torch.flatten(self.forward_features(x), start_dim=2).mean(dim=2))
        return self.decoder(self.forward_pyramid(x), x.shape[2:])


def infer_resnet3d_kwargs(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Stem depth from ``conv1.weight``, shortcut type from ``layer2.0.downsample`` (type A has no parameters),
    classifier classes from ``fc``. The strides leave no trace in a file, so they are never inferred."""
    out: dict[str, Any] = {}
    stem = sd.get("conv1.weight")
    if stem is not None and stem.ndim == 5 and stem.shape[2] % 2 == 1:
        out["stem_depth"] = int(stem.shape[2])
        out["notes"] = [
            f"the file's conv1.weight {list(stem.shape)} sets stem_depth={stem.shape[2]} unless you pass stem_depth "
            "(then adapt_stem='center_pad' or 'interpolate' fits the kernel)"
        ]
    if any(k.startswith("layer") for k in sd):
        out["shortcut"] = "B" if "layer2.0.downsample.0.weight" in sd else "A"
    fc = sd.get("fc.weight")
    if fc is not None and fc.ndim == 2:
        out["head_classes"] = {"classification": int(fc.shape[0])}
    return out


_RESNET3D_OPTIONS = ("stem_depth", "stem_stride", "pool_stride", "depth_stride", "shortcut", "decoder",
                     "decoder_channels")


def resnet3d(depth: int, *, task: str, num_classes: int | None, in_channels: int, **kwargs) -> ResNet3d:
    _reject_unknown(f"resnet3d_{depth}", kwargs, _RESNET3D_OPTIONS)
    block, layers = RESNET3D_ARCHS[depth]
    return ResNet3d(block, layers, task=task, num_classes=num_classes, in_channels=in_channels, **kwargs)


def _register_resnet3d(depth: int):
    block = "BasicBlock" if RESNET3D_ARCHS[depth][0] is BasicBlock3d else "Bottleneck"
    return register_model(
        f"resnet3d_{depth}",
        family="ResNet3D",
        description=(
            f"plain 3D ResNet-{depth} ({block}), inflated-torchvision keys: stride 2 at the stem, pool and "
            "layer2-4 (output stride 32), no dilation"
        ),
        infer_kwargs=infer_resnet3d_kwargs,
        example_size=(32, 64, 64),
        options=_RESNET3D_OPTIONS,
    )


@_register_resnet3d(18)
def resnet3d_18(*, task: str = "segmentation", num_classes: int | None = 2, in_channels: int = 1, **kwargs):
    return resnet3d(18, task=task, num_classes=num_classes, in_channels=in_channels, **kwargs)


@_register_resnet3d(34)
def resnet3d_34(*, task: str = "segmentation", num_classes: int | None = 2, in_channels: int = 1, **kwargs):
    return resnet3d(34, task=task, num_classes=num_classes, in_channels=in_channels, **kwargs)


@_register_resnet3d(50)
def resnet3d_50(*, task: str = "segmentation", num_classes: int | None = 2, in_channels: int = 1, **kwargs):
    return resnet3d(50, task=task, num_classes=num_classes, in_channels=in_channels, **kwargs)


@_register_resnet3d(101)
def resnet3d_101(*, task: str = "segmentation", num_classes: int | None = 2, in_channels: int = 1, **kwargs):
    return resnet3d(101, task=task, num_classes=num_classes, in_channels=in_channels, **kwargs)


@_register_resnet3d(152)
def resnet3d_152(*, task: str = "segmentation", num_classes: int | None = 2, in_channels: int = 1, **kwargs):
    return resnet3d(152, task=task, num_classes=num_classes, in_channels=in_channels, **kwargs)
