"""Weight surgery that lets a checkpoint initialise a network of another input contract.

- 2D -> 3D inflation (Carreira & Zisserman, "Quo Vadis, Action Recognition?", CVPR 2017): a k x k kernel becomes a
  d x k x k kernel, either repeated over depth and divided by d (``"i3d"``: a volume of identical slices then gives
  the 2D response) or placed on the centre slice with zeros elsewhere (``"centre"``: the 3D net starts as the 2D
  net applied slice by slice).
- Input-channel adaptation (timm's ``adapt_input_conv``): a first convolution trained on C channels used with C'
  channels. To one channel the kernel is averaged over its input channels, as VDT's ``*_med1channel.pth`` files
  were made; to more channels it is tiled and rescaled by C/C' so the response to a replicated image is kept.
"""

from __future__ import annotations

import torch

INFLATE_MODES = ("i3d", "centre")


def inflate_conv_weight(weight: torch.Tensor, depth: int, mode: str = "i3d") -> torch.Tensor:
    """(O, I, kh, kw) -> (O, I, depth, kh, kw)."""
    if weight.ndim != 4:
        raise ValueError(f"inflation takes a 2D convolution kernel (O, I, kh, kw), got shape {tuple(weight.shape)}")
    if depth < 1:
        raise ValueError(f"inflation depth must be >= 1, got {depth}")
    if mode == "i3d":
        return weight.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth
    if mode == "centre":
        out = weight.new_zeros(weight.shape[0], weight.shape[1], depth, *weight.shape[2:])
        out[:, :, depth // 2] = weight
        return out
    raise ValueError(f"unknown inflation mode '{mode}'; choose one of {INFLATE_MODES}")


def adapt_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """(O, I, *k) -> (O, in_channels, *k): average to one channel, or tile and rescale."""
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    have = weight.shape[1]
    if have == in_channels:
        return weight
    if in_channels == 1:
        return weight.mean(dim=1, keepdim=True)
    reps = -(-in_channels // have)
    tiled = weight.repeat(1, reps, *([1] * (weight.ndim - 2)))[:, :in_channels]
    return tiled * (have / in_channels)
