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
from .checkpoint import (
    TrainingInterrupted,
    load_run_checkpoint,
    remove_stale_temps,
    rng_state,
    save_run_checkpoint,
    set_rng_state,
    unwrap_model,
)
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


PROGRESS_LINES = 10  # plain progress: about this many evenly spaced lines per run when the step count is known
PROGRESS_INTERVAL_S = 30.0  # ... and never longer apart than this


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


class _Progress:
    """Training progress on rank 0: a rich bar when stderr is a terminal; elsewhere (a log file, SLURM, a pipe),
    where a bar cannot redraw, plain lines on stderr, flushed as they are written:

    * one at the first step, then one every ``total // PROGRESS_LINES`` steps and at least every
      ``PROGRESS_INTERVAL_S`` seconds: ``step 40/200 epoch 2/10 loss 0.412 lr 0.001 0.31 s/it eta 49s`` (loss:
      the mean over the steps since the previous line; s/it: over those steps, validation time excluded; eta:
      from the mean time per step so far, validations included);
    * one at each validation: the same, with ``val loss 0.52 dice_mean 0.61 (best 0.61 at step 40)``;
    * one at the end: ``done: 200 steps in 1m 02s, best dice_mean 0.61 at step 160``.
    """

    def __init__(self, enabled: bool, total: Optional[int], *, epochs: Optional[int] = None,
                 monitor: str = "") -> None:
        self.bar, self.lines = None, False
        self.total, self.epochs, self.monitor = total, epochs, monitor
        if not enabled:
            return
        if sys.stderr.isatty():
            try:
                from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
            except ImportError:
                pass
            else:
                self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                    TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                                    TimeElapsedColumn(), transient=False)
                self.bar.start()
                self.task = self.bar.add_task("train", total=total, info="")
                return
        self.lines = True
        self.every = max(1, total // PROGRESS_LINES) if total else None
        self.t_start = self.t_line = self.t_step = time.perf_counter()
        self.first_step: Optional[int] = None
        self.step_no, self.epoch = 0, 0
        self.losses: list[float] = []  # mean loss of each step since the previous line
        self.lrs: dict[str, float] = {}

    def update(self, step: int, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)

    def after_step(self, step: int, epoch: int, loss: float, lrs: dict[str, float]) -> None:
        """One optimiser step done (``loss``: its mean over the micro-batches); prints a line when one is due."""
        if not self.lines:
            return
        now = time.perf_counter()
        if self.first_step is None:
            self.first_step = step - 1
        self.step_no, self.epoch, self.lrs, self.t_step = step, epoch, lrs, now
        self.losses.append(loss)
        if step == self.first_step + 1 or (self.every and step % self.every == 0) or now - self.t_line >= PROGRESS_INTERVAL_S:
            self._print()

    def validation(self, val: dict[str, float], best: Optional[float], best_step: int) -> None:
        if not self.lines:
            return
        parts = [f"val loss {val.get('loss', float('nan')):.4g}"]
        if self.monitor and self.monitor != "loss" and self.monitor in val:
            parts.append(f"{self.monitor} {val[self.monitor]:.4g}")
        if best is not None:
            parts.append(f"(best {best:.4g} at step {best_step})")
        self._print(" ".join(parts))

    def _print(self, val: str = "") -> None:
        head = f"step {self.step_no}" + (f"/{self.total}" if self.total else "")
        head += f" epoch {self.epoch + 1}" + (f"/{self.epochs}" if self.epochs else "")
        parts = [head]
        done_here = self.step_no - (self.first_step or 0)
        if self.losses:
            parts.append(f"loss {float(np.mean(self.losses)):.4g}")
            values = sorted(set(self.lrs.values()))
            if len(values) == 1:
                parts.append(f"lr {values[0]:.3g}")
            elif values:
                parts.append("lr " + " ".join(f"{k} {v:.3g}" for k, v in self.lrs.items()))
        if val:
            parts.append(val)
        if self.losses:
            parts.append(f"{(self.t_step - self.t_line) / len(self.losses):.3g} s/it")
        if self.total and done_here > 0:
            remaining = max(self.total - self.step_no, 0) * (time.perf_counter() - self.t_start) / done_here
            parts.append(f"eta {_duration(remaining)}")
        print(" ".join(parts), file=sys.stderr, flush=True)
        self.losses, self.t_line = [], time.perf_counter()

    def close(self, *, done: bool = False, best: Optional[float] = None, best_step: int = 0) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.lines and done:
            ran = self.step_no - (self.first_step or 0)
            line = f"done: {self.step_no} steps"
            if ran > 0:
                line += f" in {_duration(time.perf_counter() - self.t_start)}"
                line += f" ({ran} in this process)" if ran != self.step_no else ""
            if best is not None:
                line += f", best {self.monitor} {best:.4g} at step {best_step}"
            print(line, file=sys.stderr, flush=True)


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


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to ``step`` (the checkpoint resumed from), so that the steps logged after it by the
    interrupted process, which the resumed one runs again, are not logged twice; a half-written last line goes too."""
    from ..weights.io import atomic_write

    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            break  # a kill mid-append: this line and anything after it is not a record
        if int(record["step"]) > step:
            break
        kept.append(line + "\n")
    atomic_write(path, lambda tmp: tmp.write_text("".join(kept)))


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
    ``progress`` (rank 0 only): a rich bar when stderr is a terminal, else plain periodic lines on stderr for logs
    and batch jobs (see :class:`_Progress`); False prints nothing.
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
    if main:
        remove_stale_temps(run_dir, ckpt_dir)  # a kill inside atomic_write leaves its temporary file
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
        if main:
            _truncate_metrics(run_dir / "metrics.jsonl", step)
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

    saved_step: Optional[int] = step if resume else None

    def save_last() -> None:
        nonlocal saved_step
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
        saved_step = step

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
    by_epochs = -(-n_batches // accum) * cfg.max_epochs if n_batches and cfg.max_epochs is not None else None
    limits = [t for t in (cfg.max_steps, by_epochs) if t is not None]
    total = min(limits) if limits else None  # whichever limit comes first
    epochs_bind = cfg.max_steps is None or (by_epochs is not None and by_epochs <= cfg.max_steps)
    bar = _Progress(progress and main, total, epochs=cfg.max_epochs if epochs_bind else None, monitor=monitor_name)
    completed = False
    stopped_early = False
    set_train_mode()
    optimizer.zero_grad(set_to_none=True)

    def optimizer_step(micro_batches: int) -> None:
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
        bar.after_step(step, epoch, float(np.mean(loss_window[-micro_batches:])),
                       {str(g.get("name", i)): float(g["lr"]) for i, g in enumerate(optimizer.param_groups)})
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
                optimizer_step(micro)
                micro = 0
                if bar.bar is not None:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    best = "-" if best_metric is None else f"{best_metric:.4f}"
                    bar.update(step, f"loss {np.mean(loss_window):.4f} | best {monitor_name} {best} | "
                               f"{len(loss_window) / elapsed:.1f} it/s | data wait {wait_time / elapsed:.0%}")
                if cfg.val_interval == "step" and val_loader is not None and step % cfg.val_every == 0:
                    val = validate()
                    value, stopped_early = after_validation(val)
                    bar.validation(val, best_metric, best_step)
                    schedule.observe(value)
                    write_record(val)
                    save_last()
                if stopped_early or step >= max_steps:
                    epoch_complete = n_batches is not None and batches_done >= n_batches
                    break
            if micro:  # an epoch's remainder of micro-batches still updates the weights
                optimizer_step(micro)
            if not epoch_complete:
                break
            value = None
            if (cfg.val_interval == "epoch" and val_loader is not None and (epoch + 1) % cfg.val_every == 0
                    and not stopped_early):
                val = validate()
                value, stopped_early = after_validation(val)
                bar.validation(val, best_metric, best_step)
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
        completed = True
    except KeyboardInterrupt as exc:
        if isinstance(exc, TrainingInterrupted):
            raise
        raise TrainingInterrupted(run_dir, step, saved_step) from None
    finally:
        bar.close(done=completed, best=best_metric, best_step=best_step)
        tb.close()
    return FitResult(best_metric=best_metric, best_step=best_step, last_step=step, epochs=epoch,
                     stopped_early=stopped_early, run_dir=run_dir)
