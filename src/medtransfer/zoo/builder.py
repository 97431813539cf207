"""The one builder: construct the architecture from the registry, *then* load weights (timm's build-then-load split)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ..errors import CheckpointError, MedTransferError, UnknownModelError
from ..weights.adapt import LoadReport, load_state_dict_with_report, parse_adapt_stem
from ..weights.io import read_checkpoint
from ..weights.sources import StateDict, convert
from .pretrained import PretrainedCfg, cached_file
from .registry import TASKS, ModelEntry, get_entry, list_models


def split_name(name: str) -> tuple[str, str | None]:
    """``'medicalnet_resnet10.23dataset'`` -> ``('medicalnet_resnet10', '23dataset')``."""
    base, _, tag = name.partition(".")
    return base, (tag or None)


def read_converted(path: str | os.PathLike, source: str = "auto") -> tuple[StateDict, str, dict[str, Any]]:
    """Read a weight file safely and convert it to canonical keys: (state_dict, source name, file metadata)."""
    raw = read_checkpoint(path)
    try:
        sd, chosen = convert(raw.obj, source)
    except CheckpointError as exc:
        raise CheckpointError(f"{raw.path}: {exc}") from None
    # a converter may attach what the file says besides tensors (an nnU-Net checkpoint's input channels)
    return sd, chosen.name, {**getattr(sd, "metadata", {}), **raw.metadata}


def file_pretrained_cfg(path: str | os.PathLike) -> PretrainedCfg | None:
    """The :class:`PretrainedCfg` stored in a medtransfer safetensors file (``medtransfer pretrain`` output), read
    from the header alone; None for any other file."""
    from ..weights.io import SAFETENSORS_META_KEY, _is_safetensors

    path = Path(path).expanduser()
    if not path.is_file() or not _is_safetensors(path):
        return None
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(SAFETENSORS_META_KEY, "{}"))
    except Exception:  # noqa: BLE001 - a damaged file is reported when the weights are read
        return None
    data = meta.get("pretrained_cfg") if isinstance(meta, dict) else None
    return PretrainedCfg.from_dict(data) if isinstance(data, dict) else None


# Families whose networks hold the same tensors under the same names (the inflated torchvision ResNet layout) but
# differ in strides, dilations and pooling, which leave no trace in a file.
RESNET_LAYOUT_FAMILIES = ("ResNet3D", "MedicalNet", "VDT")
# Formats that are only a dict of tensors: nothing in them says how or on what they were trained.
BARE_SOURCES = ("plain", "torchvision_video")


def load_notes(entry: ModelEntry, source: str, inferred: dict[str, Any], contract_known: bool = False) -> list[str]:
    """What a key-and-shape comparison cannot tell about loading a ``source`` file into ``entry``'s model.

    ``contract_known``: the file's input contract is known from a :class:`PretrainedCfg` (published or recorded)."""
    notes = [str(n) for n in inferred.get("notes", [])]
    if source in BARE_SOURCES and entry.family in RESNET_LAYOUT_FAMILIES:
        notes.append(
            "the file cannot tell its training architecture: strided stages (resnet3d_*), MedicalNet's dilated "
            "layer3/4 (medicalnet_resnet*) and VDT's in-plane strides hold the same tensors, and strides, dilations "
            "and pooling have none; `medtransfer zoo inspect FILE` ranks the networks it fits"
        )
    if source in BARE_SOURCES and not contract_known:
        notes.append(
            f"a '{source}' file carries no input contract (modality, intensity window and normalisation, spacing, "
            "channel order, patch size): take it from where the file was published"
        )
    own = {cfg.source for cfg in entry.pretrained}
    if own and source not in own | {"medtransfer", "plain"}:
        owners = sorted({e.family for e in map(get_entry, list_models()) if any(c.source == source for c in e.pretrained)})
        made_for = f"{', '.join(owners)}'s" if owners else "another family's"
        notes.append(
            f"the file is in {made_for} '{source}' format, not {entry.family}'s: its tensors fit by name and shape, "
            "but the network they were trained in may differ in strides, dilations or input contract"
        )
    return notes


def candidate_notes(
    entry: ModelEntry, state_dict: StateDict, source: str, path: Path, adapt_stem: Any, skip: Sequence[str]
) -> list[str]:
    """For a bare file loaded into a ResNet-layout network: the networks of those families and the same depth that
    it fits, with their encoder coverage, best first (as `zoo inspect` ranks them, which also tries other depths),
    since the file cannot say which one it came from."""
    if source not in BARE_SOURCES or entry.family not in RESNET_LAYOUT_FAMILIES:
        return []
    from .tools import rank_fits

    def depth(name: str) -> str | None:
        found = re.search(r"resnet(?:3d_)?(\d+)", name)
        return found.group(1) if found else None

    names = [n for n in list_models() if get_entry(n).family in RESNET_LAYOUT_FAMILIES and depth(n) == depth(entry.name)]
    fits = [f for f in rank_fits(dict(state_dict), source, path, names, adapt_stem, tuple(skip)) if f.ok]
    listed = ", ".join(f"{f.model} {f.coverage:.1%}" + (" (adapted)" if f.reshaped else "") for f in fits)
    return [f"networks of this depth the file fits, best first (encoder coverage): {listed or 'none'}; "
            "`medtransfer zoo inspect FILE` ranks every model"]


def _resolve_pretrained(
    entry: ModelEntry, tag: str | None, pretrained: bool | str | os.PathLike, download: bool = False
) -> tuple[Path | None, PretrainedCfg | None]:
    if download and pretrained is not True:
        raise ValueError(f"download=True fetches the published weights of pretrained=True; got "
                         f"pretrained={pretrained!r}")
    if pretrained is False or pretrained is None:
        return None, entry.pretrained_cfg(tag) if tag else None
    if pretrained is True:
        cfg = entry.pretrained_cfg(tag)
        if cfg is None:
            raise UnknownModelError(
                f"model '{entry.name}' has no published weights; pass pretrained='path/to/file' for your own"
            )
        return cached_file(cfg, download=download), cfg
    if isinstance(pretrained, (str, os.PathLike)):
        path = Path(pretrained).expanduser()
        if not path.exists():
            raise CheckpointError(f"{path}: no such weight file (pretrained= takes True, False or a file path)")
        return path, entry.pretrained_cfg(tag) if tag else None
    raise TypeError(f"pretrained must be True, False or a file path, got {type(pretrained).__name__}")


def create_model(
    name: str,
    *,
    task: str = "segmentation",
    num_classes: int | None = None,
    in_channels: int | None = None,
    pretrained: bool | str | os.PathLike = False,
    download: bool = False,
    source: str = "auto",
    min_coverage: float | None = None,
    inflate: str = "i3d",
    adapt_stem: str | Sequence[str] | None = None,
    skip: Sequence[str] = (),
    **arch_kwargs: Any,
) -> nn.Module:
    """Build a registered model and optionally load weights into it.

    Args:
        name: a name from :func:`list_models`, optionally with a weight tag (``medicalnet_resnet10.23dataset``).
        task: ``segmentation`` (logits at input size), ``classification`` (``(N, C)`` logits) or ``features``.
        num_classes: output classes; default: the class count of the checkpoint's own head when it has one, else
            the model's default.
        in_channels: input channels; default: the model's native count (1 for 3D models, 3 for ``resnet50_2d``).
            A checkpoint trained on another count has its input convolution adapted.
        pretrained: ``True`` (published weights from the cache, see ``MEDTRANSFER_HOME``), ``False``, or a path.
        download: with ``pretrained=True``, fetch a file missing from the cache from its official address (a direct
            link; sha256 checked when recorded; see :func:`medtransfer.zoo.pretrained.fetch_pretrained`). Default
            ``False``: never download, a missing file is an error naming the address.
        source: checkpoint format, ``auto`` detects it from the file's key signature.
        min_coverage: raise if less than this fraction of the encoder tensors loads.
        inflate: how 2D kernels become 3D ones (``i3d`` or ``centre``).
        adapt_stem: how a file's input convolution of another depth and/or channel count is fitted: a depth rule
            (``center_pad``, ``interpolate``) and/or a channel rule (``average``, ``tile``), joined by ``+``
            (``"center_pad+average"``). See :class:`medtransfer.weights.adapt.StemAdapt`.
        skip: shell-style patterns of file keys (canonical names, e.g. ``"fc.*"``) to leave out; the model keeps
            its own values there and the report lists them.
        **arch_kwargs: architecture options of the family (``shortcut='B'``, ``decoder='unet'``, ...). Options a
            checkpoint implies (MedicalNet shortcut type, output classes) are read from it unless given here.

    The load report is kept on the model as ``model.load_report`` and logged.
    """
    base, tag = split_name(name)
    entry = get_entry(base)
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got '{task}'")
    if task not in entry.tasks:
        raise ValueError(f"model '{base}' does not support task '{task}'; it supports {', '.join(entry.tasks)}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if in_channels is not None and (not isinstance(in_channels, int) or in_channels < 1):
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")

    parse_adapt_stem(adapt_stem)  # a bad rule is an error before any file is read
    path, cfg = _resolve_pretrained(entry, tag, pretrained, download)
    state_dict = source_name = None
    notes: list[str] = []
    kwargs = dict(cfg.arch_kwargs) if cfg else {}
    if path is not None:
        state_dict, source_name, meta = read_converted(path, cfg.source if (cfg and source == "auto") else source)
        inferred = dict(meta.get("arch_kwargs", {})) if meta else {}
        if entry.infer_kwargs is not None:
            inferred.update(entry.infer_kwargs(state_dict))
        # a head's class count applies only to the task it belongs to (an ImageNet fc says nothing of a decoder)
        known = cfg is not None or isinstance(meta.get("pretrained_cfg"), dict)
        notes = load_notes(entry, source_name, inferred, contract_known=known)
        notes += candidate_notes(entry, state_dict, source_name, path, adapt_stem, skip)
        inferred.pop("notes", None)
        ckpt_classes = inferred.pop("head_classes", {}).get(task)
        kwargs.update(inferred)
        if num_classes is None and ckpt_classes is not None:
            num_classes = int(ckpt_classes)
        if in_channels is None and meta.get("in_channels"):
            in_channels = int(meta["in_channels"])  # a converted file records the channel count it was made for
        if cfg is None and isinstance(meta.get("pretrained_cfg"), dict):
            cfg = PretrainedCfg.from_dict(meta["pretrained_cfg"])  # a file from `medtransfer pretrain`
    kwargs.update(arch_kwargs)

    options = set(entry.arch_options)
    unknown = sorted(set(arch_kwargs) - options)
    if unknown:
        listed = ", ".join(sorted(options)) or "none"
        raise TypeError(f"model '{base}' has no option {', '.join(unknown)}; its options: {listed}")
    kwargs = {k: v for k, v in kwargs.items() if k in options}

    model = entry.fn(
        task=task,
        num_classes=num_classes if num_classes is not None else entry.default_num_classes,
        in_channels=in_channels if in_channels is not None else entry.default_in_channels,
        **kwargs,
    )
    model.model_name = base
    model.arch_kwargs = dict(kwargs)
    model.pretrained_cfg = cfg
    model.load_report = None
    if state_dict is not None:
        model.load_report = load_state_dict_with_report(
            model,
            state_dict,
            source=source_name,
            model_name=base,
            min_coverage=min_coverage,
            inflate=inflate,
            path=str(path),
            notes=notes,
            adapt_stem=adapt_stem,
            skip=skip,
        )
    return model


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    source: str = "auto",
    min_coverage: float | None = None,
    inflate: str = "i3d",
    adapt_stem: str | Sequence[str] | None = None,
    skip: Sequence[str] = (),
) -> LoadReport:
    """Load a weight file of any supported format into ``model`` and return the :class:`LoadReport`.

    ``adapt_stem`` and ``skip`` as in :func:`create_model`.

    Raises :class:`~medtransfer.errors.CheckpointMismatchError` when no encoder tensor loads, when encoder tensors
    have other shapes, or when coverage is below ``min_coverage``; the model is then left unchanged.
    """
    parse_adapt_stem(adapt_stem)
    state_dict, source_name, meta = read_converted(path, source)
    name = getattr(model, "model_name", None)
    notes = []
    if name is not None:
        entry = get_entry(name)
        notes = load_notes(entry, source_name, entry.infer_kwargs(state_dict) if entry.infer_kwargs else {},
                           contract_known=isinstance(meta.get("pretrained_cfg"), dict))
        notes += candidate_notes(entry, state_dict, source_name, Path(path), adapt_stem, skip)
    report = load_state_dict_with_report(
        model,
        state_dict,
        source=source_name,
        model_name=getattr(model, "model_name", type(model).__name__),
        min_coverage=min_coverage,
        inflate=inflate,
        path=str(path),
        notes=notes,
        adapt_stem=adapt_stem,
        skip=skip,
    )
    model.load_report = report
    return report


__all__ = ["create_model", "load_checkpoint", "read_converted", "split_name", "MedTransferError"]
