"""The one training loop: segmentation and classification, 2D and 3D, single process or DDP under ``torchrun``.

Per micro-batch: forward (under autocast when ``train.amp`` asks for it on CUDA), ``loss / accum_steps``, backward
(through a GradScaler for fp16); every ``accum_steps`` micro-batches (and at the end of an epoch with a remainder):
unscale, clip the global gradient norm (``train.grad_clip``), ``optimizer.step()``, ``schedule.step_batch()``.
Validation every ``val_every`` epochs or steps (``val_interval``) gives the val loss and the task metrics;
``best.pt`` (weights, step and metric only) is written when ``monitor`` improves (or, with ``train.save_best:
end``, once at the run's end from a copy of the best weights held in memory); ``last.pt`` (everything a resume
needs) as ``train.save_last`` says: at every validation, epoch end and the run's end (the default), at the end only,
or never; both atomically and on rank 0 only. ``resume=True`` restores every counter and random generator from
``last.pt`` and, mid-epoch, replays the epoch's data order up to the batches already done, so a resumed run ends with
the same weights, bit for bit, as an uninterrupted one under deterministic settings.

Data order comes from the loader's sampler: the loop calls ``sampler.set_epoch(epoch)`` (and the batch sampler's)
when it has one; :class:`~medtransfer.train.distributed.EpochShuffleSampler` derives the order from (seed, epoch).

Where the parts live: this module holds the run's state (fresh or resumed), validation, the checkpoint policy and
the epoch ends (:class:`_Run`) and :func:`fit`; the micro-batch, optimiser-step and epoch-iterator steps are in
:mod:`.steps`, ``metrics.jsonl`` and TensorBoard in :mod:`.runlog`, the progress display in :mod:`.progress`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

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
from .progress import _Progress  # noqa: F401  (tests patch loop._Progress)
from .runlog import _append_jsonl, _TensorBoard, _truncate_metrics
from .steps import _forward_kwargs, _set_epoch, _Steps  # noqa: F401

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


def _better(value: float, best: Optional[float], mode: str) -> bool:
    if value is None or math.isnan(value):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


# ----------------------------------------------------------------------------------------------------- the loop


class _Run(_Steps):
    """One call of :func:`fit`: the run's counters and its named steps (the training ones from :class:`._Steps`). The order of the steps is the order of the
    random draws, which the bit-identical resume depends on: setup, :meth:`restore`, :meth:`wrap`, then per epoch
    :meth:`start_epoch` and :meth:`train_epoch` (micro-batches, :meth:`optimizer_step`, validation) and
    :meth:`end_epoch`."""

    def __init__(self, model: nn.Module, train_loader: Iterable[dict], val_loader: Optional[Iterable[dict]], *,
                 loss_fn: nn.Module, metrics: Any, optimizer: torch.optim.Optimizer, schedule: Any,
                 cfg: TrainConfig, run_dir: Path, monitor: tuple[str, str], device: torch.device | str | None,
                 batch_transform: Optional[Callable]) -> None:
        self.monitor_name, self.monitor_mode = monitor
        if self.monitor_mode not in ("max", "min"):
            raise ValueError(f"monitor mode must be 'max' or 'min', got {self.monitor_mode!r}")
        self.train_loader, self.val_loader, self.batch_transform = train_loader, val_loader, batch_transform
        self.loss_fn, self.metrics, self.optimizer, self.schedule, self.cfg = loss_fn, metrics, optimizer, schedule, cfg
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.rank, self.world = init_distributed()
        self.main = is_main_process()
        self.device = device = _resolve_device(device)
        if cfg.deterministic:
            _set_deterministic()

        model.to(device)
        self.model = model
        self.use_cuda = use_cuda = device.type == "cuda"
        self.amp_dtype = _AMP_DTYPES.get(cfg.amp) if use_cuda else None
        if cfg.amp != "none" and not use_cuda:
            log.info("train.amp=%s is a no-op on %s; training in float32", cfg.amp, device.type)
        self.scaler = torch.amp.GradScaler("cuda") if (use_cuda and cfg.amp == "fp16") else None
        self.channels_last = cfg.channels_last and use_cuda
        if self.channels_last:
            model.to(memory_format=torch.channels_last)  # 5-D inputs convert per batch; 4-D weights stay compatible

        self.base = unwrap_model(model)
        self.freeze = cfg.freeze_encoder_steps
        self.encoder_norms = _encoder_norms(self.base) if self.freeze != 0 else []

        self.step, self.epoch, self.batches_done = 0, 0, 0
        self.best_metric: Optional[float] = None
        self.best_step, self.bad_validations = 0, 0
        self.epoch_rng: Optional[dict] = None
        self.resumed: Optional[dict] = None
        self.saved_step: Optional[int] = None  # the step of the last.pt on disk, for the Ctrl-C message
        self.pending_best: Optional[dict[str, Any]] = None  # best.pt held in memory (train.save_best: end)
        self.stopped_early = False

        self.n_batches = _len_or_none(train_loader)
        self.max_epochs = cfg.max_epochs if cfg.max_epochs is not None else math.inf
        self.max_steps = cfg.max_steps if cfg.max_steps is not None else math.inf

    # ------------------------------------------------------------------ state (fresh or resumed)

    def restore(self, resume: bool) -> None:
        """Counters, weights and optimiser state from ``last.pt`` (``resume``), or a fresh seeded start that drops
        the files of an earlier run in the same folder."""
        run_dir, ckpt_dir = self.run_dir, self.ckpt_dir
        if self.main:
            remove_stale_temps(run_dir, ckpt_dir)  # a kill inside atomic_write leaves its temporary file
        if resume:
            resumed = self.resumed = load_run_checkpoint(ckpt_dir / "last.pt")
            self.base.load_state_dict(resumed["model"])
            self.optimizer.load_state_dict(resumed["optimizer"])
            self.schedule.load_state_dict(resumed["schedule"])
            if self.scaler is not None and resumed.get("scaler"):
                self.scaler.load_state_dict(resumed["scaler"])
            self.step, self.epoch = int(resumed["step"]), int(resumed["epoch"])
            self.batches_done = int(resumed.get("batches_done", 0))
            self.best_metric = resumed["best_metric"]
            self.best_step, self.bad_validations = int(resumed["best_step"]), int(resumed["bad_validations"])
            if self.main:
                _truncate_metrics(run_dir / "metrics.jsonl", self.step)
            self.saved_step = self.step
        else:
            _seed_everything(self.cfg.seed + self.rank)
            if self.main:  # a fresh run starts a fresh log, and no checkpoint of an earlier run may pass for its own
                for stale in (run_dir / "metrics.jsonl", ckpt_dir / "last.pt", ckpt_dir / "best.pt"):
                    stale.unlink(missing_ok=True)

    def wrap(self) -> None:
        """The encoder's trainability at the current step, and the DDP wrapper under ``torchrun``."""
        base, freeze, model = self.base, self.freeze, self.model
        self.trainable = encoder_trainable_at(self.step, freeze)
        if freeze != 0:
            set_encoder_trainable(base, self.trainable)
        self.train_model: nn.Module = model
        if is_distributed() and not isinstance(model, nn.parallel.DistributedDataParallel):
            if freeze > 0:  # DDP registers only parameters that require grad at wrap time: wrap with all of them
                set_encoder_trainable(base, True)
            self.train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.use_cuda else None,
                # frozen parts, and the idle decoders of multi-dataset training, get no gradient in a step
                find_unused_parameters=freeze > 0 or bool(getattr(base, "has_unused_parameters", False)),
            )
            if freeze != 0:
                set_encoder_trainable(base, self.trainable)

    def start_logs(self, bar: _Progress) -> None:
        self.bar = bar
        self.tb = _TensorBoard(self.run_dir, self.main)
        self.loss_window: list[float] = []
        self.wait_time = 0.0
        self.window_start = self.t0 = time.perf_counter()
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ validation and checkpoints

    def validate(self) -> dict[str, float]:
        base, metrics, device = self.base, self.metrics, self.device
        base.eval()
        metrics.reset()
        loss_sum, count = 0.0, 0
        with torch.no_grad():
            for batch in self.val_loader:
                image, label = self.to_device(batch["image"]), batch["label"].to(device)
                with self.autocast():
                    logits = base(image, **_forward_kwargs(batch))
                logits = logits.float()
                n = int(image.shape[0])
                loss_sum += float(self.loss_fn(logits, label)) * n
                count += n
                metrics.update(logits, label)
        if is_distributed():
            states = all_gather_object(({k: v.cpu() for k, v in metrics.state().items()}, loss_sum, count))
            metrics.merge([s for r, (s, _, _) in enumerate(states) if r != self.rank])
            loss_sum, count = sum(s[1] for s in states), sum(s[2] for s in states)
        out = {k: float(v) for k, v in metrics.compute().items()}
        out["loss"] = loss_sum / count if count else float("nan")
        self.set_train_mode()
        return out

    def save_last(self, final: bool = False) -> None:
        """``last.pt`` as ``train.save_last`` says: at every call (``every_validation``), at the run's end only
        (``end``: ``final``), or never."""
        policy = self.cfg.save_last
        if policy == "never" or (policy == "end" and not final):
            return  # the same on every rank, so the gathers below stay collective
        rng = all_gather_object(rng_state())  # every rank's generators, so each resumes its own stream
        erng = all_gather_object(self.epoch_rng)
        if not self.main:
            return
        save_run_checkpoint(self.ckpt_dir / "last.pt", {
            "model": self.base.state_dict(), "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step, "epoch": self.epoch, "batches_done": self.batches_done,
            "best_metric": self.best_metric, "best_step": self.best_step, "bad_validations": self.bad_validations,
            "rng": rng[0], "rng_ranks": rng, "epoch_rng": erng[0], "epoch_rng_ranks": erng,
        })
        self.saved_step = self.step

    def save_best(self, value: float) -> None:
        """``best.pt`` now (``train.save_best: every_improvement``), or a copy in memory that :meth:`write_best`
        writes once when the run ends (``end``)."""
        if not self.main:
            return
        state = {"model": self.base.state_dict(), "step": self.step, "epoch": self.epoch, "metric": value,
                 "monitor": self.monitor_name}
        if self.cfg.save_best == "end":
            state["model"] = {k: v.detach().clone() for k, v in state["model"].items()}
            self.pending_best = state
        else:
            save_run_checkpoint(self.ckpt_dir / "best.pt", state)

    def write_best(self) -> None:
        state, self.pending_best = self.pending_best, None
        if state is not None:
            save_run_checkpoint(self.ckpt_dir / "best.pt", state)

    def write_record(self, val: Optional[dict[str, float]]) -> None:
        elapsed = time.perf_counter() - self.window_start
        record = {
            "step": self.step, "epoch": self.epoch, "lr": self.lrs(),
            "train_loss": float(np.mean(self.loss_window)) if self.loss_window else None,
            "val": val, "time": time.perf_counter() - self.t0,
            "data_wait": self.wait_time / elapsed if elapsed > 0 else 0.0,
        }
        if self.main:
            _append_jsonl(self.run_dir / "metrics.jsonl", record)
            self.tb.log(record)
        self.loss_window, self.wait_time, self.window_start = [], 0.0, time.perf_counter()

    def after_validation(self, val: dict[str, float]) -> Optional[float]:
        """Track the best/bad counters, write ``best.pt`` on an improvement, decide early stopping; returns the
        monitored value."""
        value = val.get(self.monitor_name)
        if value is None:
            raise MedTransferError(f"monitor {self.monitor_name!r} is not among the validation values {sorted(val)}")
        if _better(value, self.best_metric, self.monitor_mode):
            self.best_metric, self.best_step, self.bad_validations = value, self.step, 0
            self.save_best(value)
        else:
            self.bad_validations += 1
        patience = self.cfg.early_stop_patience
        self.stopped_early = patience is not None and self.bad_validations >= patience
        self.bar.validation(val, self.best_metric, self.best_step)
        return value

    # ------------------------------------------------------------------ epochs

    def end_epoch(self) -> None:
        """Validation at the epoch's end (``val_interval: epoch``), the per-epoch schedule, ``last.pt``."""
        cfg = self.cfg
        value = None
        if (cfg.val_interval == "epoch" and self.val_loader is not None and (self.epoch + 1) % cfg.val_every == 0
                and not self.stopped_early):
            val = self.validate()
            value = self.after_validation(val)
            self.write_record(val)
        self.schedule.step_epoch(value)
        self.epoch += 1
        self.batches_done = 0
        if value is None and self.loss_window:
            self.write_record(None)
        self.save_last()

    def train(self) -> None:
        while self.epoch < self.max_epochs and self.step < self.max_steps and not self.stopped_early:
            if not self.train_epoch():
                break
            self.end_epoch()
        if self.loss_window:
            self.write_record(None)
        self.write_best()
        self.save_last(final=True)

    def total_steps(self) -> tuple[Optional[int], bool]:
        """The run's step count when it is known (whichever of max_steps and max_epochs comes first), and whether
        the epoch limit is the one that binds (the progress line then shows ``epoch e/E``)."""
        cfg, n_batches = self.cfg, self.n_batches
        by_epochs = None
        if n_batches and cfg.max_epochs is not None:
            by_epochs = -(-n_batches // cfg.accum_steps) * cfg.max_epochs
        limits = [t for t in (cfg.max_steps, by_epochs) if t is not None]
        total = min(limits) if limits else None
        epochs_bind = cfg.max_steps is None or (by_epochs is not None and by_epochs <= cfg.max_steps)
        return total, epochs_bind


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
    and batch jobs (see :class:`~medtransfer.train.progress._Progress`); False prints nothing.
    """
    run = _Run(model, train_loader, val_loader, loss_fn=loss_fn, metrics=metrics, optimizer=optimizer,
               schedule=schedule, cfg=cfg, run_dir=run_dir, monitor=monitor, device=device,
               batch_transform=batch_transform)
    run.restore(resume)
    run.wrap()
    total, epochs_bind = run.total_steps()
    run.start_logs(_Progress(progress and run.main, total, epochs=cfg.max_epochs if epochs_bind else None,
                             monitor=run.monitor_name))
    completed = False
    run.set_train_mode()
    optimizer.zero_grad(set_to_none=True)
    try:
        run.train()
        completed = True
    except KeyboardInterrupt as exc:
        if isinstance(exc, TrainingInterrupted):
            raise
        raise TrainingInterrupted(run.run_dir, run.step, run.saved_step) from None
    finally:
        run.bar.close(done=completed, best=run.best_metric, best_step=run.best_step)
        run.tb.close()
    return FitResult(best_metric=run.best_metric, best_step=run.best_step, last_step=run.step, epochs=run.epoch,
                     stopped_early=run.stopped_early, run_dir=run.run_dir)
