"""Typed pretraining configs: the same sections as fine-tuning (optim, schedule, train) plus the method's own.

Building order, as for ``finetune``: the YAML file, the command-line flags and ``--set key=value`` overrides; then
the method's recipe (``recipe: published`` by default, ``modern`` for Models Genesis, ``none`` for the plain config
defaults) is merged *under* those values, so anything the user wrote wins; then everything is validated before any
work starts, with errors naming the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Optional, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from ..errors import MedTransferError, UnknownModelError
from ..train.recipes import merge
from ..train.config import (
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    _deep_copy,
    config_data,
    _spatial,
    _Section,
    format_validation_error,
    known_preset,
)

METHODS = ("genesis", "volf", "med3d", "vdt")
Method = Literal["genesis", "volf", "med3d", "vdt"]

# what each method trains and on which data, for messages and --help
METHOD_SUMMARY = {
    "genesis": "Models Genesis restoration of corrupted 3D cubes (unlabelled CT/MRI)",
    "volf": "Volume Fusion pseudo-segmentation of fused 3D patches (unlabelled CT/MRI)",
    "med3d": "MedicalNet multi-dataset supervised segmentation (one or more labelled 3D datasets)",
    "vdt": "VDT: 2D labelled images as 1 x C x H x W volumes, 3D ResNet classification",
}
DEFAULT_MODEL = {"genesis": "genesis_unet3d", "volf": "fmunet", "med3d": "medicalnet_resnet10",
                 "vdt": "vdt_resnet18_3d"}


class PretextModelConfig(_Section):
    """The network to pretrain (a zoo name) and optional initial weights (e.g. a 2D ResNet to inflate)."""

    name: str
    pretrained: Union[bool, str, None] = False
    arch: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        from ..zoo.builder import split_name
        from ..zoo.registry import get_entry

        try:
            get_entry(split_name(name)[0])
        except UnknownModelError as exc:
            raise ValueError(str(exc)) from None
        return name


class PretextDataConfig(_Section):
    """Where the pretraining data is and how it is cut into samples.

    ``paths``: one dataset (genesis, volf, vdt) or several (med3d: one decoder per dataset); empty means the
    embedded phantoms. A ``.npy`` cube file from ``medtransfer data cubes`` (or an official ``bat_*.npy``) is read
    as ready-made Models Genesis cubes."""

    paths: list[Path] = Field(default_factory=list)
    format: str = "auto"
    options: dict[str, Any] = Field(default_factory=dict)
    preset: Optional[str] = None  # None: the method's default intensity preset
    spacing: Optional[tuple[float, ...]] = None
    patch_size: Optional[tuple[int, ...]] = None  # None: the method's default
    batch_size: int = Field(2, gt=0)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    val_batches: int = Field(4, gt=0)  # fixed validation batches, drawn once (a stable validation loss)
    workers: int = Field(0, ge=0)
    cache_dir: Optional[Path] = None

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, name: Optional[str]) -> Optional[str]:
        return known_preset(name)

    @field_validator("spacing", "patch_size")
    @classmethod
    def _positive(cls, value: Optional[tuple], info) -> Optional[tuple]:
        if value is not None and any(v <= 0 for v in value):
            raise ValueError(f"{info.field_name} values must be > 0, got {list(value)}")
        return _spatial(value, info.field_name)


class PretrainConfig(_Section):
    """A whole pretraining run. ``options``: the method's own knobs (see ``medtransfer pretrain --help``)."""

    method: Method
    model: PretextModelConfig
    data: PretextDataConfig = Field(default_factory=PretextDataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(monitor="loss"))
    options: dict[str, Any] = Field(default_factory=dict)
    recipe: Literal["published", "modern", "none"] = "published"
    out: Path = Path("runs/pretrain")

    @model_validator(mode="after")
    def _recipe_exists(self) -> PretrainConfig:
        if self.recipe == "modern" and self.method != "genesis":
            raise ValueError(f"recipe 'modern' exists for method genesis only; use 'published' or 'none' for "
                             f"{self.method}")
        if self.method != "med3d" and len(self.data.paths) > 1:
            raise ValueError(f"data.paths: method {self.method} takes one dataset, got {len(self.data.paths)}; "
                             "only med3d trains on several")
        return self


def method_recipe(method: str, recipe: str) -> dict[str, Any]:
    """The published (or modern) values of ``method`` as config sections."""
    if recipe == "none":
        return {}
    if method == "genesis":
        from .genesis import MODERN_RECIPE, PUBLISHED_RECIPE

        return _deep_copy(MODERN_RECIPE if recipe == "modern" else PUBLISHED_RECIPE)
    if method == "vdt":
        from .vdt import VDT_RECIPE

        return _deep_copy(VDT_RECIPE)
    if method == "volf":
        # PyMIC LUNA demo (unet3d_volf.cfg): Adam 1e-3, L2 1e-5, StepLR gamma 0.5 every 20k of 80k iterations
        return {"optim": {"name": "adam", "lr": 1e-3, "weight_decay": 1e-5},
                "schedule": {"name": "step", "interval": "step", "step_size": 20_000, "gamma": 0.5},
                "train": {"max_steps": 80_000, "max_epochs": None, "val_every": 1000, "val_interval": "step"},
                "data": {"batch_size": 2}}
    if method == "med3d":
        # no published pretraining recipe (spec 1b); MedicalNet's fine-tuning optimiser: SGD 1e-3, momentum 0.9, wd 1e-3
        return {"optim": {"name": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-3},
                "schedule": {"name": "exponential", "gamma": 0.99}}
    raise MedTransferError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def validate_pretrain(data: Mapping[str, Any]) -> PretrainConfig:
    """Merge the recipe under ``data`` and validate; errors name the field."""
    data = _deep_copy(data)
    method = data.get("method")
    if isinstance(method, str) and method in METHODS:
        data.setdefault("model", {})
        if isinstance(data["model"], dict):
            data["model"].setdefault("name", DEFAULT_MODEL[method])
        recipe = data.get("recipe", "published")
        if recipe in ("published", "modern", "none") and not (recipe == "modern" and method != "genesis"):
            data = merge(method_recipe(method, recipe), data)
    train = data.setdefault("train", {})
    if isinstance(train, dict):
        train.setdefault("monitor", "loss")  # pretext tasks have no task metric worth monitoring by default
    try:
        return PretrainConfig.model_validate(data)
    except ValidationError as exc:
        raise MedTransferError(format_validation_error(exc, PretrainConfig)) from None


def load_pretrain_config(source: str | os.PathLike | Mapping[str, Any] | PretrainConfig,
                         overrides: Iterable[str] = ()) -> PretrainConfig:
    """A YAML file, a dict or a config, plus ``key=value`` overrides -> a validated :class:`PretrainConfig`."""
    if isinstance(source, PretrainConfig) and not overrides:
        return source
    data = config_data(source, PretrainConfig, overrides)
    return validate_pretrain(data)
