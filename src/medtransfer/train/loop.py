"""The one training loop: segmentation and classification, 2D and 3D, single process or DDP under ``torchrun``.

Per micro-batch: forward (under autocast when ``train.amp`` asks for it on CUDA), ``loss / accum_steps``, backward
(through a GradScaler for fp16); every ``accum_steps`` micro-batches (and at the end of an epoch with a remainder):
unscale, clip the global gradient norm (``train.grad_clip``), ``optimizer.step()``, ``schedule.step_batch()``.
Validation every ``val_every`` epochs or steps (``val_interval``) gives the val loss and the task metrics;
``best.pt`` is written when ``monitor`` improves, ``last.pt`` at every validation and at the end, both atomically
and on rank 0 only. ``resume=True`` restores every counter and random generator from ``last.pt`` and, mid-epoch,
replays the epoch's data order up to the batches already done, so a resumed run ends with the same weights, bit for
bit, as an uninterrupted one under deterministic settings.

Data order comes from the loader's sampler: the loop calls ``sampler.set_epoch(epoch)`` (and the batch sampler's)
when it has one; :class:`~medtransfer.train.distributed.EpochShuffleSampler` derives the order from (seed, epoch).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import random
import torch
from torch import nn

from ..errors import MedTransferError
from .checkpoint import load_run_checkpoint, rng_state, save_run_checkpoint, set_rng_state, unwrap_model
from .config import TrainConfig
from .distributed import (
    EpochShuffleSampler,
    all_gather_object,
    init_distributed,
    is_distributed,
    is_main_process,
)
from .optim import encoder_trainable_at, set_encoder_trainable

__all__ = ["FitResult", "fit", "EpochShuffleSampler", "init_distributed", "is_main_process"]

log = logging.getLogger(__name__)
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class FitResult:
    best_metric: Optional[float]  # best value of the monitored metric (None if never validated)
    best_step: int  # optimiser step of the best checkpoint
    last_step: int
    epochs: int
    stopped_early: bool
    run_dir: Path


# ------------------------------------------------------------------------------------------------------ helpers


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _set_deterministic() -> None:
    # cuBLAS needs a fixed workspace for deterministic matmuls (PyTorch "Reproducibility" notes).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def _encoder_norms(model: nn.Module) -> list[nn.Module]:
    prefixes = tuple(getattr(model, "encoder_prefixes", ()) or ())
    return [
        m for name, m in model.named_modules()
        if prefixes and (name + ".").startswith(prefixes) and isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def _len_or_none(obj: Any) -> Optional[int]:
    try:
        return len(obj)
    except TypeError:
        return None


def _set_epoch(loader: Any, epoch: int) -> None:
    """Tell the loader's epoch-seeded parts the epoch: a loader of its own making (``MultiDatasetLoader``) through
    its ``set_epoch``, a DataLoader through its sampler and batch sampler."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
        return
    for attr in ("sampler", "batch_sampler"):
        sampler = getattr(loader, attr, None)
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)


def _forward_kwargs(batch: dict) -> dict[str, Any]:
    """Extra model arguments a batch carries: ``head`` selects a dataset's decoder in multi-dataset training."""
    head = batch.get("head")
    return {} if head is None else {"head": int(head)}


def _better(value: float, best: Optional[float], mode: str) -> bool:
    if value is None or math.isnan(value):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


class _Progress:
    """A rich progress bar on a TTY (rank 0), else nothing."""

    def __init__(self, enabled: bool, total: Optional[int]) -> None:
        self.bar = None
        if not (enabled and sys.stderr.isatty()):
            return
        try:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        except ImportError:
            return
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), transient=False)
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, info="")

    def update(self, step: int, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class _TensorBoard:
    """Scalars to TensorBoard when ``torch.utils.tensorboard`` imports; silently nothing otherwise."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception:  # tensorboard not installed: optional
                self.writer = None

    def log(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = record["step"]
        for key, value in record.items():
            if isinstance(value, dict):
                for k, v in value.items():
                    if isinstance(v, (int, float)):
                        self.writer.add_scalar(f"{key}/{k}", v, step)
            elif isinstance(value, (int, float)) and key not in ("step",):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None  # JSON has no NaN/inf
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    with path.open("a") as fh:
        fh.write(json.dumps(clean(record)) + "\n")


# ----------------------------------------------------------------------------------------------------- the loop


def fit(
    model: nn.Module,
    train_loader: Iterable[dict],
    val_loader: Optional[Iterable[dict]],
    *,
    loss_fn: nn.Module,
    metrics: Any,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    cfg: TrainConfig,
    run_dir: Path,
    monitor: tuple[str, str],
    device: torch.device | str | None = None,
    resume: bool = False,
    progress: bool = True,
    batch_transform: Optional[Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = None,
) -> FitResult:
    """Train ``model`` on ``train_loader``; see the module docstring. Returns a :class:`FitResult`.

    ``batch_transform(image, label) -> (image, label)`` runs on each training batch after it reaches the device
    (pretext corruptions such as Models Genesis' run there, on the GPU when there is one); its random draws use
    torch's global generators, which ``last.pt`` saves, so resuming stays exact. A batch with a ``"head"`` entry
    (multi-dataset pretraining) is passed to the model as ``model(image, head=batch["head"])``.
    """
    monitor_name, monitor_mode = monitor
    if monitor_mode not in ("max", "min"):
        raise ValueError(f"monitor mode must be 'max' or 'min', got {monitor_mode!r}")
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    rank, world = init_distributed()
    main = is_main_process()
    device = _resolve_device(device)
    if cfg.deterministic:
        _set_deterministic()

    model.to(device)
    use_cuda = device.type == "cuda"
    amp_dtype = _AMP_DTYPES.get(cfg.amp) if use_cuda else None
    if cfg.amp != "none" and not use_cuda:
        log.info("train.amp=%s is a no-op on %s; training in float32", cfg.amp, device.type)
    scaler = torch.amp.GradScaler("cuda") if (use_cuda and cfg.amp == "fp16") else None
    channels_last = cfg.channels_last and use_cuda
    if channels_last:
        model.to(memory_format=torch.channels_last)  # 5-D inputs convert per batch; 4-D weights stay compatible

    base = unwrap_model(model)
    freeze = cfg.freeze_encoder_steps
    encoder_norms = _encoder_norms(base) if freeze != 0 else []

    # ------------------------------------------------------------------ state (fresh or resumed)
    step, epoch, batches_done = 0, 0, 0
    best_metric: Optional[float] = None
    best_step, bad_validations = 0, 0
    epoch_rng: Optional[dict] = None
    resumed: Optional[dict] = None
    if resume:
        resumed = load_run_checkpoint(ckpt_dir / "last.pt")
        base.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        schedule.load_state_dict(resumed["schedule"])
        if scaler is not None and resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        step, epoch = int(resumed["step"]), int(resumed["epoch"])
        batches_done = int(resumed.get("batches_done", 0))
        best_metric = resumed["best_metric"]
        best_step, bad_validations = int(resumed["best_step"]), int(resumed["bad_validations"])
    else:
        _seed_everything(cfg.seed + rank)
        if main:  # a fresh run starts a fresh log, and no checkpoint of an earlier run may pass for its own
            for stale in (run_dir / "metrics.jsonl", ckpt_dir / "last.pt", ckpt_dir / "best.pt"):
                stale.unlink(missing_ok=True)

    trainable = encoder_trainable_at(step, freeze)
    if freeze != 0:
        set_encoder_trainable(base, trainable)
    train_model: nn.Module = model
    if is_distributed() and not isinstance(model, nn.parallel.DistributedDataParallel):
        if freeze > 0:  # DDP registers only parameters that require grad at wrap time: wrap with all of them
            set_encoder_trainable(base, True)
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if use_cuda else None,
            # frozen parts, and the idle decoders of multi-dataset training, get no gradient in a step
            find_unused_parameters=freeze > 0 or bool(getattr(base, "has_unused_parameters", False)),
        )
        if freeze != 0:
            set_encoder_trainable(base, trainable)

    def rank_rng(state: dict, key: str) -> Optional[dict]:
        per_rank = state.get(f"{key}_ranks")
        if per_rank and len(per_rank) == world:
            return per_rank[rank]
        return state.get(key)

    def set_train_mode() -> None:
        train_model.train()
        if not trainable:
            for m in encoder_norms:  # a frozen encoder keeps its batch statistics (linear probe)
                m.eval()

    def to_device(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True)
        if channels_last and x.is_floating_point() and x.ndim in (4, 5):
            x = x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
        return x

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=amp_dtype)

    # ------------------------------------------------------------------ validation and checkpoints

    def validate() -> dict[str, float]:
        base.eval()
        metrics.reset()
        loss_sum, count = 0.0, 0
        with torch.no_grad():
            for batch in val_loader:
                image, label = to_device(batch["image"]), batch["label"].to(device)
                with autocast():
                    logits = base(image, **_forward_kwargs(batch))
                logits = logits.float()
                n = int(image.shape[0])
                loss_sum += float(loss_fn(logits, label)) * n
                count += n
                metrics.update(logits, label)
        if is_distributed():
            states = all_gather_object(({k: v.cpu() for k, v in metrics.state().items()}, loss_sum, count))
            metrics.merge([s for r, (s, _, _) in enumerate(states) if r != rank])
            loss_sum, count = sum(s[1] for s in states), sum(s[2] for s in states)
        out = {k: float(v) for k, v in metrics.compute().items()}
        out["loss"] = loss_sum / count if count else float("nan")
        set_train_mode()
        return out

    def save_last() -> None:
        rng = all_gather_object(rng_state())  # every rank's generators, so each resumes its own stream
        erng = all_gather_object(epoch_rng)
        if not main:
            return
        save_run_checkpoint(ckpt_dir / "last.pt", {
            "model": base.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "step": step, "epoch": epoch, "batches_done": batches_done,
            "best_metric": best_metric, "best_step": best_step, "bad_validations": bad_validations,
            "rng": rng[0], "rng_ranks": rng, "epoch_rng": erng[0], "epoch_rng_ranks": erng,
        })

    def save_best(value: float) -> None:
        if main:
            save_run_checkpoint(ckpt_dir / "best.pt", {
                "model": base.state_dict(), "step": step, "epoch": epoch, "metric": value, "monitor": monitor_name,
            })

    # ------------------------------------------------------------------ logging
    tb = _TensorBoard(run_dir, main)
    loss_window: list[float] = []
    wait_time = 0.0
    window_start = time.perf_counter()
    t0 = time.perf_counter()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)

    def write_record(val: Optional[dict[str, float]]) -> None:
        nonlocal loss_window, wait_time, window_start
        elapsed = time.perf_counter() - window_start
        record = {
            "step": step, "epoch": epoch,
            "lr": {str(g.get("name", i)): float(g["lr"]) for i, g in enumerate(optimizer.param_groups)},
            "train_loss": float(np.mean(loss_window)) if loss_window else None,
            "val": val, "time": time.perf_counter() - t0,
            "data_wait": wait_time / elapsed if elapsed > 0 else 0.0,
        }
        if main:
            _append_jsonl(run_dir / "metrics.jsonl", record)
            tb.log(record)
        loss_window, wait_time, window_start = [], 0.0, time.perf_counter()

    def after_validation(val: dict[str, float]) -> tuple[Optional[float], bool]:
        """Track best/bad counters; returns the monitored value and whether to stop early."""
        nonlocal best_metric, best_step, bad_validations
        value = val.get(monitor_name)
        if value is None:
            raise MedTransferError(f"monitor {monitor_name!r} is not among the validation values {sorted(val)}")
        if _better(value, best_metric, monitor_mode):
            best_metric, best_step, bad_validations = value, step, 0
            save_best(value)
        else:
            bad_validations += 1
        stop = cfg.early_stop_patience is not None and bad_validations >= cfg.early_stop_patience
        return value, stop

    # ------------------------------------------------------------------ training
    n_batches = _len_or_none(train_loader)
    max_epochs = cfg.max_epochs if cfg.max_epochs is not None else math.inf
    max_steps = cfg.max_steps if cfg.max_steps is not None else math.inf
    accum = cfg.accum_steps
    total = cfg.max_steps if cfg.max_steps is not None else (
        -(-n_batches // accum) * cfg.max_epochs if n_batches else None)
    bar = _Progress(progress and main, total)
    stopped_early = False
    set_train_mode()
    optimizer.zero_grad(set_to_none=True)

    def optimizer_step() -> None:
        nonlocal step, trainable
        if scaler is not None:
            scaler.unscale_(optimizer)
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(
                [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None], cfg.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step_batch()
        step += 1
        now_trainable = encoder_trainable_at(step, freeze)
        if freeze != 0 and now_trainable != trainable:
            trainable = now_trainable
            set_encoder_trainable(base, trainable)
            set_train_mode()

    try:
        while epoch < max_epochs and step < max_steps and not stopped_early:
            _set_epoch(train_loader, epoch)
            skip = batches_done
            restore_after: Optional[dict] = None
            if resumed is not None:
                start_rng = rank_rng(resumed, "epoch_rng")
                if skip and start_rng is not None:  # replay the epoch's loader draws, then jump to the saved state
                    set_rng_state(start_rng)
                    epoch_rng, restore_after = start_rng, rank_rng(resumed, "rng")
                else:
                    set_rng_state(rank_rng(resumed, "rng"))
                resumed = None
            if skip == 0 or epoch_rng is None:
                epoch_rng = rng_state()  # before iter(): a DataLoader draws its workers' base seed there
            iterator: Iterator[dict] = iter(train_loader)
            for _ in range(skip):
                next(iterator)
            if restore_after is not None:
                set_rng_state(restore_after)
            micro = 0
            epoch_complete = False
            while True:
                t_wait = time.perf_counter()
                try:
                    batch = next(iterator)
                except StopIteration:
                    epoch_complete = True
                    break
                wait_time += time.perf_counter() - t_wait
                image, label = to_device(batch["image"]), batch["label"].to(device)
                if batch_transform is not None:
                    image, label = batch_transform(image, label)
                micro += 1
                batches_done += 1
                sync = micro % accum == 0 or (n_batches is not None and batches_done >= n_batches)
                no_sync = train_model.no_sync if (is_distributed() and not sync) else contextlib.nullcontext
                with no_sync():
                    with autocast():
                        logits = train_model(image, **_forward_kwargs(batch))
                    loss = loss_fn(logits.float(), label)
                    if not torch.isfinite(loss):
                        raise MedTransferError(f"the training loss became {float(loss)} at step {step}; "
                                               "lower optim.lr or set train.grad_clip")
                    scaled = loss / accum
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                loss_window.append(float(loss.detach()))
                if not sync:
                    continue
                optimizer_step()
                micro = 0
                if bar.bar is not None:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    best = "-" if best_metric is None else f"{best_metric:.4f}"
                    bar.update(step, f"loss {np.mean(loss_window):.4f} | best {monitor_name} {best} | "
                               f"{len(loss_window) / elapsed:.1f} it/s | data wait {wait_time / elapsed:.0%}")
                if cfg.val_interval == "step" and val_loader is not None and step % cfg.val_every == 0:
                    val = validate()
                    value, stopped_early = after_validation(val)
                    schedule.observe(value)
                    write_record(val)
                    save_last()
                if stopped_early or step >= max_steps:
                    epoch_complete = n_batches is not None and batches_done >= n_batches
                    break
            if micro:  # an epoch's remainder of micro-batches still updates the weights
                optimizer_step()
            if not epoch_complete:
                break
            value = None
            if (cfg.val_interval == "epoch" and val_loader is not None and (epoch + 1) % cfg.val_every == 0
                    and not stopped_early):
                val = validate()
                value, stopped_early = after_validation(val)
                write_record(val)
            schedule.step_epoch(value)
            epoch += 1
            batches_done = 0
            if value is None and loss_window:
                write_record(None)
            save_last()
        if loss_window:
            write_record(None)
        save_last()
    finally:
        bar.close()
        tb.close()
    return FitResult(best_metric=best_metric, best_step=best_step, last_step=step, epochs=epoch,
                     stopped_early=stopped_early, run_dir=run_dir)
