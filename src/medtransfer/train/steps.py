"""The training half of the loop's :class:`~medtransfer.train.loop._Run`: one micro-batch's forward and backward
(accumulation, AMP, DDP's gradient sync), one optimiser step (unscale, clip, step, per-batch schedule, the encoder's
unfreezing), and one epoch's batches, with the replay of the data order after a resume mid-epoch.

:class:`_Steps` is a mixin: the counters, the validation and checkpoint policy and the epoch ends stay in
:mod:`.loop`, whose ``_Run`` calls these steps in the order the bit-identical resume depends on."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator, Optional

import numpy as np
import torch

from ..errors import MedTransferError
from .checkpoint import rng_state, set_rng_state
from .distributed import is_distributed
from .optim import encoder_trainable_at, set_encoder_trainable


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


class _Steps:
    """The per-batch and per-epoch training steps of ``_Run`` (its attributes are set by ``_Run.__init__``)."""

    def rank_rng(self, state: dict, key: str) -> Optional[dict]:
        per_rank = state.get(f"{key}_ranks")
        if per_rank and len(per_rank) == self.world:
            return per_rank[self.rank]
        return state.get(key)

    def set_train_mode(self) -> None:
        self.train_model.train()
        if not self.trainable:
            for m in self.encoder_norms:  # a frozen encoder keeps its batch statistics (linear probe)
                m.eval()

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.is_floating_point() and x.ndim in (4, 5):
            x = x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
        return x

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def lrs(self) -> dict[str, float]:
        return {str(g.get("name", i)): float(g["lr"]) for i, g in enumerate(self.optimizer.param_groups)}

    # ------------------------------------------------------------------ training

    def optimizer_step(self, micro_batches: int) -> None:
        """Unscale, clip, step the optimiser and the per-batch schedule; unfreeze the encoder when its step comes."""
        optimizer, scaler = self.optimizer, self.scaler
        if scaler is not None:
            scaler.unscale_(optimizer)
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(
                [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None], self.cfg.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.schedule.step_batch()
        self.step += 1
        self.bar.after_step(self.step, self.epoch, float(np.mean(self.loss_window[-micro_batches:])), self.lrs())
        now_trainable = encoder_trainable_at(self.step, self.freeze)
        if self.freeze != 0 and now_trainable != self.trainable:
            self.trainable = now_trainable
            set_encoder_trainable(self.base, self.trainable)
            self.set_train_mode()

    def backward(self, image: torch.Tensor, label: torch.Tensor, batch: dict, sync: bool) -> None:
        """Forward and backward of one micro-batch (``loss / accum_steps``); DDP syncs gradients only when ``sync``."""
        train_model, scaler = self.train_model, self.scaler
        no_sync = train_model.no_sync if (is_distributed() and not sync) else contextlib.nullcontext
        with no_sync():
            with self.autocast():
                logits = train_model(image, **_forward_kwargs(batch))
            loss = self.loss_fn(logits.float(), label)
            if not torch.isfinite(loss):
                raise MedTransferError(f"the training loss became {float(loss)} at step {self.step}; "
                                       "lower optim.lr or set train.grad_clip")
            scaled = loss / self.cfg.accum_steps
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        self.loss_window.append(float(loss.detach()))

    def start_epoch(self) -> Iterator[dict]:
        """The epoch's batch iterator; after a resume mid-epoch, the batches already done are drawn again (with the
        epoch's saved generators, so the order is the same) and skipped, then the saved generators take over."""
        _set_epoch(self.train_loader, self.epoch)
        skip = self.batches_done
        restore_after: Optional[dict] = None
        if self.resumed is not None:
            start_rng = self.rank_rng(self.resumed, "epoch_rng")
            if skip and start_rng is not None:  # replay the epoch's loader draws, then jump to the saved state
                set_rng_state(start_rng)
                self.epoch_rng, restore_after = start_rng, self.rank_rng(self.resumed, "rng")
            else:
                set_rng_state(self.rank_rng(self.resumed, "rng"))
            self.resumed = None
        if skip == 0 or self.epoch_rng is None:
            self.epoch_rng = rng_state()  # before iter(): a DataLoader draws its workers' base seed there
        iterator: Iterator[dict] = iter(self.train_loader)
        for _ in range(skip):
            next(iterator)
        if restore_after is not None:
            set_rng_state(restore_after)
        return iterator

    def show_bar(self) -> None:
        if self.bar.bar is None:
            return
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        best = "-" if self.best_metric is None else f"{self.best_metric:.4f}"
        self.bar.update(self.step, f"loss {np.mean(self.loss_window):.4f} | best {self.monitor_name} {best} | "
                        f"{len(self.loss_window) / elapsed:.1f} it/s | data wait {self.wait_time / elapsed:.0%}")

    def train_epoch(self) -> bool:
        """Train until the epoch ends or a limit (steps, early stop) is hit; True when every batch was seen."""
        iterator = self.start_epoch()
        cfg, n_batches = self.cfg, self.n_batches
        micro = 0
        epoch_complete = False
        while True:
            t_wait = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                epoch_complete = True
                break
            self.wait_time += time.perf_counter() - t_wait
            image, label = self.to_device(batch["image"]), batch["label"].to(self.device)
            if self.batch_transform is not None:
                image, label = self.batch_transform(image, label)
            micro += 1
            self.batches_done += 1
            sync = micro % cfg.accum_steps == 0 or (n_batches is not None and self.batches_done >= n_batches)
            self.backward(image, label, batch, sync)
            if not sync:
                continue
            self.optimizer_step(micro)
            micro = 0
            self.show_bar()
            if cfg.val_interval == "step" and self.val_loader is not None and self.step % cfg.val_every == 0:
                val = self.validate()
                self.schedule.observe(self.after_validation(val))
                self.write_record(val)
                self.save_last()
            if self.stopped_early or self.step >= self.max_steps:
                epoch_complete = n_batches is not None and self.batches_done >= n_batches
                break
        if micro:  # an epoch's remainder of micro-batches still updates the weights
            self.optimizer_step(micro)
        return epoch_complete
