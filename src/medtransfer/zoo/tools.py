"""What the `medtransfer zoo` commands do: list models, inspect a weight file, convert it to the normalised format."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointMismatchError, MedTransferError
from ..weights.adapt import LoadReport, check_fit, check_skip_patterns, parse_adapt_stem, plan_load
from ..provenance import sha256_file, versions
from ..weights.io import save_safetensors
from .builder import create_model, read_converted
from .registry import ModelEntry, get_entry, list_models


@dataclass
class ModelInfo:
    name: str
    family: str
    description: str
    spatial_dims: int
    parameters: int  # the segmentation network as built by create_model(name); p3d63: the classifier
    encoder_parameters: int
    weights: list[str]  # full names name.tag of published weights
    input_contract: str  # short: modality, channels, patch size of the default weights
    pretrained: list[dict[str, Any]]  # every PretrainedCfg in full
    options: list[str]  # architecture options (**arch_kwargs of create_model)


def _count(model: torch.nn.Module, prefixes: tuple[str, ...] | None = None) -> int:
    return sum(
        p.numel() for k, p in model.named_parameters() if prefixes is None or not prefixes or k.startswith(prefixes)
    )


def _survey_task(entry: ModelEntry) -> str:
    # Models are surveyed as segmentation networks; a 2.5D backbone (p3d63) has no segmentation task.
    return "segmentation" if "segmentation" in entry.tasks else entry.tasks[0]


def describe_model(name: str) -> ModelInfo:
    entry = get_entry(name)
    with torch.device("meta"):
        model = create_model(name, task=_survey_task(entry))
    cfg = entry.pretrained_cfg()
    contract = "-"
    if cfg is not None:
        parts = [cfg.modality.split(" (")[0], f"{cfg.in_channels} ch"]
        if cfg.spacing:
            parts.append("x".join(f"{s:g}" for s in cfg.spacing) + " mm")
        if cfg.patch_size:
            parts.append("x".join(str(s) for s in cfg.patch_size))
        contract = ", ".join(p for p in parts if p)
    return ModelInfo(
        name=name,
        family=entry.family,
        description=entry.description,
        spatial_dims=entry.spatial_dims,
        parameters=_count(model),
        encoder_parameters=_count(model, tuple(model.encoder_prefixes)),
        weights=[c.full_name for c in entry.pretrained],
        input_contract=contract,
        pretrained=[c.to_dict() for c in entry.pretrained],
        options=list(entry.arch_options),
    )


def describe_models(pattern: str = "*") -> list[ModelInfo]:
    return [describe_model(n) for n in list_models(pattern)]


@dataclass
class ModelFit:
    model: str
    coverage: float
    ok: bool
    reason: str
    report: LoadReport | None = None
    file_used: float = 0.0  # fraction of the file's tensors that load into the model
    foreign: bool = False  # the file's format is not one the model's own published weights use
    reshaped: int = 0  # axes changed by adaptation (inflation, stem depth, channels) over all adapted tensors


@dataclass
class CheckpointInfo:
    path: Path
    source: str
    tensors: int
    parameters: int
    key_groups: dict[str, int]
    metadata: dict[str, Any]
    fits: list[ModelFit] = field(default_factory=list)
    unknowable: list[str] = field(default_factory=list)  # what the file cannot tell (bare state_dicts)


def _plan_for(
    entry: ModelEntry,
    state_dict: dict[str, torch.Tensor],
    source: str,
    path: Path,
    adapt_stem: Any = None,
    skip: tuple[str, ...] = (),
) -> ModelFit:
    kwargs = entry.infer_kwargs(state_dict) if entry.infer_kwargs else {}
    kwargs.pop("notes", None)
    own_sources = {c.source for c in entry.pretrained} | {"medtransfer", "plain"}
    foreign = len(entry.pretrained) > 0 and source not in own_sources
    task = _survey_task(entry)
    num_classes = kwargs.pop("head_classes", {}).get(task) or entry.default_num_classes
    try:
        with torch.device("meta"):
            model = entry.fn(task=task, num_classes=num_classes, in_channels=entry.default_in_channels, **kwargs)
    except (TypeError, ValueError) as exc:
        return ModelFit(entry.name, 0.0, False, f"cannot build with {kwargs}: {exc}")
    report, _ = plan_load(
        model.state_dict(),
        state_dict,
        encoder_prefixes=tuple(model.encoder_prefixes),
        first_conv_keys=frozenset(model.first_conv_keys),
        source=source,
        model_name=entry.name,
        path=str(path),
        adapt_stem=adapt_stem,
        skip=skip,
    )
    own = model.state_dict()
    reshaped = 0
    for key, _ in report.adapted:
        a, b = tuple(state_dict[key].shape), tuple(own[key].shape)
        reshaped += abs(len(a) - len(b)) + sum(x != y for x, y in zip(a[::-1], b[::-1]))
    try:
        check_fit(report)
    except CheckpointMismatchError:
        return ModelFit(entry.name, report.coverage, False, _why_not(report), report)
    parts = [", ".join(f"{k}={v}" for k, v in kwargs.items())]
    if foreign:
        parts.append(f"a '{source}' file in a {entry.family} network: check strides and input contract")
    note = "; ".join(p for p in parts if p)
    counted = len(report.loaded) + len(report.unexpected) + len(report.mismatched)
    used = len(report.loaded) / counted if counted else 0.0
    return ModelFit(entry.name, report.coverage, True, note, report, used, foreign, reshaped)


def _why_not(report: LoadReport) -> str:
    if report.encoder_loaded == 0:
        return "no encoder tensor matches"
    if report.encoder_mismatched:
        k, a, b = next(m for m in report.mismatched if m[0] in set(report.encoder_mismatched))
        return f"{len(report.encoder_mismatched)} encoder tensors of other shapes (e.g. {k} {list(a)} vs {list(b)})"
    return f"{len(report.encoder_unexpected)} file tensors the model lacks (e.g. {report.encoder_unexpected[0]})"


def inspect_checkpoint(
    path: str | os.PathLike, source: str = "auto", adapt_stem: Any = None, skip: tuple[str, ...] = ()
) -> CheckpointInfo:
    """Detect a file's source, count its tensors, and measure how well it fits every registered model.

    Ranking: models it fits first, then by encoder coverage plus the fraction of the file used, then by how much
    adaptation the fit needs (fewest axes changed first), then own-format models before foreign ones.
    """
    from .builder import BARE_SOURCES

    path = Path(path)
    parse_adapt_stem(adapt_stem)
    state_dict, source_name, metadata = read_converted(path, source)
    skip = tuple(check_skip_patterns(state_dict, skip, str(path)))
    groups: dict[str, int] = {}
    for key in state_dict:
        head = key.split(".")[0]
        groups[head] = groups.get(head, 0) + 1
    info = CheckpointInfo(
        path=path,
        source=source_name,
        tensors=len(state_dict),
        parameters=sum(v.numel() for k, v in state_dict.items() if v.is_floating_point()),
        key_groups=groups,
        metadata=metadata,
    )
    if source_name in BARE_SOURCES:
        info.unknowable = [
            "training architecture: strides, dilations and pooling have no tensors (a strided resnet3d_* and "
            "MedicalNet's dilated medicalnet_resnet* hold the same ones), so the ranking compares names and shapes only",
            "input contract: modality, intensity window and normalisation, spacing, channel order, patch size",
        ]
    info.fits = rank_fits(state_dict, source_name, path, list_models(), adapt_stem, skip)
    return info


def rank_fits(
    state_dict: dict[str, torch.Tensor],
    source: str,
    path: str | os.PathLike,
    names: list[str],
    adapt_stem: Any = None,
    skip: tuple[str, ...] = (),
) -> list[ModelFit]:
    """How well the file fits each of ``names``, best first (the ranking of :func:`inspect_checkpoint`)."""
    fits = [_plan_for(get_entry(n), state_dict, source, Path(path), adapt_stem, skip) for n in names]
    fits.sort(key=lambda f: (not f.ok, -(f.coverage + f.file_used), f.reshaped, f.foreign, f.model))
    return fits


def convert_checkpoint(
    path: str | os.PathLike,
    model_name: str,
    out: str | os.PathLike,
    *,
    task: str = "segmentation",
    num_classes: int | None = None,
    in_channels: int | None = None,
    source: str = "auto",
    min_coverage: float | None = None,
    inflate: str = "i3d",
    adapt_stem: Any = None,
    skip: tuple[str, ...] = (),
    **arch_kwargs: Any,
) -> tuple[Path, LoadReport]:
    """Load ``path`` into ``model_name`` and write the tensors that came from the file as safetensors + metadata.

    Only tensors taken from the checkpoint are written (after adaptation), never the random initialisation of
    the parts it lacks, so the output holds exactly what the report says was loaded.
    """
    path = Path(path)
    out = Path(out)
    if out.suffix != ".safetensors":
        out = out.with_name(out.name + ".safetensors")
    if out.resolve() == path.resolve():
        raise MedTransferError(f"{out}: the output would overwrite the input; choose another -o path")
    model = create_model(
        model_name,
        task=task,
        num_classes=num_classes,
        in_channels=in_channels,
        pretrained=path,
        source=source,
        min_coverage=min_coverage,
        inflate=inflate,
        adapt_stem=adapt_stem,
        skip=skip,
        **arch_kwargs,
    )
    report: LoadReport = model.load_report
    loaded = set(report.loaded)
    state = model.state_dict()
    # keep a BatchNorm's step counter with the statistics it belongs to
    keep = {k for k in state if k in loaded or (k.endswith("num_batches_tracked") and k.rsplit(".", 1)[0] + ".running_mean" in loaded)}
    tensors = {k: v for k, v in state.items() if k in keep}
    base = model.model_name
    entry = get_entry(base)
    resolved = dict(getattr(model, "arch_kwargs", {}) or {})
    metadata = {
        "format": "medtransfer-weights/1",
        "model": base,
        "family": entry.family,
        "task": task,
        "arch_kwargs": resolved,
        "in_channels": in_channels if in_channels is not None else entry.default_in_channels,
        "converted_from": {"file": path.name, "sha256": sha256_file(path), "source": report.source},
        "load_report": report.to_dict(),
        "pretrained_cfg": model.pretrained_cfg.to_dict() if model.pretrained_cfg else None,
        "versions": versions(),
    }
    save_safetensors(tensors, out, metadata)
    return out, report
