"""The input contract of a fine-tuning run: which weights it loads, and the intensity preset, spacing and patch
size it prepares the data with, each with where it came from (the user, a recipe, the loaded weights' published
contract, the data's modality, a default). Read first, before the data: :func:`check_weights` fails on a file that
fits no model before anything is written. Used by :mod:`.finetune`, which re-exports these names.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..errors import MedTransferError
from .config import FinetuneConfig

log = logging.getLogger("medtransfer.train.finetune")  # the run's console lines keep their logger name

DEFAULT_PATCH = {3: (64, 64, 64), 2: (224, 224)}  # 224^2: the ImageNet input of resnet50_2d's weights

# PretrainedCfg.source (checkpoint format) -> intensity preset of data.preprocess.PRESETS, read from each
# PretrainedCfg.intensity text: genesis "HU clipped to [-1000, 1000], scaled to [0, 1]"; MedicalNet "z-score over
# voxels > 0"; PyMIC (MIS-FM fmunet / pctnet) "per-volume z-score (x - mean) / (std + 1e-5)". mmcv (VDT) and the 2D
# ImageNet/CXR normalisations have no preset: the run falls back to the modality default and says so.
CONTRACT_PRESETS: dict[str, str] = {
    "genesis": "genesis_ct",
    "medicalnet": "medicalnet_mri",
    "pymic": "zscore",
}

def weights_contract(model_name: str):
    """The ``PretrainedCfg`` of the model's published weights (the tag named in ``model_name``, else the default);
    it applies to a run only when those weights are loaded (``model.pretrained: true``), see :func:`initial_weights`."""
    from ..zoo.builder import split_name
    from ..zoo.registry import get_entry

    base, tag = split_name(model_name)
    return get_entry(base).pretrained_cfg(tag)


def _pretrained_value(cfg: FinetuneConfig) -> bool | str:
    """``model.pretrained`` as ``create_model`` takes it: True, False or a file path (YAML 'true'/'false' strings
    from the command line read as booleans)."""
    value = cfg.model.pretrained
    if isinstance(value, str) and value.strip().lower() in ("true", "false", ""):
        return value.strip().lower() == "true"
    return value or False


def initial_weights(cfg: FinetuneConfig):
    """(``PretrainedCfg`` or None, label): the input contract of the weights the run loads, read as
    ``create_model`` reads it, and words naming them for the run files.

    ``pretrained: true``: the model's published weights. A file: the ``PretrainedCfg`` stored in it (``medtransfer
    pretrain`` output); else, when the file has the name of one of the model's published files (``resnet_10.pth``
    for ``medicalnet_resnet10``), that file's published contract, said so; else none (a foreign file carries no
    contract). From scratch: none, whatever the published weights expect."""
    from ..zoo.builder import file_pretrained_cfg

    pretrained = _pretrained_value(cfg)
    if pretrained is False:
        return None, "no weights (a run from scratch)"
    if pretrained is True:
        pcfg = weights_contract(cfg.model.name)
        if pcfg is None:
            return None, f"{cfg.model.name} has no published weights"
        return pcfg, f"weights {pcfg.full_name} ({pcfg.file_name})"
    pcfg = file_pretrained_cfg(pretrained)
    if pcfg is not None:
        return pcfg, f"weights {pcfg.full_name} (the contract stored in {pretrained})"
    published = _published_by_name(cfg.model.name, Path(pretrained).name)
    if published is not None:  # a downloaded copy of a published file, passed by path
        return published, (f"weights {published.full_name} (the file name {Path(pretrained).name} is that of the "
                           "published file, so its published contract applies)")
    return None, f"file {pretrained} (it carries no input contract)"


def _published_by_name(model_name: str, file_name: str):
    """The published ``PretrainedCfg`` of ``model_name`` whose file is called ``file_name``, if one is."""
    from ..zoo.builder import split_name
    from ..zoo.registry import get_entry

    return next((p for p in get_entry(split_name(model_name)[0]).pretrained if p.file_name == file_name), None)


def check_weights(cfg: FinetuneConfig) -> None:
    """Read the initial weights and check that they fit ``model.name``, before the data is read and anything is
    written: a missing file or one that fits no model fails here, naming the file, not after the cache is filled.

    The model is built on the meta device (no memory, no initialisation) by ``create_model`` itself, so the check
    is the load's own; the real model is built later with the dataset's class count. ``model.download`` fetches a
    published file missing from the weights cache here, once (under torchrun: run ``medtransfer zoo fetch`` first)."""
    import warnings

    pretrained = _pretrained_value(cfg)
    if cfg.model.download and pretrained is not True:
        raise MedTransferError(f"model.download: true fetches the published weights of model.pretrained: true; "
                               f"model.pretrained is {pretrained!r}")
    if pretrained is False:
        return
    from ..zoo.builder import create_model

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
        detection = cfg.model.task == "detection"  # the detector's encoder is the model built for 'features'
        create_model(cfg.model.name, task="features" if detection else cfg.model.task,
                     num_classes=None if detection else cfg.model.num_classes,
                     in_channels=cfg.model.in_channels, pretrained=pretrained,
                     adapt_stem=cfg.model.adapt_stem, skip=cfg.model.skip, download=cfg.model.download,
                     **cfg.model.arch)


def resolve_contract(cfg: FinetuneConfig, spatial_dims: int, modality: Any = None) -> dict[str, Any]:
    """Preset, spacing and patch size of the run, each with where it came from (the rule of docs/training.md,
    "Input contract"): the config's value wins; else the loaded weights' contract (:func:`initial_weights`), the
    preset only when their modality matches the data's; else the defaults (preset by modality,
    :func:`medtransfer.data.modality.choose_preset`; native spacing; :data:`DEFAULT_PATCH`).

    ``modality``: a :class:`~medtransfer.data.modality.Modality` (``dataset_modality``), a name (``"CT"``, ``"MRI"``,
    ``"T2"``...), or None (unknown). A preset set aside or overridden against the weights' is recorded in
    ``mismatches``."""
    from ..data.modality import Modality, channel_modality, choose_preset

    if not isinstance(modality, Modality):
        modality = Modality(channel_modality(modality), f"given to resolve_contract as {modality!r}") if modality \
            else Modality(None, "not given to resolve_contract")
    pcfg, label = initial_weights(cfg)
    contract_preset = (pcfg.preset or CONTRACT_PRESETS.get(pcfg.source)) if pcfg else None
    choice = choose_preset(cfg.data.preset, modality, spatial_dims, weights_preset=contract_preset,
                           weights_modality=pcfg.modality if pcfg else "", weights_label=label)
    sources = {"preset": choice.source}
    if pcfg is not None and contract_preset is None and cfg.data.preset is None:
        sources["preset"] += f"; the {label} name no intensity preset: {pcfg.intensity or 'none stated'}"
    if cfg.data.spacing is not None:
        spacing, sources["spacing"] = cfg.data.spacing, "user config (data.spacing)"
    elif pcfg is not None and pcfg.spacing:
        spacing, sources["spacing"] = pcfg.spacing, label
    else:
        spacing, sources["spacing"] = None, "default (no resampling: each case keeps its spacing)"
    patch = cfg.data.patch_size
    if patch is not None:
        if len(patch) != spatial_dims:
            raise MedTransferError(f"data.patch_size {list(patch)} has {len(patch)} values but the dataset is "
                                   f"{spatial_dims}D; give {spatial_dims} values")
        sources["patch_size"] = _user_or_recipe(cfg, "patch_size")
    elif pcfg is not None and pcfg.patch_size and len(pcfg.patch_size) == spatial_dims:
        patch, sources["patch_size"] = pcfg.patch_size, label
    else:
        patch, sources["patch_size"] = DEFAULT_PATCH[spatial_dims], f"default for {spatial_dims}D (DEFAULT_PATCH)"
    return {
        "preset": choice.preset,
        "spacing": list(spacing) if spacing is not None else None,
        "patch_size": [int(p) for p in patch],
        "sources": sources,
        "data_modality": modality.value,
        "data_modality_source": modality.source,
        "initial_weights": label,
        "weights_modality": pcfg.modality if pcfg else None,
        "weights": pcfg.to_dict() if pcfg else None,
        "contract_preset": contract_preset,
        "mismatches": [choice.mismatch] if choice.mismatch else [],
        "warnings": [choice.warning] if choice.warning else [],
    }


def _user_or_recipe(cfg: FinetuneConfig, key: str) -> str:
    """Where a set ``data.<key>`` came from: the recipe when it holds that value, else the user's config."""
    from .recipes import recipe

    given = recipe(cfg.recipe, cfg.model.task).get("data", {}).get(key) if cfg.recipe else None
    if given is not None and list(given) == list(getattr(cfg.data, key)):
        return f"recipe {cfg.recipe} (data.{key})"
    return f"user config (data.{key})"


def announce_contract(contract: dict[str, Any]) -> None:
    """The console line before training: preset, spacing and patch with their sources; mismatches loudly."""
    src = contract["sources"]
    spacing = "native" if contract["spacing"] is None else "x".join(f"{s:g}" for s in contract["spacing"]) + " mm"
    log.warning("input contract: preset %r (%s); spacing %s (%s); patch %s (%s); data modality %s (%s)",
                contract["preset"], src["preset"], spacing, src["spacing"],
                "x".join(map(str, contract["patch_size"])), src["patch_size"],
                contract["data_modality"] or "unknown", contract["data_modality_source"])
    for msg in contract["mismatches"]:
        log.warning("INPUT CONTRACT MISMATCH: %s", msg)
    for msg in contract["warnings"]:
        log.warning("input contract: %s", msg)
