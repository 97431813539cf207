"""Converters for the 3D seed systems' checkpoint formats, our own normalised format, and plain state_dicts.

| source      | on disk                                                                   | canonical keys            |
|-------------|---------------------------------------------------------------------------|---------------------------|
| medicalnet  | ``{'state_dict': {'module.conv1.weight', ...}}`` (+ ``ecpoch``/``optimizer`` when fine-tuned) | MedicalNet ResNet |
| genesis     | ``{'epoch', 'state_dict': {'module.down_tr64...'}, 'optimizer_state_dict'}`` | Models Genesis UNet3D  |
| pymic       | ``{'iteration', 'valid_pred', 'model_state_dict', 'optimizer_state_dict'}`` | FMUNet / PCT-Net       |
| mmdet       | MP3D: ``{'meta', 'state_dict', 'optimizer'?}`` or bare, keys under ``backbone.``, ``module.`` or none, with ``conv1_custom`` | P3D-63 (+ detector parts) |
| mmcv        | ``{'meta', 'state_dict', 'optimizer'?}`` with VDT's key signature (below)   | VDT ResNet3D (+ ``fc``) |
| torchvision_video | torchvision ``r3d_18`` layout: ``stem.0``, ``layer1.0.conv1.0``, ...    | resnet3d_18 (r3d options) |
| medtransfer | safetensors with a JSON ``medtransfer`` header entry                        | as written                |
| plain       | any other dict of tensors, optionally under ``state_dict``/``model``        | ``module.`` stripped      |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .sources import (
    Source,
    StateDict,
    drop_keys,
    is_tensor_dict,
    keys_start_with,
    register_source,
    strip_prefixes,
    tensors_only,
    unwrap,
)

_WRAPPERS = ("state_dict", "model_state_dict", "model", "net", "network", "resnet")


@dataclass
class NormalisedWeights:
    """A file in medtransfer's own format: tensors plus the metadata written with them."""

    state_dict: StateDict
    metadata: dict[str, Any] = field(default_factory=dict)


def _inner(obj: Any, key: str = "state_dict") -> Mapping:
    inner = obj.get(key) if isinstance(obj, Mapping) else None
    return inner if isinstance(inner, Mapping) else {}


def _strip_module(sd: Mapping[str, torch.Tensor]) -> StateDict:
    return strip_prefixes(tensors_only(sd), ["module."])


# -- medtransfer ----------------------------------------------------------------------------------------------------
register_source(
    Source(
        name="medtransfer",
        description="medtransfer's normalised format: safetensors + JSON metadata (zoo convert)",
        detect=lambda obj: isinstance(obj, NormalisedWeights),
        convert=lambda obj: dict(obj.state_dict),
        priority=0,
    )
)


# -- PyMIC (MIS-FM) -------------------------------------------------------------------------------------------------
register_source(
    Source(
        name="pymic",
        description="PyMIC / MIS-FM: {'model_state_dict', 'iteration', 'valid_pred', 'optimizer_state_dict'}",
        detect=lambda obj: is_tensor_dict(_inner(obj, "model_state_dict")),
        convert=lambda obj: _strip_module(obj["model_state_dict"]),
        priority=10,
    )
)


# -- mmdet (MP3D) ---------------------------------------------------------------------------------------------------
_MMDET_WRAPPERS = ("module.", "backbone.")


def _mmdet_state_dict(obj: Any) -> StateDict:
    """The tensors of an MP3D file with every leading ``module.``/``backbone.`` removed; the detector's ``neck.``,
    ``rpn_head.``, ``roi_head.`` keys stay, so that the load report lists them as unused."""
    sd = _inner(obj) or obj
    out: StateDict = {}
    for key, value in tensors_only(sd).items():
        while key.startswith(_MMDET_WRAPPERS):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _detect_mmdet(obj: Any) -> bool:
    w = _mmdet_state_dict(obj).get("conv1_custom.weight")
    return w is not None and w.ndim == 5


register_source(
    Source(
        name="mmdet",
        description="mmdet (MP3D P3D): {'meta', 'state_dict'} or bare, keys under 'backbone.', 'module.' or none",
        detect=_detect_mmdet,
        convert=_mmdet_state_dict,
        priority=15,  # before mmcv, whose {'meta', 'state_dict'} wrapper it shares
    )
)


# -- mmcv (VDT / CSPR) ----------------------------------------------------------------------------------------------
def _vdt_signature(sd: Mapping[str, torch.Tensor]) -> bool:
    """The module names of an mmcls classifier (``backbone.``, ``head.``), which VDT's published file is. A bare
    ResNet in the same wrapper is not taken for VDT's: its keys fit any inflated 3D ResNet."""
    return any(k.startswith(("backbone.", "head.")) for k in strip_prefixes(tensors_only(sd), ["module."]))


def _detect_mmcv(obj: Any) -> bool:
    # {'meta', 'state_dict'} is what every mmcv runner and many other tools save: the wrapper alone names no format.
    return isinstance(obj, Mapping) and "meta" in obj and is_tensor_dict(_inner(obj)) and _vdt_signature(obj["state_dict"])


def _convert_mmcv(obj: Any) -> StateDict:
    sd = strip_prefixes(tensors_only(obj["state_dict"]), ["module."])
    sd = strip_prefixes(sd, ["backbone.", "head."])  # head.fc.* -> fc.* (the classifier of a full mmcls model)
    return drop_keys(sd, ["neck."])


register_source(
    Source(
        name="mmcv",
        description="mmcv/mmcls (VDT): {'meta', 'state_dict'}, keys with or without 'backbone.'",
        detect=_detect_mmcv,
        convert=_convert_mmcv,
        priority=20,
    )
)


# -- Models Genesis -------------------------------------------------------------------------------------------------
def _detect_genesis(obj: Any) -> bool:
    sd = _strip_module(_inner(obj))
    return any(k.startswith("down_tr64.") for k in sd) and any(k.startswith("out_tr.") or k.startswith("down_tr512.") for k in sd)


register_source(
    Source(
        name="genesis",
        description="Models Genesis: {'epoch', 'state_dict' ('module.' prefix), 'optimizer_state_dict'}",
        detect=_detect_genesis,
        convert=lambda obj: _strip_module(obj["state_dict"]),
        priority=30,
    )
)


# -- MedicalNet -----------------------------------------------------------------------------------------------------
# What MedicalNet's train.py saves around the weights; the released files hold 'state_dict' alone.
_MEDICALNET_TOP = {"state_dict", "ecpoch", "batch_id", "optimizer"}


def _detect_medicalnet(obj: Any) -> bool:
    # The ResNet keys alone fit every inflated 3D ResNet (Kinetics, I3D, our resnet3d_*): MedicalNet's signature is
    # its top-level keys plus DataParallel's 'module.' (or its conv_seg head).
    if not isinstance(obj, Mapping) or not set(obj) <= _MEDICALNET_TOP:
        return False
    raw = tensors_only(_inner(obj))
    sd = _strip_module(raw)
    w = sd.get("conv1.weight")
    resnet = w is not None and w.ndim == 5 and any(k.startswith("layer1.0.") for k in sd)
    return resnet and (keys_start_with(raw, "module.", 1.0) or any(k.startswith("conv_seg.") for k in sd))


register_source(
    Source(
        name="medicalnet",
        description="MedicalNet (Med3D): {'state_dict'} with the DataParallel 'module.' prefix",
        detect=_detect_medicalnet,
        convert=lambda obj: _strip_module(obj["state_dict"]),
        priority=40,
    )
)


# -- torchvision video ResNet (r3d_18) ------------------------------------------------------------------------------
def _torchvision_video_key(key: str) -> str:
    """``stem.0`` -> ``conv1``, ``stem.1`` -> ``bn1``, ``layerI.J.convK.0`` -> ``convK``, ``layerI.J.convK.1`` ->
    ``bnK``; ``downsample.0/1`` and ``fc`` keep their names (torchvision's Conv3DSimple blocks are the inflated
    torchvision ones with each conv wrapped in a Sequential with its BN)."""
    parts = key.split(".")
    if parts[0] == "stem" and len(parts) == 3 and parts[1] in ("0", "1"):
        return f"{'conv1' if parts[1] == '0' else 'bn1'}.{parts[2]}"
    if parts[0].startswith("layer") and len(parts) == 5 and parts[2].startswith("conv") and parts[3] in ("0", "1"):
        name = parts[2] if parts[3] == "0" else "bn" + parts[2][4:]
        return ".".join([parts[0], parts[1], name, parts[4]])
    return key


def _torchvision_video_state_dict(obj: Any) -> StateDict:
    return {_torchvision_video_key(k): v for k, v in _plain_state_dict(obj).items()}


def _detect_torchvision_video(obj: Any) -> bool:
    sd = _plain_state_dict(obj)
    stem, block = sd.get("stem.0.weight"), sd.get("layer1.0.conv1.0.weight")
    # r(2+1)d factorises every conv (stem.3, layer1.0.conv1.0.0): not this layout
    return stem is not None and stem.ndim == 5 and block is not None and block.ndim == 5 and "stem.3.weight" not in sd


register_source(
    Source(
        name="torchvision_video",
        description="torchvision video ResNet r3d_18: 'stem.0', 'layer1.0.conv1.0', ... renamed to conv1, bn1, layer1.0.conv1",
        detect=_detect_torchvision_video,
        convert=_torchvision_video_state_dict,
        priority=900,
    )
)


# -- anything else that is a dict of tensors -------------------------------------------------------------------------
def _plain_state_dict(obj: Any) -> StateDict:
    sd = unwrap(obj, _WRAPPERS)
    sd = tensors_only(sd)
    for prefix in ("module.", "model."):
        if keys_start_with(sd, prefix, 1.0):
            sd = strip_prefixes(sd, [prefix])
    return sd


register_source(
    Source(
        name="plain",
        description="a plain state_dict (torch.save(model.state_dict())), optionally nested or 'module.'-prefixed",
        detect=lambda obj: bool(_plain_state_dict(obj)),
        convert=_plain_state_dict,
        priority=1000,
    )
)
