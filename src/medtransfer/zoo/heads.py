"""Task heads shared by every family, in 2D and 3D through one code path (MONAI-style layer factories)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def conv_nd(spatial_dims: int) -> type[nn.Module]:
    return {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]


def batchnorm_nd(spatial_dims: int) -> type[nn.Module]:
    return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims]


def upsample_to(x: torch.Tensor, size: Sequence[int], mode: str = "nearest") -> torch.Tensor:
    """Resize ``x`` to spatial ``size``; a no-op when it already has that size."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=tuple(size), mode="nearest")
    linear = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(x, size=tuple(size), mode=linear, align_corners=False)


class ClassificationHead(nn.Module):
    """Global average pooling, optional hidden layer (Linear + ReLU), then Linear to ``num_classes`` logits.

    ``hidden=1024`` reproduces the Models Genesis classification example (GAP, FC 1024, ReLU, FC n).
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int | None = None, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        if hidden:
            layers += [nn.Linear(in_features, hidden), nn.ReLU(inplace=True)]
            in_features = hidden
        layers.append(nn.Linear(in_features, num_classes))
        self.mlp = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = torch.flatten(features, start_dim=2).mean(dim=2)
        return self.mlp(pooled)


class ConvBnReLU(nn.Sequential):
    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int):
        super().__init__(
            conv_nd(spatial_dims)(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
            batchnorm_nd(spatial_dims)(out_ch),
            nn.ReLU(inplace=True),
        )


class DecoderBlock(nn.Module):
    """Upsample (nearest) to the skip's size, concatenate [up, skip], two 3x3 Conv-BN-ReLU."""

    def __init__(self, spatial_dims: int, in_ch: int, skip_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = ConvBnReLU(spatial_dims, in_ch + skip_ch, out_ch)
        self.conv2 = ConvBnReLU(spatial_dims, out_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size: Sequence[int]) -> torch.Tensor:
        x = upsample_to(x, size)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class UNetDecoder(nn.Module):
    """U-Net decoder over an encoder's feature pyramid, for encoders that have no decoder of their own (ResNets).

    ``skip_channels`` lists the channels of the skip features from the highest resolution to the lowest, and
    ``deep_channels`` those of the deepest map. Each block upsamples to its skip's size (so dilated stages at
    equal resolution need no special case), and a last block without skip brings the map to the input size.
    With ``decoder_channels=(256, 128, 64, 32, 16)`` over a ResNet-50's [stem, layer1, layer2, layer3] skips it
    has the shape of the segmentation_models_pytorch U-Net used by BenchmarkTransferLearning.
    """

    def __init__(
        self,
        spatial_dims: int,
        skip_channels: Sequence[int],
        deep_channels: int,
        num_classes: int,
        decoder_channels: Sequence[int] | None = None,
    ):
        super().__init__()
        n_blocks = len(skip_channels) + 1
        if decoder_channels is None:
            decoder_channels = tuple(max(16, 256 >> i) for i in range(n_blocks))
        if len(decoder_channels) != n_blocks:
            raise ValueError(
                f"decoder_channels needs {n_blocks} entries (one per skip plus one at input size), "
                f"got {len(decoder_channels)}"
            )
        skips = list(reversed(skip_channels)) + [0]
        ins = [deep_channels] + list(decoder_channels[:-1])
        self.blocks = nn.ModuleList(
            DecoderBlock(spatial_dims, i, s, o) for i, s, o in zip(ins, skips, decoder_channels)
        )
        self.head = conv_nd(spatial_dims)(decoder_channels[-1], num_classes, kernel_size=3, padding=1)

    def forward(self, pyramid: Sequence[torch.Tensor], input_size: Sequence[int]) -> torch.Tensor:
        """``pyramid``: skip features from highest to lowest resolution, then the deepest map last."""
        *skips, x = pyramid
        targets = [(s, s.shape[2:]) for s in reversed(skips)] + [(None, tuple(input_size))]
        for block, (skip, size) in zip(self.blocks, targets):
            x = block(x, skip, size)
        return self.head(x)
