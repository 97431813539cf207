"""2D checkpoint sources: the ResNet-50 release formats benchmarked by BenchmarkTransferLearning.

Each converter turns one release format into torchvision ResNet-50 keys (the canonical space of ``resnet50_2d``)
and drops what only pretraining used: MoCo/PCL's key encoder, queue and projection MLP; SwAV/DeepCluster-v2/
SeLa-v2's projection head and prototypes; PyContrast's heads and jigsaw branch; the chest X-ray and iNat classifier
heads. BenchmarkTransferLearning's fine-tuned segmentation_models_pytorch U-Nets map whole, decoder included.

The rules follow BenchmarkTransferLearning's ``download_and_prepare_models.py`` (Hosseinzadeh Taher et al., DART
2021) with its quirks fixed: prefixes are removed only where a key *starts* with them and wrappers are stripped in
the right order, so a MoCo file can no longer load nothing silently.

Detection never claims a 3D file: every signature requires a 4-D ``conv1.weight`` (3D ResNets have 5-D kernels).
Specific formats come first (lower ``priority``); the plain torchvision dict is the catch-all.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from .safe_pickle import StandIn
from .sources import (
    Source,
    StateDict,
    drop_keys,
    register_source,
    strip_prefixes,
    tensors_only,
    unwrap,
)


def has_resnet2d_body(sd: Any, prefix: str = "") -> bool:
    """True when ``sd`` holds a 2D torchvision-style ResNet under ``prefix`` (4-D ``conv1.weight`` and ``layer1``)."""
    if not isinstance(sd, Mapping):
        return False
    weight = sd.get(prefix + "conv1.weight")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 4:
        return False
    stage = prefix + "layer1."
    return any(isinstance(k, str) and k.startswith(stage) for k in sd)


def _body_prefix(sd: Any, prefixes: Iterable[str]) -> str | None:
    """The first of ``prefixes`` under which ``sd`` holds a 2D ResNet, else None."""
    for prefix in prefixes:
        if has_resnet2d_body(sd, prefix):
            return prefix
    return None


def _keep_under(sd: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """Keys that start with ``prefix``, with it removed; everything else (other networks in the file) dropped."""
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------------------------------------------
# MoCo v1/v2 and PCL v1/v2: {"state_dict": {"module.encoder_q.*", "module.encoder_k.*", "module.queue", ...}}

_MOCO_PREFIXES = ("module.encoder_q.", "encoder_q.")


def _detect_moco(obj: Any) -> bool:
    return _body_prefix(unwrap(obj, ("state_dict",)), _MOCO_PREFIXES) is not None


def _convert_moco(obj: Any) -> StateDict:
    sd = tensors_only(unwrap(obj, ("state_dict",)))
    prefix = _body_prefix(sd, _MOCO_PREFIXES)
    if prefix is None:
        raise ValueError("no 'module.encoder_q.' ResNet found under 'state_dict'")
    # Only the query encoder is kept: encoder_k and the queue fall outside the prefix; fc is v1's projection or
    # v2's MLP (fc.0/fc.2), not a classifier.
    return drop_keys(_keep_under(sd, prefix), ("fc.",))


# ----------------------------------------------------------------------------------------------------------------
# SwAV / DeepCluster-v2 / SeLa-v2: a raw state_dict (sometimes under "state_dict") with "module." keys

_SWAV_HEADS = ("projection_head.", "prototypes.")


def _detect_swav(obj: Any) -> bool:
    sd = unwrap(obj, ("state_dict",))
    prefix = _body_prefix(sd, ("module.", ""))
    if prefix is None:
        return False
    heads = tuple(prefix + head.rstrip(".") for head in _SWAV_HEADS)
    return any(isinstance(k, str) and k.startswith(heads) for k in sd)


def _convert_swav(obj: Any) -> StateDict:
    sd = strip_prefixes(tensors_only(unwrap(obj, ("state_dict",))), ("module.",))
    return drop_keys(sd, _SWAV_HEADS)


# ----------------------------------------------------------------------------------------------------------------
# PyContrast (InsDis, PIRL, InfoMin): {"model": {"module.encoder.*", "module.head.*", "module.head_jig.*"}, ...}

_PYCONTRAST_PREFIXES = ("module.encoder.", "encoder.")


def _detect_pycontrast(obj: Any) -> bool:
    return isinstance(obj, Mapping) and _body_prefix(obj.get("model"), _PYCONTRAST_PREFIXES) is not None


def _convert_pycontrast(obj: Any) -> StateDict:
    sd = tensors_only(obj["model"])
    prefix = _body_prefix(sd, _PYCONTRAST_PREFIXES)
    if prefix is None:
        raise ValueError("no 'module.encoder.' ResNet found under 'model'")
    encoder = _keep_under(sd, prefix)  # module.head*, module.head_jig* and the memory bank are outside it
    return {k: v for k, v in drop_keys(encoder, ("fc.",)).items() if "jigsaw" not in k}


# ----------------------------------------------------------------------------------------------------------------
# Supervised classifiers saved by a training loop: BenchmarkTransferLearning's ChestX-ray14 / CheXpert in-domain and
# ImageNet-adapted models ({"epoch", "lossMIN", "state_dict", ...}, CheXpert ones with "module."), and the NeWT
# iNat2021 models ({"epoch", "arch", "state_dict", "best_acc1", ...}).

_CLASSIFIER_HEADS = ("fc.", "classifier.")


def _detect_chestxray(obj: Any) -> bool:
    return isinstance(obj, Mapping) and _body_prefix(obj.get("state_dict"), ("", "module.")) is not None


def _convert_chestxray(obj: Any) -> StateDict:
    sd = strip_prefixes(tensors_only(obj["state_dict"]), ("module.",))
    # The heads (fc.0 = Linear + Sigmoid for 14 findings, iNat's 10,000-way fc) belong to the pretraining task.
    return drop_keys(sd, _CLASSIFIER_HEADS)


# ----------------------------------------------------------------------------------------------------------------
# segmentation_models_pytorch U-Net with a ResNet-50 encoder, as BenchmarkTransferLearning's main_segmentation.py
# fine-tunes and saves it: encoder.* (torchvision names), decoder.blocks.* (the same names as resnet50_2d's
# decoder: center and attention are parameter-free Identities), segmentation_head.0.* (our decoder.head).


def _smp_dict(obj: Any) -> Any:
    return unwrap(obj, ("state_dict", "model"))


def _detect_smp_unet(obj: Any) -> bool:
    sd = _smp_dict(obj)
    prefix = _body_prefix(sd, ("encoder.", "module.encoder."))
    if prefix is None:
        return False
    outer = prefix[: -len("encoder.")]
    return any(isinstance(k, str) and k.startswith((outer + "decoder.", outer + "segmentation_head.")) for k in sd)


def _convert_smp_unet(obj: Any) -> StateDict:
    sd = strip_prefixes(tensors_only(_smp_dict(obj)), ("module.",))
    out: StateDict = {}
    for key, value in sd.items():
        if key.startswith("encoder."):
            key = key[len("encoder.") :]
            if key.startswith("fc."):  # smp deletes the encoder's fc; a stray one is not the task head
                continue
        elif key.startswith("segmentation_head.0."):
            key = "decoder.head." + key[len("segmentation_head.0.") :]
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------------------
# A plain torchvision ResNet-50 state_dict: BenchmarkTransferLearning's unified files, torchvision's ImageNet file,
# Barlow Twins' resnet50.pth, or a model saved by medtransfer itself. Everything is kept; the loader drops an fc
# whose shape does not fit.


def _torchvision_dict(obj: Any) -> Any:
    if _body_prefix(obj, ("", "module.")) is not None:
        return obj
    return unwrap(obj, ("model", "resnet"))


def _detect_torchvision(obj: Any) -> bool:
    return _body_prefix(_torchvision_dict(obj), ("", "module.")) is not None


def _convert_torchvision(obj: Any) -> StateDict:
    return strip_prefixes(tensors_only(_torchvision_dict(obj)), ("module.",))


# ----------------------------------------------------------------------------------------------------------------
# DeepMind BYOL (deepmind-research byol/): a dill pickle {"experiment_state": _ByolExperimentState(online_params,
# target_params, online_state, target_state, opt_state), "step", "rng"} of haiku parameter trees holding numpy
# arrays, read by medtransfer.weights.safe_pickle.restricted_load.
#
# BenchmarkTransferLearning matches haiku's parameters to torchvision's modules by position: the tree's keys are
# sorted, so the stem ("initial_conv", "initial_batchnorm" and its two EMA states) sorts after the block groups and
# is moved to the front. Here modules are matched by name, which gives the same pairs without depending on the
# order the pickle happens to store them in.

_ENCODER_ROOT = re.compile(r"^res_net\d+/~/(?P<path>.+)$")
_BLOCK_MODULE = re.compile(
    r"^block_group_(?P<group>\d+)/~/block_(?P<block>\d+)/~/"
    r"(?:(?P<kind>conv|batchnorm)_(?P<index>\d+)|shortcut_(?P<shortcut>conv|batchnorm))$"
)
_BYOL_CLASSIFIER = "classifier"


def _as_mapping(obj: Any) -> Mapping[str, Any] | None:
    if isinstance(obj, Mapping):
        return obj
    if isinstance(obj, StandIn):
        return obj.mapping()
    return None


def _field(obj: Any, name: str) -> Any:
    """``obj[name]`` for mappings, ``obj.name`` for records (stand-ins of namedtuples), else None."""
    mapping = _as_mapping(obj)
    if mapping is not None:
        return mapping.get(name)
    return getattr(obj, name, None)


def haiku_to_torchvision(module_name: str) -> tuple[str, str] | None:
    """Map a haiku module path of BYOL's network to (torchvision module, kind), kind in conv/batchnorm/linear.

    ``res_net50/~/block_group_1/~/block_0/~/conv_1`` -> ``("layer2.0.conv2", "conv")``; the projector and
    predictor MLPs map to None (pretraining heads).
    """
    if module_name == _BYOL_CLASSIFIER:
        return "fc", "linear"
    root = _ENCODER_ROOT.match(module_name)
    if root is None:
        return None
    path = root.group("path")
    if path == "initial_conv":
        return "conv1", "conv"
    if path == "initial_batchnorm":
        return "bn1", "batchnorm"
    block = _BLOCK_MODULE.match(path)
    if block is None:
        return None
    prefix = f"layer{int(block.group('group')) + 1}.{int(block.group('block'))}"
    if block.group("shortcut") == "conv":
        return f"{prefix}.downsample.0", "conv"
    if block.group("shortcut") == "batchnorm":
        return f"{prefix}.downsample.1", "batchnorm"
    torch_name = "conv" if block.group("kind") == "conv" else "bn"
    return f"{prefix}.{torch_name}{int(block.group('index')) + 1}", block.group("kind")


def _to_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (np.ndarray, np.generic)):
        return torch.from_numpy(np.array(value, copy=True))
    raise ValueError(f"{what} is a {type(value).__name__}, not an array")


def _byol_trees(obj: Any) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """(online parameters, online state): the network BYOL evaluates, as opposed to the EMA target network."""
    experiment = _field(obj, "experiment_state")
    holder = experiment if experiment is not None else obj
    params = _as_mapping(_field(holder, "online_params"))
    state = _as_mapping(_field(holder, "online_state"))
    if params is None:
        params = _as_mapping(obj)  # a bare haiku parameter tree
        state = None
    if params is None:
        raise ValueError("no haiku parameter tree (experiment_state.online_params) in the file")
    return params, state or {}


def _convert_byol(obj: Any) -> StateDict:
    params, state = _byol_trees(obj)
    out: StateDict = {}
    for module_name, leaves in params.items():
        target = haiku_to_torchvision(module_name)
        leaves = _as_mapping(leaves)
        if target is None or leaves is None:
            continue
        name, kind = target
        if kind == "conv":  # haiku kernels are HWIO, torch's OIHW
            out[f"{name}.weight"] = _to_tensor(leaves["w"], module_name).permute(3, 2, 0, 1).contiguous()
        elif kind == "linear":  # haiku Linear stores (in, out)
            out[f"{name}.weight"] = _to_tensor(leaves["w"], module_name).t().contiguous()
            if "b" in leaves:
                out[f"{name}.bias"] = _to_tensor(leaves["b"], module_name).reshape(-1)
        else:  # haiku BatchNorm keeps (1, 1, 1, C) scale/offset and its statistics in EMA modules
            out[f"{name}.weight"] = _to_tensor(leaves["scale"], module_name).reshape(-1)
            out[f"{name}.bias"] = _to_tensor(leaves["offset"], module_name).reshape(-1)
            mean = _as_mapping(state.get(f"{module_name}/~/mean_ema"))
            var = _as_mapping(state.get(f"{module_name}/~/var_ema"))
            if mean is not None and var is not None:
                out[f"{name}.running_mean"] = _to_tensor(mean["average"], f"{module_name} mean").reshape(-1)
                out[f"{name}.running_var"] = _to_tensor(var["average"], f"{module_name} var").reshape(-1)
                counter = mean.get("counter")
                steps = int(np.asarray(counter).reshape(-1)[0]) if counter is not None else 0
                out[f"{name}.num_batches_tracked"] = torch.tensor(steps, dtype=torch.long)
    if "conv1.weight" not in out:
        raise ValueError("no BYOL ResNet parameters ('res_net50/~/initial_conv', ...) in the haiku tree")
    return out


def _detect_byol(obj: Any) -> bool:
    if _field(obj, "experiment_state") is not None:
        return True
    mapping = _as_mapping(obj)
    return mapping is not None and any(isinstance(k, str) and _ENCODER_ROOT.match(k) for k in mapping)


# ----------------------------------------------------------------------------------------------------------------

SOURCES_2D = (
    Source(
        "byol_haiku",
        "DeepMind BYOL .pkl (haiku parameter tree, read by a restricted unpickler)",
        _detect_byol,
        _convert_byol,
        priority=10,
    ),
    Source(
        "moco",
        "MoCo v1/v2 and PCL v1/v2 (state_dict of module.encoder_q.*, encoder_k, queue)",
        _detect_moco,
        _convert_moco,
        priority=20,
    ),
    Source(
        "pycontrast",
        "PyContrast InsDis / PIRL / InfoMin (model: module.encoder.*, module.head*)",
        _detect_pycontrast,
        _convert_pycontrast,
        priority=20,
    ),
    Source(
        "swav",
        "SwAV / DeepCluster-v2 / SeLa-v2 (module.* with projection_head and prototypes)",
        _detect_swav,
        _convert_swav,
        priority=30,
    ),
    Source(
        "smp_unet",
        "segmentation_models_pytorch U-Net over a ResNet-50 (BenchmarkTransferLearning segmentation checkpoints)",
        _detect_smp_unet,
        _convert_smp_unet,
        priority=35,
    ),
    Source(
        "chestxray",
        "2D ResNet-50 classifier checkpoint (state_dict, optional module.): BenchmarkTransferLearning chest X-ray "
        "in-domain / domain-adapted models, NeWT iNat2021",
        _detect_chestxray,
        _convert_chestxray,
        priority=40,
    ),
    Source(
        "torchvision",
        "plain torchvision ResNet-50 state_dict (BenchmarkTransferLearning unified format, Barlow Twins, ImageNet)",
        _detect_torchvision,
        _convert_torchvision,
        priority=90,
    ),
)

for _source in SOURCES_2D:
    register_source(_source)
