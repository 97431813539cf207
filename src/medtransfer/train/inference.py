"""Patch-based inference on images larger than the training patch, and whole-volume prediction with geometry.

Sliding windows follow MIS-FM/PyMIC (``spec/seed-systems.md`` 4c: 64x128x128 windows, stride half a window) and
VDT's BCV setting (2c): overlap 0.5 by default, and MONAI ``sliding_window_inference`` blends the windows with a
Gaussian weight (``mode="gaussian"``, sigma 1/8 of the window, as nnU-Net) so window borders, where the
network sees least context, count least.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch import nn

from medtransfer.data.types import Image

__all__ = ["sliding_window_predict", "predict_volume", "logits_to_labels", "predict_case", "activation_bytes",
           "memory_budget"]

log = logging.getLogger(__name__)
_BYTES_PER_VOXEL: "weakref.WeakKeyDictionary[nn.Module, float]" = weakref.WeakKeyDictionary()


def _as_tuple(value: int | Sequence[int] | None, dims: int, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    out = (int(value),) * dims if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)
    if len(out) != dims or any(v < 1 for v in out):
        raise ValueError(f"{name} must be a positive int or {dims} positive ints (one per spatial axis), got {value!r}")
    return out


def _first_output(output):
    # deep-supervision models may return several outputs; the full-resolution one comes first
    return output[0] if isinstance(output, (list, tuple)) else output


def sliding_window_predict(
    model: nn.Module,
    image: torch.Tensor,
    *,
    patch_size: int | Sequence[int] | None,
    overlap: float = 0.5,
    mode: str = "gaussian",
    sw_batch_size: int = 1,
    divisor: int | Sequence[int] | None = None,
    device: torch.device | str | None = None,
    amp: bool = False,
) -> torch.Tensor:
    """Logits of ``model`` over a whole ``(N, C, D, H, W)`` or ``(N, C, H, W)`` ``image``, window by window.

    ``patch_size``: the window (the training patch size), or None for one forward pass over the whole image.
    ``divisor``: the network's total stride; the image is zero-padded at the end of each axis to a multiple of it
    and the logits cropped back, and ``patch_size`` must itself be a multiple of it. A window larger than the
    (padded) image is shrunk to it. ``device``: where the model runs (default: where its parameters are); the
    logits are assembled, as float32, on ``image``'s device, so a large volume may stay in host memory. Runs under
    ``torch.no_grad`` with the model in eval mode, and restores the model's train/eval mode afterwards."""
    if image.ndim not in (4, 5):
        raise ValueError(f"image must be (N, C, H, W) or (N, C, D, H, W), got shape {tuple(image.shape)}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    dims = image.ndim - 2
    spatial = tuple(image.shape[2:])
    div = _as_tuple(divisor, dims, "divisor") or (1,) * dims
    patch = _as_tuple(patch_size, dims, "patch_size")
    if patch is not None and any(p % d for p, d in zip(patch, div)):
        raise ValueError(f"patch_size {patch} must be a multiple of divisor {div} on every axis")
    padded = tuple(-(-s // d) * d for s, d in zip(spatial, div))
    pad = [x for s, p in zip(reversed(spatial), reversed(padded)) for x in (0, p - s)]
    x = F.pad(image, pad) if any(pad) else image
    roi = padded if patch is None else tuple(min(p, s) for p, s in zip(patch, padded))

    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else image.device
    device = torch.device(device)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)
        if amp
        else contextlib.nullcontext()
    )

    def predictor(window: torch.Tensor) -> torch.Tensor:
        with autocast:
            return _first_output(model(window)).float()

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if roi == padded:  # one window covers everything: skip the blending machinery
                logits = predictor(x.to(device)).to(image.device)
            else:
                logits = sliding_window_inference(
                    x, roi, sw_batch_size, predictor, overlap=overlap, mode=mode, sw_device=device, device=image.device
                )
    finally:
        model.train(was_training)
    crop = (slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)
    return logits[crop].float()


def logits_to_labels(logits: torch.Tensor) -> torch.Tensor:
    """Label map ``(N, *spatial)``: argmax over channels, or ``logit > 0`` for one channel (the rule of the metrics)."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).to(torch.uint8)
    labels = logits.argmax(dim=1)
    return labels.to(torch.uint8) if logits.shape[1] <= 256 else labels.to(torch.int16)


def predict_volume(
    model: nn.Module,
    image: Image,
    *,
    patch_size: int | Sequence[int] | None,
    overlap: float = 0.5,
    mode: str = "gaussian",
    sw_batch_size: int = 1,
    divisor: int | Sequence[int] | None = None,
    device: torch.device | str | None = None,
    amp: bool = False,
) -> Image:
    """The label map of one (already preprocessed) :class:`Image`, on the same grid and with the same geometry.

    The result keeps ``image``'s spacing, origin, direction and meta (which records the orientation on disk), so
    ``medtransfer.data.io.write_image(pred, path, like=image)`` writes it over the original scan. The model must
    take ``image.channels`` input channels; the other options are those of :func:`sliding_window_predict`."""
    arr = np.asarray(image.array, dtype=np.float32)
    if arr.ndim == image.spatial_dims:
        arr = arr[None]
    x = torch.from_numpy(np.ascontiguousarray(arr))[None]
    logits = sliding_window_predict(
        model,
        x,
        patch_size=patch_size,
        overlap=overlap,
        mode=mode,
        sw_batch_size=sw_batch_size,
        divisor=divisor,
        device=device,
        amp=amp,
    )
    labels = logits_to_labels(logits)[0].cpu().numpy()
    return Image(
        array=labels,
        spacing=tuple(image.spacing),
        origin=tuple(image.origin),
        direction=np.array(image.direction, dtype=float, copy=True),
        path=None,
        meta=dict(image.meta),
    )


def _tensor_bytes(output) -> int:
    if torch.is_tensor(output):
        return output.numel() * output.element_size()
    if isinstance(output, (list, tuple)):
        return sum(_tensor_bytes(o) for o in output)
    return 0


def activation_bytes(model: nn.Module, shape: Sequence[int], divisor: int | Sequence[int] | None = None) -> int:
    """Estimated memory (bytes) of one forward pass over an input of ``shape`` ``(N, C, *spatial)``.

    Measured once per model on a small probe input (twice the divisor per axis, at least 16 voxels): the bytes of
    the outputs of every leaf module, summed, per input voxel, times the (divisor-padded) voxels of ``shape``. Summing
    every layer's output counts memory as if nothing were freed during the pass, so it over-estimates: for
    ``genesis_unet3d`` it gives 4268 bytes per voxel, where the peak resident memory of a 32x256x256 pass on CPU grew
    by 2155 bytes per voxel (``benchmarks/inference.py`` records both)."""
    dims = len(shape) - 2
    div = _as_tuple(divisor, dims, "divisor") or (1,) * dims
    padded = [-(-int(s) // d) * d for s, d in zip(shape[2:], div)]
    per_voxel = _BYTES_PER_VOXEL.get(model)
    if per_voxel is None:
        probe = tuple(max(16, 2 * d) // d * d for d in div)
        total = [0]

        def hook(_module, _inputs, output):
            total[0] += _tensor_bytes(output)

        param = next(model.parameters(), None)
        x = torch.zeros(1, int(shape[1]), *probe, device=param.device if param is not None else "cpu")
        leaves = [m for m in model.modules() if not list(m.children())]
        handles = [m.register_forward_hook(hook) for m in leaves]
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                model(x)
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
        per_voxel = (total[0] + x.numel() * 4) / float(np.prod(probe))
        _BYTES_PER_VOXEL[model] = per_voxel
    return int(per_voxel * int(shape[0]) * float(np.prod(padded)))


def memory_budget(memory_gb: float | None, device: torch.device | str) -> int:
    """Bytes a whole-volume pass may use: ``memory_gb`` when given, else 80% of the free memory of a CUDA device,
    or half of the available RAM (``MemAvailable`` of /proc/meminfo, 4 GiB where it cannot be read) on CPU."""
    if memory_gb is not None:
        return int(memory_gb * 2**30)
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(0.8 * free)
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024 // 2
    except (OSError, KeyError, ValueError):
        return 4 * 2**30


def predict_case(
    model: nn.Module,
    image: torch.Tensor,
    *,
    window: int | Sequence[int] | None,
    overlap: float = 0.5,
    batch_size: int = 4,
    divisor: int | Sequence[int] | None = None,
    memory_gb: float | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, str]:
    """Logits over ``image`` ``(N, C, *spatial)``, and how they were computed (``"whole"`` or ``"windows"``).

    One forward pass over the whole (divisor-padded) image when :func:`activation_bytes` fits
    :func:`memory_budget` (``memory_gb=0``: never), since overlapping windows repeat work (overlap 0.5 in 3D runs up
    to 8 times the voxels); a CUDA out-of-memory error in that pass falls back to windows. Otherwise
    :func:`sliding_window_predict` with ``window`` (``None``: the whole image), ``overlap`` and ``batch_size``."""
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else image.device
    if memory_gb != 0:
        need, budget = activation_bytes(model, image.shape, divisor), memory_budget(memory_gb, device)
        if need <= budget:
            try:
                return sliding_window_predict(model, image, patch_size=None, divisor=divisor, device=device), "whole"
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                log.warning("whole-volume pass ran out of CUDA memory (estimated %.1f GiB); using windows",
                            need / 2**30)
        else:
            log.info("whole volume needs about %.1f GiB > budget %.1f GiB; using windows", need / 2**30, budget / 2**30)
    logits = sliding_window_predict(model, image, patch_size=window, overlap=overlap, sw_batch_size=batch_size,
                                    divisor=divisor, device=device)
    return logits, "windows"
