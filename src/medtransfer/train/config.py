"""Typed fine-tuning configs: one YAML file (or dict) per run, validated before any work starts.

Every section forbids unknown keys, so a misspelt key fails with its dotted path and the valid keys at that level.
Validation errors become one :class:`~medtransfer.errors.MedTransferError` whose lines read
``optim.lr: Input should be greater than 0 (got 0)``. :func:`dump_config` writes the resolved values (atomically),
so a run folder's ``config.yaml`` reproduces the run on its own (STYLE.md item 10, litgpt's ``args.py``).

Defaults that are not obvious cite their source; the seed-system recipes live in :mod:`.recipes` and are merged
*under* the user's values by :func:`load_config`.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import MedTransferError
from .recipes import apply_recipe

TASKS = ("segmentation", "classification", "features")  # the tasks of mt.create_model (zoo/registry.py)
Task = Literal["segmentation", "classification", "features", "detection"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """What :func:`medtransfer.create_model` receives."""

    name: str
    task: Task = "segmentation"
    num_classes: Optional[int] = Field(None, gt=0)  # None: the model's default
    in_channels: int = Field(1, gt=0)
    pretrained: Union[bool, str, None] = False  # True: the weights cache; str: a file; False/None: random init
    arch: dict[str, Any] = Field(default_factory=dict)  # extra architecture kwargs (shortcut_type, ...)
    # how the file's input convolution is fitted to another stem depth/channel count ("center_pad+average", ...)
    adapt_stem: Optional[str] = None
    skip: list[str] = Field(default_factory=list)  # shell patterns of file keys left out (the model keeps its own)
    # with pretrained: true, fetch the published file from its official address when the cache lacks it (zoo fetch)
    download: bool = False

    @field_validator("adapt_stem")
    @classmethod
    def _known_adapt_stem(cls, value: Optional[str]) -> Optional[str]:
        from ..weights.adapt import parse_adapt_stem

        parse_adapt_stem(value)  # a ValueError naming the rules becomes a field error
        return value
    # task detection: options of train.detector.build_detector (fpn_channels, anchors, cls_loss, NMS, ...)
    detector: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        from ..zoo.registry import get_entry

        from ..errors import UnknownModelError

        try:
            get_entry(name)
        except UnknownModelError as exc:  # pydantic turns only ValueError into a field error
            raise ValueError(str(exc)) from None
        return name

    @model_validator(mode="after")
    def _task_supported(self) -> ModelConfig:
        from ..zoo.registry import get_entry

        tasks = get_entry(self.name).tasks
        if self.task == "detection":  # a RetinaNet on the model's encoder (train/detector.py)
            if "features" not in tasks:
                raise ValueError(f"task 'detection' needs {self.name}'s encoder (task 'features'), which it lacks")
            return self
        if self.detector:
            raise ValueError("model.detector applies to task 'detection' only")
        if self.task not in tasks:
            raise ValueError(f"task {self.task!r} is not supported by {self.name}; choose one of {', '.join(tasks)}")
        return self


def known_preset(name: Optional[str]) -> Optional[str]:
    """``name`` if it is an intensity preset of ``data.preprocess.PRESETS`` (or None), else a ValueError."""
    from ..data.preprocess import PRESETS

    if name is not None and name not in PRESETS:
        raise ValueError(f"unknown intensity preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return name


def _spatial(value: Optional[tuple], what: str) -> Optional[tuple]:
    if value is not None and len(value) not in (2, 3):
        raise ValueError(f"{what} needs 2 (2D) or 3 (3D) values, got {len(value)}")
    return value


class DataConfig(_Section):
    """Where the data is and how it is cut into batches."""

    path: Optional[Path] = None  # None: the embedded phantoms (data/phantoms.py), as `medtransfer demo` uses
    format: str = "auto"  # a layout of medtransfer.data.datasets.load_dataset, or "auto" to detect it
    options: dict[str, Any] = Field(default_factory=dict)  # layout options of load_dataset, e.g. images/masks folders
    # preset, spacing, patch_size: None takes the loaded weights' contract, else the default (docs/training.md,
    # "Input contract"); a run from scratch never takes the published weights' contract
    preset: Optional[str] = None  # intensity preset of data.preprocess.PRESETS; None: weights', else by modality
    spacing: Optional[tuple[float, ...]] = None  # mm per axis; None: the weights' contract, else native spacing
    patch_size: Optional[tuple[int, ...]] = None  # voxels per axis; None: the weights' contract, else DEFAULT_PATCH
    # CT or MRI for datasets that declare no channel names (lists, folders); auto: declared names, else intensities
    # (a minimum below -500 HU is CT), else unknown (data/modality.py)
    modality: Literal["auto", "CT", "MRI"] = "auto"
    batch_size: int = Field(2, gt=0)
    # training order: "shuffle" draws every case once per epoch; "balanced" (single-label classification) draws
    # every class equally often, the minority with replacement (train/samplers.py); both from (seed, epoch) only
    sampling: Literal["shuffle", "balanced"] = "shuffle"
    label_fraction: float = Field(1.0, gt=0, le=1)  # share of labelled training cases kept (nested subsets)
    val_fraction: float = Field(0.2, gt=0, lt=1)  # data/splits.py train_val_test default
    test_fraction: float = Field(0.0, ge=0, lt=1)  # held out first, never trained or validated on (benchmarks)
    fold: Optional[int] = Field(None, ge=0)  # k-fold index; None: one hash-ordered train/val split
    # auto: the dataset's own split where it has one (DeepLesion's Train_Val_Test, a MONAI datalist's
    # training/validation lists; val_fraction and test_fraction then unused) and fold is None; random: always drawn
    split: Literal["auto", "random"] = "auto"
    workers: int = Field(0, ge=0)
    cache_dir: Optional[Path] = None  # preprocessed-volume cache; None: <cache_root>/<pipeline hash>, else <out>/cache
    cache_root: Optional[Path] = None  # shared by runs (a grid: <grid>/cache/<task>), one cache per pipeline in it

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, name: Optional[str]) -> Optional[str]:
        return known_preset(name)

    @field_validator("modality", mode="before")
    @classmethod
    def _modality_case(cls, value: Any) -> Any:
        return {"auto": "auto", "ct": "CT", "mri": "MRI", "mr": "MRI"}.get(str(value).lower(), value)

    @field_validator("spacing")
    @classmethod
    def _positive_spacing(cls, value: Optional[tuple[float, ...]]) -> Optional[tuple[float, ...]]:
        if value is not None and any(v <= 0 for v in value):
            raise ValueError(f"spacing values must be > 0, got {list(value)}")
        return _spatial(value, "spacing")

    @field_validator("patch_size")
    @classmethod
    def _positive_patch(cls, value: Optional[tuple[int, ...]]) -> Optional[tuple[int, ...]]:
        if value is not None and any(v <= 0 for v in value):
            raise ValueError(f"patch sizes must be positive integers, got {list(value)}")
        return _spatial(value, "patch_size")

    @model_validator(mode="after")
    def _same_dims(self) -> DataConfig:
        if self.spacing is not None and self.patch_size is not None and len(self.spacing) != len(self.patch_size):
            raise ValueError(f"spacing has {len(self.spacing)} axes but patch_size has {len(self.patch_size)}")
        return self


class OptimConfig(_Section):
    """Optimiser. ``head_lr_mult``/``encoder_lr_mult`` scale ``lr`` for the two parameter groups (optim.py)."""

    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)  # SGD only; MedicalNet train.py uses 0.9
    weight_decay: float = Field(0.0, ge=0)  # applied to every parameter, as all five seed systems do
    betas: tuple[float, float] = (0.9, 0.999)  # torch.optim.Adam defaults
    head_lr_mult: float = Field(1.0, gt=0)  # MedicalNet: 100 for conv_seg
    encoder_lr_mult: float = Field(1.0, ge=0)

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"betas must lie in [0, 1), got {list(value)}")
        return value


class ScheduleConfig(_Section):
    """Learning-rate schedule (see optim.build_scheduler for the exact formulas).

    ``interval``: the main schedule advances once per optimiser step or once per epoch; warm-up always counts
    optimiser steps. ``horizon``: length of ``cosine``/``poly`` in ``interval`` units (None: the whole run).
    ``milestones`` (``multistep``) are in ``interval`` units too. ``plateau`` ignores ``interval``: it acts on each
    validation result, watching what ``train.monitor`` names.
    """

    name: Literal["none", "step", "multistep", "exponential", "cosine", "poly", "plateau"] = "none"
    interval: Literal["step", "epoch"] = "epoch"
    warmup_steps: int = Field(0, ge=0)
    warmup: Literal["linear", "constant"] = "linear"
    warmup_start_factor: float = Field(1 / 3, gt=0, le=1)  # torch.optim.lr_scheduler.LinearLR default; MP3D's 1/3
    step_size: int = Field(30, gt=0)  # torch StepLR has no default; 30 is VDT's first milestone
    milestones: tuple[int, ...] = ()
    gamma: float = Field(0.1, gt=0, le=1)
    power: float = Field(0.9, gt=0)  # poly exponent; VDT segmentation 0.9, VolF 0.8
    horizon: Optional[int] = Field(None, gt=0)
    patience: int = Field(10, ge=0)  # torch ReduceLROnPlateau default
    factor: float = Field(0.1, gt=0, lt=1)  # torch ReduceLROnPlateau default
    threshold: float = Field(1e-4, ge=0)  # torch ReduceLROnPlateau default (relative)
    min_lr: float = Field(0.0, ge=0)

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(m <= 0 for m in value) or list(value) != sorted(set(value)):
            raise ValueError(f"milestones must be positive and strictly increasing, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _multistep_needs_milestones(self) -> ScheduleConfig:
        if self.name == "multistep" and not self.milestones:
            raise ValueError("schedule 'multistep' needs milestones, e.g. [30, 60, 90]")
        return self


class TrainConfig(_Section):
    """The loop. ``freeze_encoder_steps``: 0 never frozen, N > 0 frozen for the first N optimiser steps, -1 always
    frozen (linear probe). Patience and ``val_every`` count validations and ``val_interval`` units."""

    max_epochs: Optional[int] = Field(100, gt=0)  # VDT LIDC: 100 epochs
    max_steps: Optional[int] = Field(None, gt=0)  # stops at whichever limit comes first
    val_every: int = Field(1, gt=0)
    val_interval: Literal["step", "epoch"] = "epoch"
    monitor: Literal["metric", "loss"] = "metric"  # what best checkpoint, early stop and plateau watch
    early_stop_patience: Optional[int] = Field(None, gt=0)  # None: no early stopping
    grad_clip: Optional[float] = Field(None, gt=0)  # max global gradient norm; None: no clipping
    accum_steps: int = Field(1, gt=0)
    amp: Literal["none", "bf16", "fp16"] = "none"  # a no-op on CPU
    channels_last: bool = False
    seed: int = Field(0, ge=0)
    deterministic: bool = False
    freeze_encoder_steps: int = Field(0, ge=-1)
    # when last.pt (what --resume needs) is written: every_validation (and epoch and run ends), end, never (grids)
    save_last: Literal["every_validation", "end", "never"] = "every_validation"
    # when best.pt is written: at every improvement, or once at the end from a copy held in memory (grids: a run
    # that is never resumed mid-way writes its weights once instead of once per improving validation)
    save_best: Literal["every_improvement", "end"] = "every_improvement"

    @model_validator(mode="after")
    def _has_limit(self) -> TrainConfig:
        if self.max_epochs is None and self.max_steps is None:
            raise ValueError("set max_epochs or max_steps (or both); without either the run never ends")
        if self.save_best == "end" and self.save_last == "every_validation":
            raise ValueError("save_best: end holds the best weights in memory, which a run resumed mid-way from "
                             "last.pt would not have; use it with save_last: end or never")
        return self


class LossConfig(_Section):
    """Loss by name (one of ``medtransfer.train.losses.LOSSES``; ``auto``: the task's default, the loop's choice)
    and the keyword options of ``losses.build_loss`` (checked when the loss is built)."""

    name: str = "auto"
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_loss(cls, name: str) -> str:
        from .losses import LOSSES

        if name != "auto" and name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; choose auto or one of {', '.join(LOSSES)}")
        return name


class InferenceConfig(_Section):
    """Whole-case inference (``evaluate``, ``predict``). The whole volume goes through the network in one pass when
    its estimated activation memory fits ``memory_gb`` (see ``train.apply.fits_in_memory``); otherwise windows of
    ``window_size`` (None: the training patch) with ``overlap`` and ``batch_size`` windows per forward pass.
    ``memory_gb`` None: 80% of free CUDA memory, or half of the available RAM on CPU; 0: always windows."""

    window_size: Optional[tuple[int, ...]] = None
    overlap: float = Field(0.5, ge=0, lt=1)
    batch_size: int = Field(4, gt=0)
    memory_gb: Optional[float] = Field(None, ge=0)

    @field_validator("window_size")
    @classmethod
    def _positive(cls, value: Optional[tuple[int, ...]]) -> Optional[tuple[int, ...]]:
        if value is not None and (len(value) not in (2, 3) or any(v < 1 for v in value)):
            raise ValueError(f"window_size must be 2 or 3 positive ints (one per spatial axis), got {list(value)}")
        return value


class FinetuneConfig(_Section):
    """A whole fine-tuning run."""

    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    recipe: Optional[str] = None  # a preset of .recipes, merged under these values
    out: Path = Path("runs/finetune")

    @model_validator(mode="after")
    def _balanced_needs_classes(self) -> FinetuneConfig:
        if self.data.sampling == "balanced" and self.model.task != "classification":
            raise ValueError(f"data.sampling: balanced draws classes equally, so it needs model.task: "
                             f"classification (got {self.model.task!r}); use data.sampling: shuffle")
        return self


# ------------------------------------------------------------------------------------------------------ YAML


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where ``1e-3`` is a string; configs mean a number, as YAML 1.2 reads it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)[eE][-+]?\d+$|^[-+]?(?:\d[\d_]*\.\d*|\.\d+)$"
               r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """A command-line value read as YAML: ``1e-4`` -> 0.0001, ``[32,64,64]`` -> list, ``true`` -> True."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise MedTransferError(f"cannot parse {text!r} as a YAML value: {exc}") from None


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MedTransferError(f"{path}: no such config file")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as exc:
        raise MedTransferError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MedTransferError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------------------- validation


def _section_at(loc: Iterable[Any], root: type[BaseModel] | None = None) -> type[BaseModel] | None:
    """The config class at a dotted location of ``root`` (default :class:`FinetuneConfig`); None if not a section."""
    cls: type[BaseModel] = root or FinetuneConfig
    for part in loc:
        field = cls.model_fields.get(str(part))
        sub = getattr(field, "annotation", None) if field else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return None
        cls = sub
    return cls


def _unknown_key_message(loc: tuple, key: str, root: type[BaseModel] | None = None) -> str:
    cls = _section_at(loc, root)
    valid = sorted(cls.model_fields) if cls else []
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    where = ".".join(map(str, loc)) or "the top level"
    return f"unknown key {key!r}{hint}; valid keys under {where}: {', '.join(valid)}"


def format_validation_error(exc: ValidationError, root: type[BaseModel] | None = None) -> str:
    lines: list[str] = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        # Union members add their type name to the location (model.pretrained.bool): keep the field path only.
        path = ".".join(str(p) for p in loc if not (isinstance(p, str) and p in ("bool", "str", "int", "float")))
        if err["type"] == "extra_forbidden":
            msg = _unknown_key_message(loc[:-1], str(loc[-1]), root)
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] not in ("missing", "value_error") and not isinstance(err.get("input"), (dict, BaseModel)):
                msg += f" (got {err.get('input')!r})"
        line = f"{path or 'config'}: {msg}"
        if line not in lines:
            lines.append(line)
    return "invalid config:\n  " + "\n  ".join(lines)


def validate(data: Mapping[str, Any]) -> FinetuneConfig:
    """Build a :class:`FinetuneConfig` from plain values (no recipe applied); errors name the field."""
    try:
        return FinetuneConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise MedTransferError(format_validation_error(exc)) from None


def load_config(source: str | os.PathLike | Mapping[str, Any] | FinetuneConfig) -> FinetuneConfig:
    """Read a YAML file or a dict, merge its recipe (if any) under it, validate."""
    if isinstance(source, FinetuneConfig):
        return source
    data = dict(source) if isinstance(source, Mapping) else read_yaml(source)
    return resolve(data)


def resolve(data: Mapping[str, Any]) -> FinetuneConfig:
    """Merge the recipe under the user's values, then validate (errors name the field)."""
    return validate(apply_recipe(data))


def config_to_dict(cfg: FinetuneConfig) -> dict[str, Any]:
    """Plain YAML/JSON-ready values (tuples as lists, paths as strings)."""
    return cfg.model_dump(mode="json")


def dump_config(cfg: FinetuneConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically (a reader never sees half a file)."""
    from ..weights.io import atomic_write

    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    return atomic_write(path, lambda tmp: tmp.write_text(text))


# -------------------------------------------------------------------------------------------------- overrides


def _set_dotted(data: dict[str, Any], key: str, value: Any, root: type[BaseModel] | None = None) -> None:
    parts = key.split(".")
    if not all(parts):
        raise MedTransferError(f"override {key!r}: empty part in the dotted key")
    cls: type[BaseModel] | None = root or FinetuneConfig
    node = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if cls is not None:  # inside a typed section: the key must be one of its fields
            if part not in cls.model_fields:
                raise MedTransferError(f"override {key!r}: {_unknown_key_message(tuple(parts[:depth]), part, root)}")
            sub = cls.model_fields[part].annotation
            cls = sub if isinstance(sub, type) and issubclass(sub, BaseModel) else None
        if last:
            node[part] = value
        else:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {} if child is None else child
                if not isinstance(child, dict):
                    raise MedTransferError(f"override {key!r}: {'.'.join(parts[:depth + 1])} is not a mapping")
                node[part] = child
            node = child


def apply_overrides(
    cfg: FinetuneConfig | Mapping[str, Any], overrides: Iterable[str]
) -> FinetuneConfig:
    """Apply ``section.key=value`` strings (values read as YAML) and validate.

    Given a mapping (a config before its recipe is merged), the overrides land in it and the recipe is resolved
    after, so ``recipe=...`` and ``model.task=...`` work. Given a resolved :class:`FinetuneConfig`, the recipe was
    already merged, so changing ``recipe`` or ``model.task`` (which selects the recipe's task-dependent parts) is
    refused: pass them before resolving (in the file, ``--recipe``, ``--task``).
    """
    resolved = isinstance(cfg, FinetuneConfig)
    data = config_to_dict(cfg) if resolved else _deep_copy(cfg)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise MedTransferError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-4")
        if resolved and cfg.recipe is not None and key in ("recipe", "model.task", "model"):
            raise MedTransferError(
                f"override {item!r}: the recipe {cfg.recipe!r} is already merged; set {key} before resolving the config"
            )
        _set_dotted(data, key, parse_value(text))
    return validate(data) if resolved else load_config(data)


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def config_data(source: Any, root: type[BaseModel], overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Plain values of a config given as a ``root`` instance, a mapping or a YAML file, with ``key=value``
    overrides applied (keys checked against ``root``'s fields); validation is the caller's."""
    if isinstance(source, root):
        data = source.model_dump(mode="json")
    elif isinstance(source, Mapping):
        data = _deep_copy(source)
    else:
        data = read_yaml(source)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise MedTransferError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-4")
        _set_dotted(data, key.strip(), parse_value(text), root)
    return data



# ---------------------------------------------------------------------------------------------------- resume

# What a resumed run may change: how long it goes on, how many loader processes feed it (the data order derives
# from (seed, epoch) alone) and how often last.pt is written. Anything else would either not be honoured (the
# optimiser, schedule and weights come from last.pt) or would make the run's files describe a run that did not happen.
RESUME_MAY_CHANGE = ("train.max_steps", "train.max_epochs", "data.workers", "train.save_last")
_LENGTH = ("train.max_steps", "train.max_epochs")


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def config_changes(saved: BaseModel, new: BaseModel) -> list[tuple[str, Any, Any]]:
    """``(dotted field, saved value, new value)`` for every field that differs, ``out`` aside (a run folder is
    where it is, whatever path it was first given as)."""
    old, now = _flat(saved.model_dump(mode="json")), _flat(new.model_dump(mode="json"))
    return [(k, old.get(k), now.get(k)) for k in sorted(set(old) | set(now))
            if k != "out" and old.get(k) != now.get(k)]


def check_resume_config(saved: BaseModel, new: BaseModel, run_dir: Path | str) -> list[tuple[str, Any, Any]]:
    """Refuse a resume whose config differs from the run's saved one in a field resume cannot honour (see
    :data:`RESUME_MAY_CHANGE`); returns the allowed changes. A longer or shorter run is refused too when the
    learning-rate curve is drawn over the whole run (``cosine``/``poly`` without ``schedule.horizon``)."""
    changes = config_changes(saved, new)
    bad = [c for c in changes if c[0] not in RESUME_MAY_CHANGE]
    schedule = getattr(new, "schedule", None)
    whole_run = schedule is not None and schedule.name in ("cosine", "poly") and schedule.horizon is None
    if whole_run:
        bad += [c for c in changes if c[0] in _LENGTH]
    if bad:
        listed = "; ".join(f"{k}: {old!r} in the run, {now!r} now" for k, old, now in bad)
        raise MedTransferError(
            f"{run_dir}: --resume continues the run with its saved config.yaml, and these values differ: {listed}. "
            f"Nothing was written. Resume without them (a resume may change only {', '.join(RESUME_MAY_CHANGE)}"
            f"{'; the length not under a cosine/poly schedule without schedule.horizon' if whole_run else ''}), "
            "or start a new run: another --out, or --overwrite to replace this one")
    return changes
