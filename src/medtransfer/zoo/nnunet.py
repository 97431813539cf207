"""nnU-Net v2 networks, built from the plans the way nnU-Net builds them, through ``dynamic_network_architectures``.

Isensee et al., "nnU-Net: a self-configuring method for deep learning-based biomedical image segmentation", Nature
Methods 18:203-211, 2021. An nnU-Net model is fully described by three JSON documents: the plans (``plans.json``),
the configuration name inside them (``3d_fullres``, ``2d``, ...) and ``dataset.json`` (channels, labels). A trainer
checkpoint stores all three in ``init_args``, so ``create_model("nnunet", pretrained="checkpoint_final.pth")``
needs nothing else; without them, pass ``plans=`` (and ``dataset_json=``) as dicts or JSON paths.

Both plans styles are read:

- nnU-Net >= 2.4: ``architecture = {network_class_name, arch_kwargs, _kw_requires_import}``;
- older plans: ``UNet_class_name``, ``UNet_base_num_features``, ``unet_max_num_features``, ``n_conv_per_stage_encoder``
  / ``_decoder``, ``conv_kernel_sizes``, ``pool_op_kernel_sizes``, mapped as nnU-Net's own backwards-compatibility
  code maps them (features ``min(base * 2**i, max)``, conv bias on, affine InstanceNorm with eps 1e-5, LeakyReLU).

nnU-Net imports every dotted name in the plans (``pydoc.locate``); here they are looked up in a fixed table of torch
and dynamic_network_architectures classes, and any other name is refused, so a plans file never imports code.
"""

from __future__ import annotations

import json
import logging
import math
import os
from copy import deepcopy
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import MedTransferError
from .heads import ClassificationHead
from .pretrained import PretrainedCfg
from .registry import ZooModel, register_model

log = logging.getLogger(__name__)

# Without plans: the PlainConvUNet nnU-Net plans for a 3d_fullres configuration with a 128^3-class patch (six stages,
# 32..320 features, 3^3 kernels, five stride-2 poolings), the topology most published 3d_fullres models have.
DEFAULT_ARCHITECTURE = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 6,
        "features_per_stage": [32, 64, 128, 256, 320, 320],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * 6,
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
        "n_conv_per_stage": [2] * 6,
        "n_conv_per_stage_decoder": [2] * 5,
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}

_NETWORKS = ("PlainConvUNet", "ResidualEncoderUNet")
_TORCH_OPS = {
    cls.__name__: cls
    for cls in (
        nn.Conv2d, nn.Conv3d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.BatchNorm2d, nn.BatchNorm3d,
        nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.LeakyReLU, nn.ReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU,
    )
}


class NNUNetPlansError(MedTransferError, ValueError):
    """Plans, configuration or dataset.json that do not describe a network medtransfer can build."""


# ``plans`` inferred from a checkpoint that holds none: the build asks for them rather than guessing a topology
NO_PLANS_IN_FILE = object()


def _dna():
    try:
        from dynamic_network_architectures.architectures import unet
        from dynamic_network_architectures.building_blocks import residual

        if not hasattr(unet, "ResidualEncoderUNet"):  # 0.4 keeps it in residual_unet; 0.4.1+ moved it to unet
            from dynamic_network_architectures.architectures.residual_unet import ResidualEncoderUNet

            unet.ResidualEncoderUNet = ResidualEncoderUNet
    except ImportError:  # pragma: no cover - a declared dependency
        raise MedTransferError(
            "the nnunet models need the package dynamic_network_architectures: "
            "pip install dynamic_network_architectures"
        ) from None
    return unet, residual


def _locate(dotted: str | None, what: str):
    """The class a plans entry names, from the fixed table; never an import of the name itself."""
    if dotted is None:
        return None
    if not isinstance(dotted, str):
        raise NNUNetPlansError(f"plans: {what} must be a class name, got {dotted!r}")
    module, _, name = dotted.rpartition(".")
    if not module or module.split(".")[0] in ("torch", "dynamic_network_architectures"):
        if name in _TORCH_OPS:
            return _TORCH_OPS[name]
        _, residual = _dna()
        if name in ("BasicBlockD", "BottleneckD"):
            return getattr(residual, name)
    raise NNUNetPlansError(
        f"plans: {what} '{dotted}' is not one of the torch / dynamic_network_architectures classes medtransfer "
        f"builds ({', '.join(sorted(_TORCH_OPS))}, BasicBlockD, BottleneckD); a custom class cannot be loaded "
        "without running its code"
    )


# ------------------------------------------------------------------------------------------------ plans documents


def read_json_arg(value: Any, what: str) -> dict | None:
    """``plans=`` / ``dataset_json=``: a dict, or the path of a JSON file."""
    if value is None or isinstance(value, Mapping):
        return dict(value) if value is not None else None
    if isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        if not path.is_file():
            raise NNUNetPlansError(f"{path}: no such {what} file (pass the {what} of the nnU-Net model, or a dict)")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise NNUNetPlansError(f"{path}: not a readable JSON {what} ({exc})") from None
        if not isinstance(data, dict):
            raise NNUNetPlansError(f"{path}: a {what} file holds a JSON object, this one a {type(data).__name__}")
        return data
    raise NNUNetPlansError(f"{what} must be a dict or a JSON file path, got {type(value).__name__}")


def resolve_configuration(plans: Mapping, name: str) -> dict:
    """The configuration ``name`` with its ``inherits_from`` chain applied (the child's keys win)."""
    configs = plans.get("configurations")
    if not isinstance(configs, Mapping) or not configs:
        raise NNUNetPlansError("plans: no 'configurations' in them; is this an nnU-Net v2 plans.json?")
    chain: list[str] = []
    while True:
        if name not in configs:
            known = ", ".join(configs)
            where = f" (inherited by {chain[-1]})" if chain else ""
            raise NNUNetPlansError(f"plans: no configuration '{name}'{where}; the plans have: {known}")
        if name in chain:
            raise NNUNetPlansError(f"plans: configurations inherit in a circle: {' -> '.join(chain + [name])}")
        chain.append(name)
        parent = configs[name].get("inherits_from")
        if parent is None:
            break
        name = parent
    merged: dict = {}
    for link in reversed(chain):
        merged.update(deepcopy(configs[link]))
    return merged


def architecture(config: Mapping) -> dict:
    """``{network_class_name, arch_kwargs, _kw_requires_import}`` of a configuration, in either plans style."""
    if "architecture" in config:
        arch = config["architecture"]
        if not isinstance(arch, Mapping) or not isinstance(arch.get("arch_kwargs"), Mapping):
            raise NNUNetPlansError("plans: 'architecture' must hold 'network_class_name' and 'arch_kwargs'")
        return deepcopy(dict(arch))
    try:
        unet_class = config["UNet_class_name"]
        blocks = config["n_conv_per_stage_encoder"]
        dim = len(config["patch_size"])
        base, top = config["UNet_base_num_features"], config["unet_max_num_features"]
        kwargs = {
            "n_stages": len(blocks),
            "features_per_stage": [min(base * 2**i, top) for i in range(len(blocks))],
            "conv_op": f"torch.nn.Conv{dim}d",
            "kernel_sizes": deepcopy(config["conv_kernel_sizes"]),
            "strides": deepcopy(config["pool_op_kernel_sizes"]),
            ("n_conv_per_stage" if unet_class == "PlainConvUNet" else "n_blocks_per_stage"): list(blocks),
            "n_conv_per_stage_decoder": list(config["n_conv_per_stage_decoder"]),
            "conv_bias": True,
            "norm_op": f"torch.nn.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        }
    except (KeyError, TypeError) as exc:
        raise NNUNetPlansError(
            f"plans: the configuration has neither 'architecture' (nnU-Net >= 2.4) nor the older "
            f"UNet_class_name/n_conv_per_stage_encoder/... keys (missing {exc})"
        ) from None
    return {
        "network_class_name": str(unet_class),
        "arch_kwargs": kwargs,
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def segmentation_heads(dataset_json: Mapping) -> int:
    """Output channels of the network: the labels including background, or the foreground regions when the
    labels are regions (region-based training), as nnU-Net's LabelManager counts them; ``ignore`` is not one."""
    labels = dataset_json.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise NNUNetPlansError("dataset_json: no 'labels' in it (nnU-Net v2 dataset.json: {'background': 0, ...})")
    values = [v for k, v in labels.items() if k != "ignore"]
    if any(isinstance(v, (list, tuple)) and len(v) > 1 for v in values):
        as_sets = [set(v) if isinstance(v, (list, tuple)) else {v} for v in values]
        return sum(1 for s in as_sets if s != {0})
    flat = {int(v[0]) if isinstance(v, (list, tuple)) else int(v) for v in values}
    return len(flat)


def input_channels(dataset_json: Mapping, config: Mapping) -> int:
    """Image channels, plus one per foreground label for a cascade's second stage (it sees the first's output)."""
    channels = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not isinstance(channels, Mapping) or not channels:
        raise NNUNetPlansError("dataset_json: no 'channel_names' (or 'modality') in it")
    n = len(channels)
    if config.get("previous_stage") is not None:
        n += segmentation_heads(dataset_json) - 1
    return n


# ------------------------------------------------------------------------------------------------ network


def build_network(arch: Mapping, in_channels: int, num_classes: int) -> nn.Module:
    """The dynamic_network_architectures network ``arch`` describes, deep supervision off."""
    unet, _ = _dna()
    cls_name = str(arch.get("network_class_name", "")).rpartition(".")[2]
    if cls_name not in _NETWORKS:
        raise NNUNetPlansError(
            f"plans: network class '{arch.get('network_class_name')}' is not one medtransfer builds "
            f"({', '.join(_NETWORKS)}); a custom architecture needs its own code"
        )
    kwargs = deepcopy(dict(arch["arch_kwargs"]))
    for key in set(arch.get("_kw_requires_import", ())) | ({"block"} & set(kwargs)):
        if key in kwargs:
            kwargs[key] = _locate(kwargs[key], key)
    kwargs["deep_supervision"] = False
    try:
        return getattr(unet, cls_name)(input_channels=in_channels, num_classes=num_classes, **kwargs)
    except (TypeError, AssertionError, ValueError, IndexError) as exc:
        raise NNUNetPlansError(f"plans: {cls_name} cannot be built from these arch_kwargs: {exc}") from None


class NNUNet(ZooModel):
    """An nnU-Net network (encoder and decoder under their own names, so an nnU-Net ``network_weights`` loads key
    for key), deep supervision off: segmentation returns the full-resolution logits only."""

    encoder_prefixes = ("encoder.",)

    def __init__(self, net: nn.Module, task: str, num_classes: int):
        super().__init__()
        self.task = task
        self.spatial_dims = 3 if net.encoder.conv_op is nn.Conv3d else 2
        self.encoder = net.encoder
        strides = net.encoder.strides  # per stage, one entry per axis
        # spatial sizes must be multiples of the total stride per axis, as nnU-Net's patch sizes are
        # (train.finetune.model_divisor reads this)
        self.size_divisor = tuple(math.prod(s[d] for s in strides) for d in range(self.spatial_dims))
        self.network_class = type(net).__name__
        if task == "segmentation":
            self.decoder = net.decoder
        elif task == "classification":
            self.head = ClassificationHead(net.encoder.output_channels[-1], num_classes)
        in_proj = tuple(getattr(net, "keys_to_in_proj", ()))
        if in_proj:
            self.first_conv_keys = tuple(k for k in self.state_dict() if k.endswith(".weight") and k[:-7] in in_proj)
        else:  # dynamic_network_architectures 0.4 has no keys_to_in_proj: every name of the first convolution's weight
            first = next(m for m in self.encoder.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
            self.first_conv_keys = tuple(k for k, v in self.state_dict(keep_vars=True).items() if v is first.weight and k.startswith("encoder."))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task == "segmentation":
            return self.decoder(self.encoder(x))
        if self.task == "classification":
            return self.head(self.forward_features(x))
        return self.forward_features(x)


# ------------------------------------------------------------------------------------------------ what a file says


def _fmt(values) -> str:
    return "x".join(f"{float(v):g}" for v in values)


def input_contract(plans: Mapping, config: Mapping, dataset_json: Mapping | None) -> tuple[dict, list[str]]:
    """(PretrainedCfg fields, report lines) of the input the plans' preprocessing produces."""
    spacing = tuple(float(s) for s in config.get("spacing") or ()) or None
    patch = tuple(int(s) for s in config.get("patch_size") or ()) or None
    schemes = list(config.get("normalization_schemes") or [])
    masks = list(config.get("use_mask_for_norm") or [False] * len(schemes))
    props = plans.get("foreground_intensity_properties_per_channel") or \
        plans.get("foreground_intensity_properties_by_modality") or {}
    names = (dataset_json or {}).get("channel_names", (dataset_json or {}).get("modality", {})) or {}
    lines, words, presets = [], [], []
    for i, scheme in enumerate(schemes):
        label = f"channel {i} ({names.get(str(i), '?')})"
        p = props.get(str(i), {}) if isinstance(props, Mapping) else {}
        if scheme == "CTNormalization" and {"mean", "std", "percentile_00_5", "percentile_99_5"} <= set(p):
            lo, hi = float(p["percentile_00_5"]), float(p["percentile_99_5"])
            mean, std = float(p["mean"]), max(float(p["std"]), 1e-8)
            out = ((lo - mean) / std, (hi - mean) / std)
            words.append(
                f"{label}: CTNormalization, clip to the foreground's 0.5 and 99.5 percentiles ({lo:g}, {hi:g}), then "
                f"(x - {mean:g}) / {std:g}; no medtransfer preset is this, CTWindow(lo={lo:g}, hi={hi:g}, "
                f"out=({out[0]:.6g}, {out[1]:.6g})) is the same linear map"
            )
            presets.append(None)
        elif scheme == "ZScoreNormalization":
            masked = bool(masks[i]) if i < len(masks) else False
            preset = "mri_zscore" if masked else "zscore"
            words.append(
                f"{label}: ZScoreNormalization per image{' inside the non-zero mask' if masked else ''}; "
                f"nearest medtransfer preset '{preset}' (nnU-Net divides by max(std, 1e-8), "
                f"{'and its mask is the hole-filled non-zero region' if masked else 'zscore by std + 1e-5'})"
            )
            presets.append(preset)
        else:
            words.append(f"{label}: {scheme}; no medtransfer preset reproduces it")
            presets.append(None)
    preset = presets[0] if presets and len(set(presets)) == 1 else None
    modality = ", ".join(str(names.get(str(i), "?")) for i in range(len(schemes))) or "unknown"
    if spacing or patch:
        lines.append(
            f"input contract from the plans: spacing {_fmt(spacing) if spacing else '?'} mm, patch "
            f"{'x'.join(map(str, patch)) if patch else '?'} (array order after nnU-Net's transpose_forward "
            f"{plans.get('transpose_forward', [0, 1, 2])}; nnU-Net does not reorient images)"
        )
    lines += words
    fields = {
        "modality": modality,
        "in_channels": len(schemes) or 1,
        "intensity": "; ".join(words),
        "preset": preset,
        "spacing": spacing,
        "patch_size": patch,
    }
    return fields, lines


def file_metadata(info: Mapping[str, Any]) -> dict[str, Any]:
    """What ``zoo.builder`` reads from a file besides tensors: input channels and the implied ``PretrainedCfg``.
    Empty when the file holds no usable plans (the build then asks for them)."""
    try:
        plans, name, ds = info.get("plans"), info.get("configuration"), info.get("dataset_json")
        if not isinstance(plans, Mapping) or not isinstance(name, str):
            return {}
        config = resolve_configuration(plans, name)
        fields, _ = input_contract(plans, config, ds if isinstance(ds, Mapping) else None)
    except (MedTransferError, KeyError, TypeError, ValueError, AttributeError):
        return {}
    meta: dict[str, Any] = {}
    if isinstance(ds, Mapping):
        try:
            meta["in_channels"] = input_channels(ds, config)
            fields["in_channels"] = meta["in_channels"]
        except MedTransferError:
            pass
    trainer, fold = info.get("trainer_name") or "nnUNetTrainer", info.get("fold")
    meta["pretrained_cfg"] = PretrainedCfg(
        model="nnunet",
        tag=f"{plans.get('dataset_name', 'dataset')}.{name}.fold{fold}",
        file_name="",
        url="",
        source="nnunet",
        pretraining=f"{trainer} on {plans.get('dataset_name', '?')} ({plans.get('plans_name', 'plans')}, {name}, "
        f"fold {fold}, {info.get('current_epoch', '?')} epochs)",
        notes="read from the checkpoint's init_args; not a published medtransfer entry",
        **fields,
    ).to_dict()
    return meta


class _Document(dict):
    """A plans / dataset.json dict that prints as one short line in reports (``zoo inspect`` lists inferred kwargs)."""

    def __init__(self, data: Mapping, label: str):
        super().__init__(data)
        self.label = label

    def __str__(self) -> str:
        return self.label

    def __deepcopy__(self, memo):
        return _Document(deepcopy(dict(self), memo), self.label)


def _infer_kwargs(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    info = getattr(state_dict, "nnunet", None)
    if not isinstance(info, Mapping):
        return {}
    plans, name, ds = info.get("plans"), info.get("configuration"), info.get("dataset_json")
    out: dict[str, Any] = {}
    if isinstance(plans, Mapping):
        out["plans"] = _Document(plans, f"<{plans.get('plans_name', 'plans')} of {plans.get('dataset_name', '?')}>")
    if isinstance(name, str):
        out["configuration"] = name
    if isinstance(ds, Mapping):
        out["dataset_json"] = _Document(ds, f"<dataset.json, {len(ds.get('labels') or {})} labels>")
    notes = [
        f"nnU-Net v2 checkpoint: trainer {info.get('trainer_name') or '?'}, configuration {name or '?'}, fold "
        f"{info.get('fold', '?')}, {info.get('current_epoch', '?')} epochs, plans "
        f"{(plans or {}).get('plans_name', '?')} of {(plans or {}).get('dataset_name', '?')}"
    ]
    if not isinstance(plans, Mapping):
        out["plans"] = NO_PLANS_IN_FILE
    else:
        try:
            config = resolve_configuration(plans, name) if isinstance(name, str) else None
            if config is not None:
                out["head_classes"] = {"segmentation": segmentation_heads(ds)} if isinstance(ds, Mapping) else {}
                notes += input_contract(plans, config, ds if isinstance(ds, Mapping) else None)[1]
        except MedTransferError:
            pass  # the build reports it
    notes.append(
        "model.pretrained_cfg holds this contract; fine-tuning does not apply it by itself (set the preset, "
        "spacing and patch size of the run); deep supervision is off (full-resolution logits only)"
    )
    out["notes"] = notes
    return out


# ------------------------------------------------------------------------------------------------ registry

_TOTALSEG_ORGANS = PretrainedCfg(
    model="nnunet",
    tag="totalseg_v2_organs",
    file_name="Dataset291_TotalSegmentator_part1_organs_1559subj/nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres/"
    "fold_0/checkpoint_final.pth",
    url="https://github.com/wasserth/TotalSegmentator/releases/download/v2.0.0-weights/"
    "Dataset291_TotalSegmentator_part1_organs_1559subj.zip",
    source="nnunet",
    modality="CT",
    in_channels=1,
    intensity="nnU-Net CTNormalization with the dataset's foreground percentiles, read from the checkpoint's plans",
    spacing=(1.5, 1.5, 1.5),
    pretraining="TotalSegmentator v2 'total' task, part 1 (organs): nnU-Net 3d_fullres, fold 0, 1559 CT subjects",
    license="Apache-2.0 (TotalSegmentator's open 'total' task weights)",
    citation="Wasserthal et al., TotalSegmentator: Robust Segmentation of 104 Anatomic Structures in CT Images, "
    "Radiology: Artificial Intelligence 5(5):e230024, 2023; Isensee et al., nnU-Net, Nature Methods 18:203-211, 2021",
    notes="the release file is a zip of an nnU-Net results folder; unzip it into the weights cache (the folder of "
    "file_name is its content) or pass pretrained='.../fold_0/checkpoint_final.pth'; plans and labels come from the "
    "checkpoint's init_args",
)


@register_model(
    "nnunet",
    family="nnunet",
    description="nnU-Net v2 network (PlainConvUNet / ResidualEncoderUNet) built from a checkpoint's or a "
    "plans.json's configuration; without plans the default 3d_fullres PlainConvUNet",
    pretrained=(_TOTALSEG_ORGANS,),
    infer_kwargs=_infer_kwargs,
    example_size=(64, 64, 64),  # the default topology pools 5 times; InstanceNorm needs >1 voxel at the bottom
    options=("plans", "configuration", "dataset_json"),
)
def nnunet(
    *,
    task: str = "segmentation",
    num_classes: int = 2,
    in_channels: int = 1,
    plans: Any = None,
    configuration: str | None = None,
    dataset_json: Any = None,
) -> NNUNet:
    """``plans``/``dataset_json``: dicts or JSON paths; ``configuration``: a name in the plans (default
    ``3d_fullres``). A checkpoint passed as ``pretrained=`` supplies all three unless given."""
    if plans is NO_PLANS_IN_FILE:
        raise NNUNetPlansError(
            "this nnU-Net checkpoint holds no plans (no init_args): pass plans='plans.json', "
            "dataset_json='dataset.json' and configuration= (the files of its nnU-Net results folder)"
        )
    plans_doc = read_json_arg(plans, "plans")
    ds = read_json_arg(dataset_json, "dataset.json")
    if plans_doc is None:
        if configuration is not None or ds is not None:
            raise NNUNetPlansError(
                "nnunet: configuration/dataset_json need the plans too: pass plans='plans.json' (the file next to "
                "the checkpoint's fold_N folder)"
            )
        log.info("nnunet built without plans: nnU-Net's default 3d_fullres PlainConvUNet topology")
        arch = deepcopy(DEFAULT_ARCHITECTURE)
    else:
        arch = architecture(resolve_configuration(plans_doc, configuration or "3d_fullres"))
        if ds is not None and task == "segmentation" and segmentation_heads(ds) != num_classes:
            log.warning("nnunet: a new %d-class segmentation head; the dataset.json has %d output channels",
                        num_classes, segmentation_heads(ds))
    net = build_network(arch, in_channels, num_classes)
    model = NNUNet(net, task, num_classes)
    model.nnunet_architecture = arch
    return model
