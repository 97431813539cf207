"""Variable dimension transform (VDT): supervised 3D pretraining on labelled 2D images.

Paper: S. Zhang, Z. Li, H.-Y. Zhou, J. Ma, Y. Yu, "Advancing 3D Medical Image Analysis with Variable Dimension
Transform based Supervised 3D Pre-training", Neurocomputing 529, 2023 (arXiv:2201.01426).

A 2D image with C colour channels becomes a one-channel volume of C depth slices, ``(1, C, H, W)``, and a 3D ResNet
(``vdt_resnet18_3d``, in-plane strides only) learns to classify it. Shuffling the channels of every image (p 1)
stops the network from tying a depth position to a colour. Published recipe (spec 2b, CSPR config
``resnet18_3d_BN_b32x8_coslr_labelsmoothing_channelshuffle``): random-resized crop 224, horizontal flip p 0.5,
channel shuffle p 1, one mean/std (114.495 / 57.63) for all channels, label-smoothing CE 0.1, SGD lr 0.1 momentum
0.9 wd 1e-4, cosine to 0 over 100 epochs, batch 256; test: short side to 256, centre crop 224.

Differences from the published code (mmcls pipelines on OpenCV):
- The crop, flip and shuffle parameters are drawn with ``torch`` from an explicit ``torch.Generator`` on the
  image's device, then applied deterministically; the resize is ``F.interpolate`` bilinear (no antialiasing, as
  OpenCV's INTER_LINEAR), so the transform runs on the GPU too.
- Images are read as RGB, so the BGR->RGB swap of the OpenCV pipeline is not needed.
- Grayscale images (most medical 2D data) are repeated to ``channels`` slices; a 4th (alpha) channel is dropped
  when 3 are asked for.
- Dataset items draw from a generator seeded by ``(seed, epoch, index)``: the same samples for any number of
  loader workers and after resuming.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

VDT_MEAN = 114.495  # the mean of ImageNet's RGB channel means (123.675, 116.28, 103.53), spec 2b
VDT_STD = 57.63  # the mean of ImageNet's RGB channel stds (58.395, 57.12, 57.375)
MAX_SIZE = 4096  # larger outputs are almost surely a mistake (a 4096^2 x C float volume is already 200 MB)

# Published pretraining recipe (spec 2b) as config sections (train/config.py, pretext/config.py). The cosine
# horizon is left to the run's length (max_epochs), so a shortened run still anneals to 0. CSPR trained with
# batch 32 x 8 GPUs; with fewer GPUs keep 256 through data.batch_size or accumulate (train.accum_steps).
VDT_RECIPE: dict[str, Any] = {
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
    "schedule": {"name": "cosine", "interval": "epoch", "min_lr": 0.0},
    "train": {"max_epochs": 100},
    "data": {"batch_size": 256, "patch_size": [224, 224]},
    # VDTTransform keywords (the crop size is data.patch_size) plus the loss's label smoothing
    "options": {"channels": 3, "channel_shuffle": 1.0, "label_smoothing": 0.1},
}


# ---------------------------------------------------------------------------------------------------- input


def as_chw(image: Any) -> torch.Tensor:
    """An image array or tensor on the 0..255 scale -> float32 ``(C, H, W)`` on the tensor's device (numpy: CPU).

    Layout: ``(H, W)`` is grayscale. A 3-D input is ``(H, W, C)`` when its last axis has 1, 3 or 4 entries and its
    first does not (numpy/PIL images), otherwise ``(C, H, W)`` when its first axis has 1, 3 or 4 entries (torch
    tensors, medtransfer's ``read_image``); anything else is an error.
    """
    x = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"image must be a numpy array or a torch tensor, got {type(image).__name__}")
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"image must hold real pixel values on the 0..255 scale, got dtype {x.dtype}")
    x = x.to(torch.float32)
    small = (1, 3, 4)
    if x.ndim == 2:
        x = x.unsqueeze(0)
    elif x.ndim == 3 and x.shape[-1] in small and x.shape[0] not in small:
        x = x.permute(2, 0, 1)
    elif not (x.ndim == 3 and x.shape[0] in small):
        raise ValueError(
            f"image must be (H, W), (H, W, C) or (C, H, W) with C in {small}, got shape {tuple(x.shape)}"
        )
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"image has an empty spatial axis: shape {tuple(x.shape)}")
    lo, hi = torch.aminmax(x)
    if not (torch.isfinite(lo) and torch.isfinite(hi) and lo >= 0 and hi <= 255):
        raise ValueError(
            f"image values must lie on the 0..255 scale, got range [{lo.item():g}, {hi.item():g}]; scale 16-bit or "
            "float images to 0..255 first"
        )
    return x.contiguous()


def _with_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    c = x.shape[0]
    if c == channels:
        return x
    if c == 1:
        return x.expand(channels, -1, -1).contiguous()
    if c == 4 and channels == 3:
        return x[:3]
    raise ValueError(f"image has {c} channels; this transform makes {channels} slices (1 is repeated, RGBA loses A)")


# ---------------------------------------------------------------------------------------------------- crops


def sample_crop_box(
    height: int,
    width: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    *,
    attempts: int = 10,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[int, int, int, int]:
    """The random-resized-crop box ``(top, left, h, w)`` of an ``height x width`` image.

    The area fraction is uniform in ``scale`` and the aspect ratio ``w / h`` log-uniform in ``ratio``; of
    ``attempts`` candidates (drawn at once) the first that fits inside the image is placed uniformly. If none fits,
    the largest centred box whose ratio is clamped into ``ratio`` is used (the usual fallback of this crop).
    """
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height} x {width}")
    area = float(height * width)
    kw = {"generator": generator, "device": device, "dtype": torch.float64}
    u = torch.rand(2, attempts, **kw)  # area fraction, log aspect ratio
    fraction = scale[0] + (scale[1] - scale[0]) * u[0]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[1])
    w = torch.round(torch.sqrt(area * fraction * aspect))
    h = torch.round(torch.sqrt(area * fraction / aspect))
    fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
    place = torch.rand(2, **kw)
    valid = fits.nonzero()
    if len(valid):
        k = valid[0, 0]
        hk, wk = int(h[k].item()), int(w[k].item())
        top = int(torch.floor(place[0] * (height - hk + 1)).item())
        left = int(torch.floor(place[1] * (width - wk + 1)).item())
        return min(top, height - hk), min(left, width - wk), hk, wk
    in_ratio = width / height
    if in_ratio < min(ratio):
        wk, hk = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        hk, wk = height, int(round(height * max(ratio)))
    else:
        hk, wk = height, width
    hk, wk = max(1, min(hk, height)), max(1, min(wk, width))
    return (height - hk) // 2, (width - wk) // 2, hk, wk


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x.unsqueeze(0), size=size, mode="bilinear", align_corners=False).squeeze(0)


def eval_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(C, H, W)`` -> short side resized to ``round(size * 256 / 224)`` (aspect kept), then the centre
    ``size x size`` (top-left at ``(H' - size) // 2, (W' - size) // 2``)."""
    short = int(round(size * 256 / 224))
    h, w = x.shape[-2:]
    if h <= w:
        new = (short, max(short, int(round(w * short / h))))
    else:
        new = (max(short, int(round(h * short / w))), short)
    x = _resize(x, new)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return x[:, top : top + size, left : left + size]


# ------------------------------------------------------------------------------------------------ transform


class VDTTransform:
    """2D labelled image -> a ``(1, C, size, size)`` float32 volume: colour channels as depth slices.

    ``train=True``: random-resized crop (``scale``, ``ratio``; bilinear ``F.interpolate``), horizontal flip with
    probability ``flip_rate``, channel shuffle (a random permutation of the C channels) with probability
    ``channel_shuffle``, then ``(x - mean) / std`` with one mean/std for all channels. ``train=False``: short side
    to ``round(size * 256 / 224)``, centre crop ``size``, normalise. Input: uint8/float array or tensor ``(H, W)``,
    ``(H, W, C)`` or ``(C, H, W)`` on the 0..255 scale (layout rule: :func:`as_chw`); grayscale is repeated to
    ``channels`` slices. Random draws come from ``generator`` (None: torch's global RNG) on the image's device;
    the same generator state gives the same output. Every call draws the same numbers, whatever they decide.
    """

    def __init__(
        self,
        size: int = 224,
        train: bool = True,
        channels: int = 3,
        channel_shuffle: float = 1.0,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        flip_rate: float = 0.5,
        mean: float = VDT_MEAN,
        std: float = VDT_STD,
    ):
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size <= MAX_SIZE:
            raise ValueError(f"size must be an integer in [1, {MAX_SIZE}], got {size!r}")
        if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or not 1 <= channels <= 64:
            raise ValueError(f"channels must be an integer in [1, 64], got {channels!r}")
        for name, p in (("channel_shuffle", channel_shuffle), ("flip_rate", flip_rate)):
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
        scale, ratio = tuple(float(s) for s in scale), tuple(float(r) for r in ratio)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must be (min, max) with 0 < min <= max <= 1, got {scale}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must be (min, max) with 0 < min <= max, got {ratio}")
        if not (math.isfinite(float(std)) and float(std) > 0 and math.isfinite(float(mean))):
            raise ValueError(f"std must be > 0 and mean finite, got mean={mean!r}, std={std!r}")
        self.size, self.train, self.channels = int(size), bool(train), int(channels)
        self.channel_shuffle, self.flip_rate = float(channel_shuffle), float(flip_rate)
        self.scale, self.ratio = scale, ratio
        self.mean, self.std = float(mean), float(std)

    def __repr__(self) -> str:
        return (
            f"VDTTransform(size={self.size}, train={self.train}, channels={self.channels}, "
            f"channel_shuffle={self.channel_shuffle}, scale={self.scale}, ratio={self.ratio}, "
            f"flip_rate={self.flip_rate}, mean={self.mean}, std={self.std})"
        )

    def draw(self, height: int, width: int, generator: torch.Generator | None = None, device=None) -> dict[str, Any]:
        """The random parameters of one call: crop ``box`` (top, left, h, w), ``flip``, channel ``permutation``."""
        box = sample_crop_box(height, width, self.scale, self.ratio, generator=generator, device=device)
        coins = torch.rand(2, generator=generator, device=device)
        perm = torch.randperm(self.channels, generator=generator, device=device)
        shuffle = bool(coins[1] < self.channel_shuffle)
        return {
            "box": box,
            "flip": bool(coins[0] < self.flip_rate),
            "permutation": perm.tolist() if shuffle else list(range(self.channels)),
        }

    def apply(self, x: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        """The deterministic part: ``(C, H, W)`` float -> ``(1, C, size, size)`` with the given parameters."""
        top, left, h, w = params["box"]
        x = _resize(x[:, top : top + h, left : left + w], (self.size, self.size))
        if params["flip"]:
            x = x.flip(-1)
        perm = list(params["permutation"])
        if perm != list(range(x.shape[0])):
            x = x[torch.tensor(perm, device=x.device)]
        return self.normalise(x).unsqueeze(0)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def __call__(self, image: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        x = _with_channels(as_chw(image), self.channels)
        if not self.train:
            return self.normalise(eval_crop(x, self.size)).unsqueeze(0)
        params = self.draw(x.shape[1], x.shape[2], generator=generator, device=x.device)
        return self.apply(x, params)


# -------------------------------------------------------------------------------------------------- dataset


def _item_seed(seed: int, epoch: int, index: int) -> int:
    # as pretext/data.py: SeedSequence mixes the three numbers into one independent stream per item
    return int(np.random.default_rng([int(seed), int(epoch), int(index)]).integers(2**62))


def _image_path(case: Any):
    images = getattr(case, "images", None)
    if images:
        return images[0]
    path = getattr(case, "image", None)
    if path is None:
        raise ValueError(f"case {case!r} has no image path (.images or .image)")
    return path


class VDTImageDataset(Dataset):
    """Cases of a labelled 2D dataset -> ``{"image": (1, C, s, s) float32, "label": int64 scalar, "case_id": str}``
    (the keys of ``medtransfer.train.torchdata.collate``).

    ``cases``: :class:`~medtransfer.data.types.Case` objects (or a ``Dataset`` holding them) from
    ``medtransfer.data.datasets.load_dataset`` of a one-class-per-image layout (``image_list_2d``, ``csv`` with a
    class column), or any objects with ``.image`` (or ``.images``) and an integer ``.target``. Multi-label or
    missing targets are refused up front. Images are read with ``medtransfer.data.io.read_image`` (no
    reorientation: the array as stored). Item ``i`` draws from a generator seeded by ``(seed, epoch, i)``.
    """

    def __init__(self, cases, transform: VDTTransform, seed: int = 0):
        cases = list(getattr(cases, "cases", cases))
        if not cases:
            raise ValueError("cases is empty: VDTImageDataset needs at least one labelled image")
        if not isinstance(transform, VDTTransform):
            raise ValueError(f"transform must be a VDTTransform, got {type(transform).__name__}")
        for case in cases:
            target = getattr(case, "target", None)
            if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or target < 0:
                raise ValueError(
                    f"case {getattr(case, 'case_id', case)!r}: target must be one class index (int >= 0), got "
                    f"{target!r}; VDT trains single-label classification (pick one finding column for a list)"
                )
            _image_path(case)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.cases, self.transform, self.seed, self.epoch = cases, transform, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.cases)

    def generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(_item_seed(self.seed, self.epoch, index))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from ..data.io import read_image

        case = self.cases[index]
        array = read_image(_image_path(case), reorient=False).array
        image = self.transform(array, generator=self.generator(index))
        label = torch.tensor(int(case.target), dtype=torch.int64)
        return {"image": image, "label": label, "case_id": str(getattr(case, "case_id", index))}


def vdt_loss(label_smoothing: float = 0.1) -> nn.Module:
    """Label-smoothing cross-entropy, 0.1 as published (spec 2b)."""
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing!r}")
    return nn.CrossEntropyLoss(label_smoothing=float(label_smoothing))


__all__ = [
    "MAX_SIZE", "VDTImageDataset", "VDTTransform", "VDT_MEAN", "VDT_RECIPE", "VDT_STD", "as_chw", "eval_crop",
    "sample_crop_box", "vdt_loss",
]  # fmt: skip
