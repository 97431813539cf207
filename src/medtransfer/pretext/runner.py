"""``medtransfer pretrain``: one runner for the four pretraining methods, through the one training loop.

Per method, a setup (:mod:`.setups`, on the shared helpers of :mod:`.prepare`) builds the samples, the network, the
loss and (for Genesis and VolF) a batch transform that the loop applies on the device, then
:func:`medtransfer.train.loop.fit` trains. The run folder holds ``config.yaml``
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
from pathlib import Path

import torch

from ..errors import MedTransferError
from .config import METHOD_SUMMARY, PretrainConfig, load_pretrain_config
from .data import LossOnlyMetrics
# re-exported: these lived here before the setups moved to their own modules
from .prepare import CT_WINDOWS, DEFAULT_PATCH, DEFAULT_PRESET, PHANTOMS  # noqa: F401
from .setups import SETUPS, Setup

log = logging.getLogger(__name__)

CITATIONS = {
    "genesis": "Zhou et al., Models Genesis, Medical Image Analysis 67, 2021",
    "volf": "Wang et al., MIS-FM: 3D Medical Image Segmentation using Foundation Models Pretrained on a "
            "Large-Scale Unannotated Dataset, arXiv:2306.16925, 2023",
    "med3d": "Chen, Ma, Zheng, Med3D: Transfer Learning for 3D Medical Image Analysis, arXiv:1904.00625, 2019",
    "vdt": "Zhang et al., Advancing 3D Medical Image Analysis with Variable Dimension Transform based Supervised "
           "3D Pre-training, Neurocomputing 529, 2023",
}


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
