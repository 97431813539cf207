"""The MONAI networks of the zoo (``swin_unetr``, ``segresnet``), subclassed to add the zoo interface.

Kept apart from their registration (:mod:`.swin_unetr`, :mod:`.segresnet`), so that importing MONAI (about two
seconds) happens only when one of these models is built, not for every ``zoo list`` or ``create_model``.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Sequence

import monai.networks.nets.swin_unetr as _monai_swin
import torch
from monai.networks.nets import SegResNet, SwinUNETR
from torch.overrides import TorchFunctionMode

from .heads import ClassificationHead
from .registry import ZooModel
from .resnet3d_trunk import _check_common
from .segresnet import _DECODER_PARTS
from .swin_unetr import _CNN_PARTS, permute_like_einops

if importlib.util.find_spec("einops") is None:
    _monai_swin.rearrange = permute_like_einops


class _HostLinspace(TorchFunctionMode):
    """MONAI's SwinTransformer reads its drop-path rates with ``linspace(...).item()``, which a meta tensor cannot
    do; under ``torch.device("meta")`` (zoo list, zoo inspect) that one linspace is made on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.linspace:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


class SwinUNETRModel(SwinUNETR, ZooModel):
    """MONAI ``SwinUNETR`` with ``forward_features``, ``encoder_prefixes`` and ``first_conv_keys``."""

    encoder_prefixes = ("swinViT.",)

    def __init__(
        self,
        *,
        task: str,
        num_classes: int | None,
        in_channels: int = 1,
        spatial_dims: int = 3,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        norm_name: str = "instance",
        use_v2: bool = False,
        dropout_path_rate: float = 0.0,
        use_checkpoint: bool = False,
    ):
        _check_common(task, num_classes, in_channels)
        on_meta = torch.empty(()).device.type == "meta"
        with _HostLinspace() if on_meta else contextlib.nullcontext():
            super().__init__(
                in_channels=in_channels,
                out_channels=num_classes if task == "segmentation" else 1,
                feature_size=feature_size,
                depths=tuple(depths),
                num_heads=tuple(num_heads),
                norm_name=norm_name,
                use_v2=use_v2,
                dropout_path_rate=dropout_path_rate,
                use_checkpoint=use_checkpoint,
                spatial_dims=spatial_dims,
            )
        self.task = task
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = 16 * feature_size
        if task == "segmentation":
            # the residual UNETR block on the raw image sees the input too: conv1 and its 1x1 shortcut conv3
            self.first_conv_keys = ("swinViT.patch_embed.proj.weight", "encoder1.layer.conv1.conv.weight",
                                    "encoder1.layer.conv3.conv.weight")
        else:
            for name in _CNN_PARTS:
                delattr(self, name)
            self.first_conv_keys = ("swinViT.patch_embed.proj.weight",)
            if task == "classification":
                self.classifier = ClassificationHead(self.out_channels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The swinViT's last stage, ``(N, 16 * feature_size, *size / 32)``, as MONAI's forward uses it."""
        self._check_input_size(x.shape[2:])
        return self.swinViT(x, self.normalize)[4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task == "segmentation":
            return super().forward(x)
        feats = self.forward_features(x)
        return feats if self.task == "features" else self.classifier(feats)


class SegResNetModel(SegResNet, ZooModel):
    """MONAI ``SegResNet`` with ``forward_features``, ``encoder_prefixes`` and ``first_conv_keys``."""

    encoder_prefixes = ("convInit.", "down_layers.")
    first_conv_keys = ("convInit.conv.weight",)

    def __init__(
        self,
        *,
        task: str,
        num_classes: int | None,
        in_channels: int = 1,
        spatial_dims: int = 3,
        init_filters: int = 16,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        blocks_up: Sequence[int] = (1, 1, 1),
        num_groups: int = 8,
        dropout_prob: float | None = None,
        upsample_mode: str = "nontrainable",
    ):
        _check_common(task, num_classes, in_channels)
        if len(blocks_up) != len(blocks_down) - 1:
            raise ValueError(f"blocks_up needs one entry less than blocks_down ({len(blocks_down) - 1}), "
                             f"got {tuple(blocks_up)}")
        super().__init__(
            spatial_dims=spatial_dims,
            init_filters=init_filters,
            in_channels=in_channels,
            out_channels=num_classes if task == "segmentation" else 1,
            dropout_prob=dropout_prob,
            norm=("GROUP", {"num_groups": num_groups}),
            blocks_down=tuple(blocks_down),
            blocks_up=tuple(blocks_up),
            upsample_mode=upsample_mode,
        )
        self.task = task
        self.divisor = 2 ** (len(blocks_down) - 1)
        self.out_channels = init_filters * self.divisor
        if task != "segmentation":
            for name in _DECODER_PARTS:
                delattr(self, name)
            if task == "classification":
                self.classifier = ClassificationHead(self.out_channels, num_classes)

    def _check_size(self, x: torch.Tensor) -> None:
        if x.ndim != self.spatial_dims + 2 or any(s % self.divisor for s in x.shape[2:]):
            raise ValueError(f"segresnet ({self.spatial_dims}D, {len(self.blocks_down)} levels) needs an input "
                             f"(N, C, {', '.join(['S'] * self.spatial_dims)}) with every S a multiple of "
                             f"{self.divisor}, got shape {tuple(x.shape)}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The deepest level of MONAI's ``encode``: ``(N, init_filters * divisor, *size / divisor)``."""
        self._check_size(x)
        return self.encode(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task == "segmentation":
            self._check_size(x)
            return super().forward(x)
        feats = self.forward_features(x)
        return feats if self.task == "features" else self.classifier(feats)


