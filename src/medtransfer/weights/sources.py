"""One converter per published checkpoint format, chosen by the key signature of the file (timm's filter functions).

Every converter turns the raw object read from disk into a flat state_dict in the *canonical key space* of its
family: the official module names without wrappers (no ``module.``, ``backbone.``, ``encoder_q.``), without the
pretraining-only heads (projection heads, prototypes, queues, jigsaw heads). Converters run in ``priority`` order and
the first whose ``detect`` accepts the object wins, so specific signatures come before generic ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch

from ..errors import CheckpointError

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Source:
    name: str
    description: str
    detect: Callable[[Any], bool]
    convert: Callable[[Any], StateDict]
    priority: int = 100


_SOURCES: dict[str, Source] = {}


def register_source(source: Source) -> Source:
    if source.name in _SOURCES:
        raise ValueError(f"checkpoint source '{source.name}' registered twice")
    _SOURCES[source.name] = source
    return source


def _ensure_loaded() -> None:
    from . import sources2d, sources3d, sources_monai, sources_nnunet  # noqa: F401  (register on import)


def list_sources() -> list[Source]:
    _ensure_loaded()
    return sorted(_SOURCES.values(), key=lambda s: (s.priority, s.name))


def get_source(name: str) -> Source:
    _ensure_loaded()
    try:
        return _SOURCES[name]
    except KeyError:
        names = ", ".join(s.name for s in list_sources())
        raise CheckpointError(f"unknown checkpoint source '{name}'; known sources: auto, {names}") from None


def detect_source(obj: Any) -> Source:
    for source in list_sources():
        try:
            if source.detect(obj):
                return source
        except (AttributeError, TypeError, KeyError):
            continue
    raise CheckpointError(_describe_unknown(obj))


def _describe_unknown(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = list(obj.keys())[:8]
        return (
            f"no known checkpoint format matches this file (top-level keys: {keys}). "
            "Pass source=NAME if you know its format (`medtransfer zoo inspect FILE` lists the known ones), "
            "or save a plain state_dict: torch.save(model.state_dict(), path)."
        )
    return f"no known checkpoint format matches this file: it holds a {type(obj).__name__}, not a dict of tensors"


# ----------------------------------------------------------------------------------------------------------------
# Building blocks shared by the converters


def is_tensor_dict(obj: Any, min_size: int = 1) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) >= min_size
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def unwrap(obj: Any, keys: Iterable[str]) -> Any:
    """Descend into the first of ``keys`` present in ``obj`` (``state_dict``, ``model``, ...); else ``obj``."""
    if isinstance(obj, Mapping):
        for key in keys:
            if key in obj and isinstance(obj[key], Mapping):
                return obj[key]
    return obj


def tensors_only(obj: Mapping) -> StateDict:
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def strip_prefixes(sd: Mapping[str, torch.Tensor], prefixes: Iterable[str]) -> StateDict:
    """Remove, for each key, the first listed prefix it *starts with* (longest prefixes are tried first).

    A prefix test, never a substring test: BenchmarkTransferLearning's substring rename and its stripping of
    ``module.`` before ``module.encoder_q.`` are what made MoCo files load nothing.
    """
    ordered = sorted(prefixes, key=len, reverse=True)
    out: StateDict = {}
    for key, value in sd.items():
        for prefix in ordered:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        out[key] = value
    return out


def drop_keys(sd: Mapping[str, torch.Tensor], prefixes: Iterable[str]) -> StateDict:
    prefixes = tuple(prefixes)
    return {k: v for k, v in sd.items() if not k.startswith(prefixes)}


def keys_start_with(sd: Mapping[str, Any], prefix: str, fraction: float = 0.9) -> bool:
    """True when at least ``fraction`` of the keys start with ``prefix``."""
    if not sd:
        return False
    return sum(k.startswith(prefix) for k in sd) >= fraction * len(sd)


def convert(obj: Any, source: str = "auto") -> tuple[StateDict, Source]:
    """Detect (or take) the source of ``obj`` and convert it to a canonical state_dict."""
    chosen = detect_source(obj) if source == "auto" else get_source(source)
    try:
        sd = chosen.convert(obj)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise CheckpointError(f"the file does not have the layout of a '{chosen.name}' checkpoint: {exc}") from exc
    if not sd:
        raise CheckpointError(f"the '{chosen.name}' converter found no weight tensors in the file")
    return sd, chosen
