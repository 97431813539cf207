"""``medtransfer pretrain``: one runner for the four pretraining methods, through the one training loop.

Per method, a setup builds the samples, the network, the loss and (for Genesis and VolF) a batch transform that the
loop applies on the device, then :func:`medtransfer.train.loop.fit` trains. The run folder holds ``config.yaml``
(resolved), ``env.json`` (versions, git commit, seed, device), ``data.json`` (datasets, split, preprocessing),
``metrics.jsonl``, ``checkpoints/{last,best}.pt`` and the product:

* ``pretrained.safetensors``: the best weights (lowest validation loss; the last ones without validation) in
  medtransfer's format, with a :class:`~medtransfer.zoo.pretrained.PretrainedCfg` (method, data, input contract)
  in its metadata. ``mt.create_model(NAME, pretrained=".../pretrained.safetensors")`` loads it with a full load
  report, and ``medtransfer finetune`` takes its input contract (intensity preset, spacing, patch size) from it.
* med3d also writes ``encoder_medicalnet.pth`` in the published MedicalNet layout (``module.``-prefixed encoder).

| method  | samples                                        | network (default)            | loss                   |
|---------|------------------------------------------------|------------------------------|------------------------|
| genesis | random patches in [0, 1] (genesis_ct) or cubes | 1-class segmentation (UNet3D)| MSE(sigmoid(out), cube)|
| volf    | two views of one volume, fused on the device   | K+1-class segmentation (FMUNet) | Dice + CE (0.5/0.5) |
| med3d   | labelled patches, one dataset per batch        | encoder + conv_seg head each | CE at output size      |
| vdt     | 2D images as 1 x C x H x W volumes             | ResNet3D-18 classification   | CE, label smoothing 0.1|
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..errors import DataError, MedTransferError
from .config import METHOD_SUMMARY, PretrainConfig, load_pretrain_config
from .data import CubeArray, LossOnlyMetrics, TwoViews, VolumePatches, fixed_batches

log = logging.getLogger(__name__)

DEFAULT_PRESET = {"genesis": "genesis_ct", "volf": "volf_ct", "med3d": "medicalnet_mri", "vdt": None}
CT_WINDOWS = ("genesis_ct", "volf_ct")  # method defaults that only make sense on HU
DEFAULT_PATCH = {"genesis": (32, 64, 64), "volf": (64, 128, 128), "med3d": (64, 64, 64), "vdt": (224, 224)}
PHANTOMS = {"n": 8, "seed": 0, "shape": (32, 48, 48), "spacing": (5.0, 5.0, 5.0)}
CITATIONS = {
    "genesis": "Zhou et al., Models Genesis, Medical Image Analysis 67, 2021",
    "volf": "Wang et al., MIS-FM: 3D Medical Image Segmentation using Foundation Models Pretrained on a "
            "Large-Scale Unannotated Dataset, arXiv:2306.16925, 2023",
    "med3d": "Chen, Ma, Zheng, Med3D: Transfer Learning for 3D Medical Image Analysis, arXiv:1904.00625, 2019",
    "vdt": "Zhang et al., Advancing 3D Medical Image Analysis with Variable Dimension Transform based Supervised "
           "3D Pre-training, Neurocomputing 529, 2023",
}


@dataclass
class Setup:
    """What a method hands to the loop, and what it exports afterwards."""

    model: torch.nn.Module
    train_loader: Any
    val_loader: Any
    loss_fn: torch.nn.Module
    metrics: Any = field(default_factory=LossOnlyMetrics)
    batch_transform: Optional[Callable] = None
    export: Callable[[torch.nn.Module], dict[str, torch.Tensor]] = lambda m: m.state_dict()
    task: str = "segmentation"
    num_classes: Optional[int] = None
    data: dict[str, Any] = field(default_factory=dict)  # written to data.json and the PretrainedCfg
    extra_exports: list[Callable[[torch.nn.Module, Path], Path]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------ data


def _phantoms(out: Path, with_2d: bool = False) -> Path:
    from ..data.phantoms import write_phantom_dataset

    root = out / "phantoms"
    marker = root / ("findings2d.csv" if with_2d else "dataset.json")
    if not marker.is_file():
        p = PHANTOMS
        write_phantom_dataset(root, p["n"], p["seed"], shape=p["shape"], spacing=p["spacing"], with_2d=with_2d)
    return root


def _load_checked(path: Path, cfg: PretrainConfig, *, labelled: bool):
    from ..train.finetune import checked_dataset

    dataset = checked_dataset(path, cfg.data.format, cfg.data.options)
    if labelled and dataset.task == "segmentation" and any(c.label is None for c in dataset.cases):
        missing = [c.case_id for c in dataset.cases if c.label is None][:5]
        raise DataError(f"{path}: method {cfg.method} needs a label map for every case; none for {missing}")
    return dataset


def _split(ids: list[str], cfg: PretrainConfig) -> tuple[list[str], list[str]]:
    from ..data.splits import make_split

    if cfg.data.val_fraction == 0 or len(ids) < 2:
        return list(ids), []
    split = make_split(ids, val=cfg.data.val_fraction, seed=cfg.train.seed)
    if not split.val:  # a tiny dataset: keep one case aside
        return split.train[:-1], split.train[-1:]
    return split.train, split.val


def _prepared(path: Path, cfg: PretrainConfig, out: Path, progress: bool, *, labelled: bool, name: str = "cache"):
    from ..data.cache import PreparedCache
    from ..data.modality import dataset_modality
    from ..data.preprocess import build_pipeline

    dataset = _load_checked(path, cfg, labelled=labelled)
    if dataset.spatial_dims != 3:
        raise DataError(f"{path}: method {cfg.method} pretrains 3D networks on 3D volumes; this dataset is "
                        f"{dataset.spatial_dims}D (use method vdt for 2D images)")
    modality = dataset_modality(dataset)
    preset = cfg.data.preset or DEFAULT_PRESET[cfg.method]
    if cfg.data.preset is None and modality.value == "MRI" and preset in CT_WINDOWS:
        # an HU window on MRI keeps a sliver of the intensities; these methods need a bounded range, not a z-score
        log.warning("%s: the data is MRI (%s) but method %s's default preset %r is a CT window; using 'percentile' "
                    "(0.5-99.5 percentiles to [0, 1]) instead. Set data.preset to choose", path, modality.source,
                    cfg.method, preset)
        preset = "percentile"
    pipeline = build_pipeline(preset=preset, spacing=cfg.data.spacing)
    root = (Path(cfg.data.cache_dir) / name) if cfg.data.cache_dir else out / name
    cache = PreparedCache(root)
    cache.prepare(dataset, pipeline, workers=max(1, cfg.data.workers), progress=progress)
    train, val = _split([c.case_id for c in dataset.cases], cfg)
    info = {"path": str(path), "format": dataset.format, "name": dataset.name, "cases": len(dataset.cases),
            "train": train, "val": val, "preset": preset, "spacing": list(cfg.data.spacing or []) or None,
            "modality": str(modality), "modality_source": modality.source,
            "pipeline": pipeline.to_dict(), "labels": {str(k): v for k, v in dataset.labels.items()}}
    return dataset, cache, train, val, info


def _patch(cfg: PretrainConfig) -> tuple[int, ...]:
    patch = tuple(cfg.data.patch_size or DEFAULT_PATCH[cfg.method])
    dims = 2 if cfg.method == "vdt" else 3
    if len(patch) != dims:
        raise MedTransferError(f"data.patch_size: method {cfg.method} needs {dims} values, got {list(patch)}")
    return patch


def _loader(dataset, cfg: PretrainConfig, *, shuffle: bool = True, seed: int = 0):
    from ..train.distributed import EpochShuffleSampler
    from ..train.torchdata import make_loader

    # training only: a lone last sample breaks BatchNorm; validation keeps every case
    lone = shuffle and len(dataset) > cfg.data.batch_size and len(dataset) % cfg.data.batch_size == 1
    sampler = EpochShuffleSampler(len(dataset), seed=seed) if shuffle else None
    return make_loader(dataset, batch_size=cfg.data.batch_size, sampler=sampler, workers=cfg.data.workers,
                       drop_last=lone)


def _check_divisible(model, patch: tuple[int, ...], name: str) -> None:
    from ..train.finetune import model_divisor

    div = model_divisor(model, len(patch))
    if any(p % d for p, d in zip(patch, div)):
        raise MedTransferError(f"data.patch_size {list(patch)} must be a multiple of {list(div)} on every axis for "
                               f"{name} (its network stride)")


def _model(cfg: PretrainConfig, **kwargs):
    from ..zoo.builder import create_model

    return create_model(cfg.model.name, pretrained=cfg.model.pretrained or False, **cfg.model.arch, **kwargs)


# ------------------------------------------------------------------------------------------------------ methods


def _setup_genesis(cfg: PretrainConfig, out: Path, progress: bool) -> Setup:
    from .genesis import GenesisRates, RestorationLoss, corrupt

    opts = dict(cfg.options)
    valid = set(GenesisRates.__dataclass_fields__)
    unknown = sorted(set(opts) - valid)
    if unknown:
        raise MedTransferError(f"options: unknown Models Genesis option(s) {unknown}; valid: {', '.join(sorted(valid))}")
    opts.setdefault("depth_dim", 2)  # medtransfer batches are (N, 1, D, H, W): depth is dim 2
    patch = _patch(cfg)
    path = cfg.data.paths[0] if cfg.data.paths else _phantoms(out)
    seed = cfg.train.seed
    if path.suffix == ".npy":
        from ..data.cubes import read_cube_file

        cubes = read_cube_file(path)
        if tuple(cubes.shape[1:]) != patch and cfg.data.patch_size is not None:
            raise DataError(f"{path}: cubes are {list(cubes.shape[1:])} but data.patch_size is {list(patch)}")
        patch = tuple(int(s) for s in cubes.shape[1:])
        if cubes.min() < 0 or cubes.max() > 1:
            raise DataError(f"{path}: Models Genesis cubes must hold values in [0, 1]; write them with "
                            "`medtransfer data cubes`")
        ids = [str(i) for i in range(len(cubes))]
        train, val = _split(ids, cfg)
        train_ds = CubeArray(cubes, [int(i) for i in train], seed=seed)
        val_ds = CubeArray(cubes, [int(i) for i in val], seed=seed + 1) if val else None
        info = {"path": str(path), "format": "cubes", "cubes": len(cubes), "train": len(train), "val": len(val),
                "preset": "genesis_ct", "spacing": None, "modality": "CT", "modality_source": "Models Genesis cubes "
                "are CT windowed to [-1000, 1000] HU"}
    else:
        _, cache, train, val, info = _prepared(Path(path), cfg, out, progress, labelled=False)
        train_ds = VolumePatches(cache, train, patch, seed=seed)
        val_ds = VolumePatches(cache, val, patch, seed=seed + 1) if val else None
    model = _model(cfg, task="segmentation", num_classes=1, in_channels=1)
    _check_divisible(model, patch, cfg.model.name)

    def transform(image, label, generator=None):
        return corrupt(image, generator=generator, **opts)

    val_loader = (fixed_batches(val_ds, batch_size=cfg.data.batch_size, count=cfg.data.val_batches,
                                transform=transform, seed=seed + 2) if val_ds is not None else None)
    info.update(patch_size=list(patch), options=opts)
    return Setup(model=model, train_loader=_loader(train_ds, cfg, seed=seed), val_loader=val_loader,
                 loss_fn=RestorationLoss(), batch_transform=transform, num_classes=1, data=info)


def _setup_volf(cfg: PretrainConfig, out: Path, progress: bool) -> Setup:
    from ..train.losses import build_loss
    from ..train.metrics import build_metrics
    from .volume_fusion import VolumeFusion

    opts = dict(cfg.options)
    fusion_keys = {"num_classes", "foreground_ratio", "block_min", "block_max", "shuffle"}
    view_keys = {"scale", "aug_mode", "flip_rate", "contrast_low", "contrast_high", "gamma", "invert_rate", "eps"}
    unknown = sorted(set(opts) - fusion_keys - view_keys - {"region_scale"})
    if unknown:
        raise MedTransferError(f"options: unknown Volume Fusion option(s) {unknown}; valid: "
                               f"{', '.join(sorted(fusion_keys | view_keys | {'region_scale'}))}")
    fusion = VolumeFusion(**{k: v for k, v in opts.items() if k in fusion_keys})
    views = {k: v for k, v in opts.items() if k in view_keys}
    classes = 2 if opts.get("shuffle") else int(opts.get("num_classes", 5))
    patch = _patch(cfg)
    seed = cfg.train.seed
    path = cfg.data.paths[0] if cfg.data.paths else _phantoms(out)
    _, cache, train, val, info = _prepared(Path(path), cfg, out, progress, labelled=False)
    kw = dict(region_scale=float(opts.get("region_scale", 1.5)), view_options=views)
    train_ds = TwoViews(cache, train, patch, seed=seed, **kw)
    val_ds = TwoViews(cache, val, patch, seed=seed + 1, **kw) if val else None
    model = _model(cfg, task="segmentation", num_classes=classes, in_channels=1)
    _check_divisible(model, patch, cfg.model.name)

    def transform(image, label, generator=None):
        return fusion(image, label, generator=generator)

    val_loader = (fixed_batches(val_ds, batch_size=cfg.data.batch_size, count=cfg.data.val_batches,
                                transform=transform, seed=seed + 2) if val_ds is not None else None)
    loss = build_loss("dice_ce", task="segmentation", num_classes=classes, lambda_dice=0.5, lambda_ce=0.5)
    info.update(patch_size=list(patch), options=opts)
    return Setup(model=model, train_loader=_loader(train_ds, cfg, seed=seed), val_loader=val_loader, loss_fn=loss,
                 metrics=build_metrics("segmentation", num_classes=classes), batch_transform=transform,
                 num_classes=classes, data=info)


def _setup_med3d(cfg: PretrainConfig, out: Path, progress: bool) -> Setup:
    from ..train.torchdata import PatchDataset
    from ..zoo.builder import create_model
    from .multi_dataset import DownsampledCE, MultiDatasetLoader, MultiDatasetNet, export_medicalnet

    unknown = sorted(set(cfg.options) - {"fg_ratio"})
    if unknown:
        raise MedTransferError(f"options: unknown med3d option(s) {unknown}; valid: fg_ratio")
    patch = _patch(cfg)
    seed = cfg.train.seed
    paths = [Path(p) for p in cfg.data.paths] or [_phantoms(out)]
    train_loaders, val_loaders, heads, infos = [], [], [], []
    for k, path in enumerate(paths):
        dataset, cache, train, val, info = _prepared(path, cfg, out, progress, labelled=True, name=f"cache_{k}")
        if dataset.task != "segmentation":
            raise DataError(f"{path}: med3d pretrains on segmentation datasets; this one is {dataset.task}")
        classes = (max(dataset.labels) + 1) if dataset.labels else 2
        heads.append(int(classes))
        fg = float(cfg.options.get("fg_ratio", 0.5))
        train_loaders.append(_loader(PatchDataset(cache, train, patch, seed=seed + 10 * k, fg_ratio=fg), cfg,
                                     seed=seed + 10 * k))
        if val:
            val_loaders.append(_loader(PatchDataset(cache, val, patch, seed=seed + 10 * k + 1, fg_ratio=fg), cfg,
                                       shuffle=False))
        else:
            val_loaders.append(None)
        infos.append({**info, "head": k, "classes": int(classes)})
    encoder = create_model(cfg.model.name, task="features", pretrained=cfg.model.pretrained or False,
                           **cfg.model.arch)
    _check_divisible(encoder, patch, cfg.model.name)
    net = MultiDatasetNet(encoder, heads)
    net.model_name = getattr(encoder, "model_name", cfg.model.name)
    net.encoder_prefixes = ("encoder.",)  # optim.encoder_lr_mult and freezing act on the shared encoder
    net.has_unused_parameters = len(heads) > 1  # under DDP, the idle decoders of a step get no gradient
    val_loader = None
    if any(v is not None for v in val_loaders):
        val_loader = _HeadedVal([(k, v) for k, v in enumerate(val_loaders) if v is not None])

    def medicalnet_file(model, run_dir: Path) -> Path:
        return export_medicalnet(model, run_dir / "encoder_medicalnet.pth")

    extra = [medicalnet_file] if cfg.model.name.startswith("medicalnet_") else []
    data = {"datasets": infos, "patch_size": list(patch), "preset": infos[0]["preset"], "spacing": infos[0]["spacing"],
            "head_classes": heads}
    return Setup(model=net, train_loader=MultiDatasetLoader(train_loaders, seed=seed), val_loader=val_loader,
                 loss_fn=DownsampledCE(), export=lambda m: m.encoder_state_dict(), task="features", data=data,
                 extra_exports=extra)


class _HeadedVal:
    """Validation batches of several datasets, each tagged with its decoder (``head``)."""

    def __init__(self, loaders: list[tuple[int, Any]]) -> None:
        self.loaders = loaders

    def __iter__(self):
        for k, loader in self.loaders:
            for batch in loader:
                yield {**batch, "head": k}


def _setup_vdt(cfg: PretrainConfig, out: Path, progress: bool) -> Setup:
    from ..train.metrics import build_metrics
    from .vdt import VDTImageDataset, VDTTransform, vdt_loss

    opts = dict(cfg.options)
    valid = {"channels", "channel_shuffle", "scale", "ratio", "flip_rate", "mean", "std", "label_smoothing"}
    unknown = sorted(set(opts) - valid)
    if unknown:
        raise MedTransferError(f"options: unknown VDT option(s) {unknown}; valid: {', '.join(sorted(valid))}")
    smoothing = float(opts.pop("label_smoothing", 0.1))
    patch = _patch(cfg)
    if patch[0] != patch[1]:
        raise MedTransferError(f"data.patch_size: VDT crops square images, got {list(patch)}")
    if cfg.data.paths:
        path = Path(cfg.data.paths[0])
    else:
        path = _vdt_phantoms(out)
    dataset = _load_checked(path, cfg, labelled=True)
    if dataset.task != "classification" or dataset.spatial_dims != 2:
        raise DataError(f"{path}: method vdt needs a 2D classification dataset (images with one class each), got "
                        f"a {dataset.spatial_dims}D {dataset.task} dataset")
    targets = [c.target for c in dataset.cases]
    if any(isinstance(t, (list, tuple)) for t in targets):
        raise DataError(f"{path}: method vdt trains single-label classes; this dataset is multi-label")
    classes = max(2, int(max(targets)) + 1)
    train, val = _split([c.case_id for c in dataset.cases], cfg)
    by_id = {c.case_id: c for c in dataset.cases}
    seed = cfg.train.seed
    train_ds = VDTImageDataset([by_id[i] for i in train], VDTTransform(patch[0], train=True, **opts), seed=seed)
    val_loader = None
    if val:
        val_ds = VDTImageDataset([by_id[i] for i in val], VDTTransform(patch[0], train=False, **opts), seed=seed)
        val_loader = _loader(val_ds, cfg, shuffle=False)
    channels = int(opts.get("channels", 3))
    model = _model(cfg, task="classification", num_classes=classes, in_channels=1)
    data = {"path": str(path), "format": dataset.format, "cases": len(dataset.cases), "train": train, "val": val,
            "classes": classes, "input_size": [channels, *patch], "patch_size": None, "preset": None, "spacing": None,
            "options": {**opts, "label_smoothing": smoothing}}
    return Setup(model=model, train_loader=_loader(train_ds, cfg, seed=seed), val_loader=val_loader,
                 loss_fn=vdt_loss(smoothing), metrics=build_metrics("classification", num_classes=classes),
                 task="classification", num_classes=classes, data=data)


def _vdt_phantoms(out: Path) -> Path:
    """The 2D phantom radiographs with one class each (the first finding), as an ``image,class`` CSV."""
    from ..weights.io import atomic_write

    root = _phantoms(out, with_2d=True)
    target = root / "vdt_classes.csv"
    if not target.is_file():
        rows = (root / "findings2d.csv").read_text().splitlines()
        lines = ["image,class"] + [f"{r.split(',')[0]},{int(float(r.split(',')[1]))}" for r in rows[1:]]
        atomic_write(target, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    return target


SETUPS = {"genesis": _setup_genesis, "volf": _setup_volf, "med3d": _setup_med3d, "vdt": _setup_vdt}


# ------------------------------------------------------------------------------------------------------ run


def pretrained_cfg_for(cfg: PretrainConfig, setup: Setup, steps: str, file_name: str):
    """The :class:`PretrainedCfg` an output file carries: where it came from and the input it expects."""
    from ..zoo.builder import split_name
    from ..zoo.pretrained import PretrainedCfg

    data = setup.data
    preset = data.get("preset")
    where = ", ".join(d["path"] for d in data["datasets"]) if "datasets" in data else data.get("path", "")
    # the modality of the pretraining data, so that fine-tuning can tell a CT start on MRI data (and the reverse)
    found = sorted({d.get("modality", "unknown") for d in data.get("datasets", [data])} - {"unknown"})
    modality = " and ".join(found) or ("2D images" if setup.task == "classification" else "unknown")
    spacing = data.get("spacing")
    patch = data.get("patch_size")
    return PretrainedCfg(
        model=split_name(cfg.model.name)[0], tag=f"pretrain_{cfg.method}", file_name=file_name, url="",
        source="medtransfer", arch_kwargs=dict(getattr(setup.model, "arch_kwargs", {}) or {}),
        num_classes=setup.num_classes if setup.task != "features" else None, modality=modality, in_channels=1,
        intensity=f"preset {preset}" if preset else "VDT: 0..255 pixels, shared mean 114.495 / std 57.63",
        spacing=tuple(spacing) if spacing else None, patch_size=tuple(patch) if patch else None,
        pretraining=f"{cfg.method} ({METHOD_SUMMARY[cfg.method]}) on {where}, {steps}, seed {cfg.train.seed}",
        preset=preset, citation=CITATIONS[cfg.method],
        notes=f"trained on 1 x {' x '.join(map(str, data['input_size']))} volumes (2D images, channels as slices)"
        if data.get("input_size") else "",
    )


def export_pretrained(cfg: PretrainConfig, setup: Setup, run_dir: Path, steps: int) -> Path:
    """Write ``pretrained.safetensors`` from the best checkpoint (else the model as trained)."""
    from .. import provenance
    from ..train.checkpoint import read_run_checkpoint
    from ..weights.io import save_safetensors

    model = setup.model
    best = run_dir / "checkpoints" / "best.pt"
    if best.is_file():
        saved = read_run_checkpoint(best, advice="delete it to export the last weights instead")
        model.load_state_dict(saved["model"])
        trained = f"best validation loss at step {int(saved.get('step', steps))} of {steps} optimiser steps"
    else:
        trained = f"{steps} optimiser steps"
    pcfg = pretrained_cfg_for(cfg, setup, trained, "pretrained.safetensors")
    arch = dict(getattr(model, "arch_kwargs", None) or getattr(getattr(model, "encoder", None), "arch_kwargs", {})
                or {})
    meta = {"pretrained_cfg": pcfg.to_dict(), "arch_kwargs": arch, "in_channels": 1, "method": cfg.method,
            "model": pcfg.model, "versions": provenance.versions()}
    path = save_safetensors(setup.export(model), run_dir / "pretrained.safetensors", meta)
    for extra in setup.extra_exports:
        extra(model, run_dir)
    return path


def run_pretrain(cfg: PretrainConfig | str | Path | dict, *, resume: bool = False, progress: bool = True,
                 overrides: tuple[str, ...] = (), overwrite: bool = False) -> Path:
    """Pretrain as ``cfg`` says; returns the run folder (see the module docstring for its content).

    The run-folder rule of :func:`medtransfer.train.finetune.run_finetune`: a new run needs a new or empty folder
    (``overwrite`` clears an old run there first); ``resume`` continues the run with its saved ``config.yaml``
    (``cfg`` may be the run folder itself; changes other than ``RESUME_MAY_CHANGE`` are refused before anything is
    written)."""
    from .. import provenance
    from ..train import loop
    from ..train.checkpoint import check_run_folder, clear_run, load_run_checkpoint
    from ..train.config import check_resume_config, read_yaml
    from ..train.config import dump_config as _dump
    from ..train.finetune import _write_json, write_env
    from ..train.distributed import barrier, init_distributed
    from ..train.optim import build_optimizer, build_scheduler

    if resume and isinstance(cfg, (str, Path)) and Path(cfg).is_dir():  # the run folder alone
        if not (Path(cfg) / "config.yaml").is_file():
            raise MedTransferError(f"{cfg}: no config.yaml, so no run to resume; start it without --resume")
        cfg = {**read_yaml(Path(cfg) / "config.yaml"), "out": str(cfg)}
    cfg = load_pretrain_config(cfg, overrides)
    out = Path(cfg.out)
    if rank_zero():  # under torchrun the other ranks may start after rank 0 has begun writing the run
        check_run_folder(out, resume=resume, overwrite=overwrite, command="pretrain")
    changed = []
    if resume:
        changed = check_resume_config(load_pretrain_config(out / "config.yaml"), cfg, out)
        for key, old, new in changed:
            log.warning("resume: %s %r -> %r (config.yaml records the new value)", key, old, new)
        cfg = cfg.model_copy(update={"out": out})
        load_run_checkpoint(out / "checkpoints" / "last.pt")  # a missing, cut or unsafe last.pt fails here
    elif overwrite and rank_zero():
        clear_run(out, keep=Path(cfg.data.cache_dir) if cfg.data.cache_dir else None)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = init_distributed()
    main = rank == 0
    if world > 1 and not main:
        barrier()  # rank 0 writes phantoms and fills the caches first
    torch.manual_seed(cfg.train.seed)
    setup = SETUPS[cfg.method](cfg, out, progress and main)
    if world > 1 and main:
        barrier()
    model = setup.model
    optimizer = build_optimizer(model, cfg.optim)
    steps_per_epoch = max(1, -(-len(setup.train_loader) // cfg.train.accum_steps))
    total = cfg.train.max_steps
    if cfg.train.max_epochs is not None:
        total = min(total or 10**12, cfg.train.max_epochs * steps_per_epoch)
    schedule = build_scheduler(optimizer, cfg.schedule, steps_per_epoch=steps_per_epoch, total_steps=total, mode="min")
    device = loop._resolve_device(None)
    if main:
        if not resume or changed:
            _dump(cfg, out / "config.yaml")
        if not resume:
            _write_json(out / "data.json", setup.data)
        write_env(out, {**provenance.versions(), "device": str(device), "seed": cfg.train.seed, "world_size": world,
                        "command": sys.argv, "method": cfg.method}, resume)
    monitor = ("loss", "min") if cfg.train.monitor == "loss" else _task_monitor(setup)
    result = loop.fit(model, setup.train_loader, setup.val_loader, loss_fn=setup.loss_fn, metrics=setup.metrics,
                      optimizer=optimizer, schedule=schedule, cfg=cfg.train, run_dir=out, monitor=monitor,
                      device=device, resume=resume, progress=progress, batch_transform=setup.batch_transform)
    if main:
        model.to("cpu")
        path = export_pretrained(cfg, setup, out, result.last_step)
        log.info("pretrained weights: %s", path)
    return out


def rank_zero() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def _task_monitor(setup: Setup) -> tuple[str, str]:
    from ..train.metrics import metric_for

    if setup.task in ("segmentation", "classification") and not isinstance(setup.metrics, LossOnlyMetrics):
        return metric_for(setup.task)
    raise MedTransferError("train.monitor=metric: this method is scored by its loss only; use train.monitor=loss")
