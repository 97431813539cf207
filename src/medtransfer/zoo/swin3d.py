"""3D shifted-window self-attention, numerically identical to PCT-Net's transformer branch.

PCT-Net (Wang et al., "MIS-FM: 3D Medical Image Segmentation using Foundation Models Pretrained on a Large-Scale
Unannotated Dataset", arXiv:2306.16925; openmedlab/MIS-FM ``net/transformer.py``) uses an nnFormer-flavoured 3D Swin
layer. Published checkpoints only give the published outputs if its quirks are kept:

- the relative-position index uses nnFormer's multipliers ``3w-1`` (depth) and ``2w-1`` (height), which are not a
  bijection onto the ``(2w-1)^3``-row bias table (several offsets share a row); the index is a *persistent* int64
  buffer, so checkpoints carry it;
- tokens are layer-normed first, then zero-padded to window multiples; padded keys are *not* masked, so padding
  changes the result near the far borders;
- the shifted-window mask (-100 between tokens of different regions) is built on the padded grid;
- when the token grid is not larger than the window (smallest side), nothing is shifted, and a window larger than
  the grid the layer was built for shrinks to it. The window decides the bias-table shape, so it is fixed at
  construction; the shift is decided per forward from the actual grid, which is the official choice whenever the
  input has the size the layer was built for.

Unlike the official layer, which only runs at the resolution it was built for, padding, shifts and masks here follow
the actual input, so one network serves any admissible patch size. Tensors are channel-last ``(B, S, H, W, C)``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_MASK_VALUE = -100.0
_MAX_CACHED_MASKS = 4


def relative_position_index(window: int) -> torch.Tensor:
    """``(w^3, w^3)`` int64 rows into the bias table, with nnFormer's (non-unique) multipliers."""
    axis = torch.arange(window)
    coords = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij")).flatten(1)  # (3, w^3)
    offsets = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # each in [0, 2w-2]
    multipliers = torch.tensor([3 * window - 1, 2 * window - 1, 1])
    return (offsets * multipliers).sum(-1)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, S, H, W, C)`` with sizes divisible by ``window`` -> ``(B * n_windows, window^3, C)``, batch-major."""
    b, s, h, w, c = x.shape
    x = x.view(b, s // window, window, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, window**3, c)


def window_merge(windows: torch.Tensor, window: int, size: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`window_partition` onto a grid of spatial ``size``."""
    s, h, w = size
    c = windows.shape[-1]
    x = windows.view(-1, s // window, h // window, w // window, window, window, window, c)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(-1, s, h, w, c)


def shifted_window_mask(
    padded_size: Sequence[int],
    window: int,
    shift: int,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(n_windows, window^3, window^3)`` additive mask for attention on a grid rolled by ``-shift``.

    Each axis of the padded grid splits into ``[0, -window)``, ``[-window, -shift)`` and ``[-shift, end)``; tokens of
    one window attend to each other freely (0) only when they lie in the same region on all three axes, else -100.
    """
    regions = []
    for length in padded_size:
        label = torch.zeros(length, dtype=torch.long, device=device)
        label[length - window : length - shift] = 1
        label[length - shift :] = 2
        regions.append(label)
    rs, rh, rw = regions
    region_id = (rs[:, None, None] * 9 + rh[None, :, None] * 3 + rw[None, None, :])[None, ..., None]
    ids = window_partition(region_id, window).squeeze(-1)  # (n_windows, window^3)
    different = ids[:, None, :] != ids[:, :, None]
    return torch.zeros(different.shape, dtype=dtype, device=device).masked_fill_(different, _MASK_VALUE)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training, rescaled by the keep rate."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """Linear -> exact (erf) GELU -> dropout -> Linear -> dropout."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention3d(nn.Module):
    """Multi-head self-attention inside cubic windows with a learned relative-position bias."""

    def __init__(self, dim: int, window: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.window = window
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 3, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``(B * n_windows, N, C)``; ``mask``: ``(n_windows, N, N)`` or None."""
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            n_windows = mask.shape[0]
            attn = attn.view(bw // n_windows, n_windows, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.view(bw, self.num_heads, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(out))


class SwinBlock3d(nn.Module):
    """Pre-norm (shifted-)window attention and MLP, each a residual branch with stochastic depth.

    ``shifted`` blocks roll the grid by ``window // 2`` whenever the grid is larger than the window.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int,
        shifted: bool,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if window < 1:
            raise ValueError(f"window size must be positive, got {window}")
        self.window = window
        self.shift = window // 2 if shifted else 0
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention3d(dim, window, num_heads, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def shift_for(self, size: Sequence[int]) -> int:
        """The shift used on a token grid of spatial ``size``: none unless every side is larger than the window."""
        return self.shift if min(size) > self.window else 0

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``(B, S, H, W, C)``; ``mask``: :func:`shifted_window_mask` of the padded grid when it is shifted."""
        size = x.shape[1:4]
        w = self.window
        shift = self.shift_for(size)
        if shift and mask is None:
            raise ValueError(f"a shifted window block needs the attention mask of the padded grid (size {size})")
        pads = [(w - n % w) % w for n in size]
        y = F.pad(self.norm1(x), (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        padded = y.shape[1:4]
        if shift:
            y = torch.roll(y, shifts=(-shift,) * 3, dims=(1, 2, 3))
        y = self.attn(window_partition(y, w), mask if shift else None)
        y = window_merge(y, w, padded)
        if shift:
            y = torch.roll(y, shifts=(shift,) * 3, dims=(1, 2, 3))
        y = y[:, : size[0], : size[1], : size[2]]
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinLayer3d(nn.Module):
    """``depth`` blocks alternating unshifted and half-window-shifted attention (official ``BasicLayer``).

    ``resolution`` is the token grid the layer is built for; it only matters when its smallest side is smaller
    than ``window``: then the window shrinks to it, as in the official code. Shift masks are computed from the
    actual input and cached per padded grid, device and dtype.
    """

    def __init__(
        self,
        dim: int,
        resolution: Sequence[int],
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        smallest = min(resolution)
        if smallest < 1:
            raise ValueError(f"transformer resolution {tuple(resolution)} is empty; use a larger input_size")
        block_window = min(smallest, window)
        self.blocks = nn.ModuleList(
            SwinBlock3d(
                dim,
                num_heads,
                block_window,
                shifted=i % 2 == 1,
                mlp_ratio=mlp_ratio,
                drop=drop,
                attn_drop=attn_drop,
                drop_path=drop_path,
            )
            for i in range(depth)
        )
        self._masks: dict[tuple, torch.Tensor] = {}

    def _mask(self, block: SwinBlock3d, x: torch.Tensor) -> torch.Tensor | None:
        shift = block.shift_for(x.shape[1:4])
        if not shift:
            return None
        w = block.window
        padded = tuple(-(-n // w) * w for n in x.shape[1:4])
        key = (padded, w, shift, x.device, x.dtype)
        mask = self._masks.get(key)
        if mask is None:
            if len(self._masks) >= _MAX_CACHED_MASKS:
                self._masks.pop(next(iter(self._masks)))
            mask = shifted_window_mask(padded, w, shift, device=x.device, dtype=x.dtype)
            self._masks[key] = mask
        return mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, self._mask(block, x))
        return x
