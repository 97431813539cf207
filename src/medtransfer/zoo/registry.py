"""Model registry: one short entry function per variant, registered by name.

Entry functions build the architecture only (timm's build-then-load split): they never read weight files.
:func:`medtransfer.zoo.builder.create_model` builds, then loads.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

from ..errors import UnknownModelError
from .pretrained import PretrainedCfg

TASKS = ("segmentation", "classification", "features")


class ZooModel(nn.Module):
    """What every registered network provides, besides ``forward``.

    - ``forward(x)``: logits (no sigmoid/softmax). Segmentation at input resolution, classification ``(N, C)``,
      task ``features``: the same as :meth:`forward_features`.
    - ``forward_features(x)``: the deepest encoder feature map, before any head.
    - ``encoder_prefixes``: state_dict key prefixes of the encoder (what ``forward_features`` uses); load coverage
      is measured over these keys.
    - ``first_conv_keys``: weight keys of the convolutions that see the input image, adapted when a checkpoint was
      trained with another number of input channels.
    """

    encoder_prefixes: tuple[str, ...] = ()
    first_conv_keys: tuple[str, ...] = ()
    spatial_dims: int = 3
    task: str = "segmentation"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def is_encoder_key(self, key: str) -> bool:
        return key.startswith(self.encoder_prefixes)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    fn: Callable[..., ZooModel]
    description: str
    spatial_dims: int = 3
    default_in_channels: int = 1
    default_num_classes: int = 2
    tasks: tuple[str, ...] = TASKS
    pretrained: tuple[PretrainedCfg, ...] = field(default_factory=tuple)
    # Reads a (converted) checkpoint state_dict and returns architecture kwargs it implies, e.g. the shortcut type
    # of a MedicalNet file, plus ``head_classes={task: n}`` for the heads it holds (the class count applies only
    # when the model is built for that task). User-given kwargs win.
    infer_kwargs: Callable[[Mapping[str, torch.Tensor]], dict] | None = None
    # A small valid spatial input size (tests, benchmarks, docs); None: 16x32x32 in 3D, 64x64 in 2D.
    example_size: tuple[int, ...] | None = None
    # Architecture options (**arch_kwargs) the entry accepts; None: read from the entry function's signature.
    options: tuple[str, ...] | None = None

    @property
    def arch_options(self) -> tuple[str, ...]:
        if self.options is not None:
            return tuple(self.options)
        return constructor_options(self.fn)

    @property
    def small_input_size(self) -> tuple[int, ...]:
        if self.example_size is not None:
            return tuple(self.example_size)
        return (64, 64) if self.spatial_dims == 2 else (16, 32, 32)

    def pretrained_cfg(self, tag: str | None = None) -> PretrainedCfg | None:
        if not self.pretrained:
            return None
        if tag is None:
            return self.pretrained[0]
        for cfg in self.pretrained:
            if cfg.tag == tag:
                return cfg
        tags = ", ".join(c.tag for c in self.pretrained)
        raise UnknownModelError(f"model '{self.name}' has no published weights tagged '{tag}'; known tags: {tags}")


_COMMON_ARGS = ("self", "task", "num_classes", "in_channels")


def constructor_options(fn: Callable) -> tuple[str, ...]:
    """Keyword options of a model class or entry function, without the ones every model takes."""
    params = inspect.signature(fn).parameters.values()
    return tuple(
        p.name
        for p in params
        if p.name not in _COMMON_ARGS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    )


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str,
    *,
    family: str,
    description: str,
    spatial_dims: int = 3,
    default_in_channels: int = 1,
    default_num_classes: int = 2,
    tasks: tuple[str, ...] = TASKS,
    pretrained: tuple[PretrainedCfg, ...] = (),
    infer_kwargs: Callable[[Mapping[str, torch.Tensor]], dict] | None = None,
    example_size: tuple[int, ...] | None = None,
    options: tuple[str, ...] | None = None,
):
    """Decorator registering an entry function ``fn(*, task, num_classes, in_channels, **arch_kwargs)``."""

    def decorate(fn):
        if name in _REGISTRY:
            raise ValueError(f"model name '{name}' registered twice")
        for cfg in pretrained:
            if cfg.model != name:
                raise ValueError(f"PretrainedCfg {cfg.full_name} registered under model '{name}'")
        _REGISTRY[name] = ModelEntry(
            name=name,
            family=family,
            fn=fn,
            description=description,
            spatial_dims=spatial_dims,
            default_in_channels=default_in_channels,
            default_num_classes=default_num_classes,
            tasks=tasks,
            pretrained=tuple(pretrained),
            infer_kwargs=infer_kwargs,
            example_size=example_size,
            options=tuple(options) if options is not None else None,
        )
        return fn

    return decorate


def _ensure_loaded() -> None:
    # The family modules register themselves on import; importing the package imports them all.
    from . import families  # noqa: F401


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, sorted."""
    _ensure_loaded()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def get_entry(name: str) -> ModelEntry:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model '{name}'.{hint} `medtransfer zoo list` shows all {len(_REGISTRY)} models."
        ) from None


def all_pretrained_cfgs() -> list[PretrainedCfg]:
    _ensure_loaded()
    return [cfg for name in sorted(_REGISTRY) for cfg in _REGISTRY[name].pretrained]
