"""One setup per pretraining method: the samples, the network, the loss and (for Genesis and VolF) the batch
transform that the training loop applies on the device. :data:`SETUPS` maps a method name to its setup."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..errors import DataError, MedTransferError
from .config import PretrainConfig
from .data import CubeArray, LossOnlyMetrics, TwoViews, VolumePatches, fixed_batches
from .prepare import _check_divisible, _load_checked, _loader, _model, _patch, _phantoms, _prepared, _split

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
