"""Optimisers, parameter groups with learning-rate multipliers, encoder freezing, and learning-rate schedules.

Parameter groups: the encoder (state_dict keys starting with one of ``model.encoder_prefixes``) at
``lr * encoder_lr_mult`` and everything else (head, decoder) at ``lr * head_lr_mult``; MedicalNet trains its new
``conv_seg`` at 100 x lr this way. Weight decay applies to every parameter, norms and biases included, as in all
five seed systems. Frozen parameters stay in the optimiser (no gradient, so no update and no decay), so that
freeze-then-unfreeze needs no new optimiser.

Schedules: :class:`LRSchedule` sets each group's lr in closed form from the counters (optimiser steps ``s``,
finished epochs ``e``) instead of chaining torch schedulers, because a per-step warm-up in front of a per-epoch
schedule, or in front of a plateau rule, cannot be expressed with ``SequentialLR`` (which refuses
``ReduceLROnPlateau``), and a closed form makes resume exact by construction. With base lr ``b`` per group,
``floor = min(min_lr, b)``, warm-up length ``W`` and horizon ``T``::

    warm(s)   = start + (1 - start) * s / W  (linear) or start (constant) while s < W, then 1
    t         = max(0, s - W) for interval "step" (the schedule starts after warm-up), e for interval "epoch"
    T         = horizon, or total_steps - W ("step"), or ceil(total_steps / steps_per_epoch) ("epoch")
    step      : b * gamma ** (t // step_size)           (torch StepLR)
    multistep : b * gamma ** #(milestones <= t)          (torch MultiStepLR)
    exponential: b * gamma ** t                          (torch ExponentialLR)
    cosine    : floor + (b - floor) * (1 + cos(pi * min(t, T) / T)) / 2   (torch CosineAnnealingLR)
    poly      : floor + (b - floor) * (1 - min(t, T) / T) ** power        (torch PolynomialLR when floor = 0)
    plateau   : b * factor ** (number of reductions)     (torch ReduceLROnPlateau, relative threshold)
    lr        = warm(s) * max(schedule value, floor)
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..errors import MedTransferError
from .config import OptimConfig, ScheduleConfig

# --------------------------------------------------------------------------------------------- parameter groups


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel and DataParallel hold the zoo model in ``.module`` (and prefix its keys with it).
    while not getattr(model, "encoder_prefixes", None) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _split(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    model = _unwrap(model)
    prefixes = tuple(getattr(model, "encoder_prefixes", ()) or ())
    encoder, rest = [], []
    for name, param in model.named_parameters():
        (encoder if prefixes and name.startswith(prefixes) else rest).append((name, param))
    return encoder, rest


def encoder_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    return (p for _, p in _split(model)[0])


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Two optimiser groups, ``encoder`` and ``head`` (all non-encoder parameters), each with its lr; empty groups
    are left out. A model without ``encoder_prefixes`` is all head, and then multipliers other than 1 are refused."""
    encoder, rest = _split(model)
    if not encoder and cfg.encoder_lr_mult != 1.0:
        raise MedTransferError(
            f"optim.encoder_lr_mult: {type(_unwrap(model)).__name__} declares no encoder_prefixes, so no parameter "
            "belongs to an encoder; leave encoder_lr_mult at 1"
        )
    groups = [
        {"name": "encoder", "params": [p for _, p in encoder], "lr": cfg.lr * cfg.encoder_lr_mult},
        {"name": "head", "params": [p for _, p in rest], "lr": cfg.lr * cfg.head_lr_mult},
    ]
    for group in groups:
        group["weight_decay"] = cfg.weight_decay
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":  # weight decay as an L2 term, as the seed systems' Adam runs used it
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    raise MedTransferError(f"optim.name: unknown optimiser {cfg.name!r}; choose sgd, adam or adamw")


def set_encoder_trainable(model: nn.Module, trainable: bool) -> int:
    """Set ``requires_grad`` on every encoder parameter; returns how many parameter tensors there are.

    Batch-norm running statistics still update in train mode; a strict linear probe also puts the encoder's norm
    layers in eval mode, which is the loop's decision.
    """
    params = list(encoder_parameters(model))
    if not params:
        raise MedTransferError(
            f"train.freeze_encoder_steps: {type(_unwrap(model)).__name__} declares no encoder_prefixes, so there is "
            "no encoder to freeze; set freeze_encoder_steps to 0"
        )
    for p in params:
        p.requires_grad_(trainable)
    return len(params)


def encoder_trainable_at(step: int, freeze_encoder_steps: int) -> bool:
    """Whether the encoder trains at optimiser step ``step``: -1 never (linear probe), 0 always, N from step N."""
    if freeze_encoder_steps < 0:
        return False
    return step >= freeze_encoder_steps


# ------------------------------------------------------------------------------------------------- schedules


class LRSchedule:
    """Sets the optimiser's learning rates from the counters (see the module docstring for the formulas).

    The loop calls :meth:`step_batch` after every optimiser step and :meth:`step_epoch` after every epoch, passing
    the monitored validation value when there is one (``plateau`` acts only on those; :meth:`observe` takes a
    value outside epoch boundaries, for runs validated every N steps).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        cfg: ScheduleConfig,
        *,
        steps_per_epoch: Optional[int] = None,
        total_steps: Optional[int] = None,
        mode: str = "min",
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.optimizer = optimizer
        self.cfg = cfg
        self.mode = mode
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.step_count = 0
        self.epoch = 0
        self.plateau_scale = 1.0
        self.best = math.inf if mode == "min" else -math.inf
        self.bad_rounds = 0
        self.horizon = self._horizon(steps_per_epoch, total_steps)
        self._apply()

    def _horizon(self, steps_per_epoch: Optional[int], total_steps: Optional[int]) -> Optional[int]:
        cfg = self.cfg
        if cfg.name not in ("cosine", "poly"):
            return None
        if cfg.horizon is not None:
            return cfg.horizon
        if total_steps is None or total_steps <= 0:
            raise MedTransferError(f"schedule.horizon: a {cfg.name} schedule needs total_steps or schedule.horizon")
        if cfg.interval == "step":
            if total_steps <= cfg.warmup_steps:
                raise MedTransferError(
                    f"schedule.warmup_steps: {cfg.warmup_steps} warm-up steps leave none of the {total_steps} steps "
                    f"for the {cfg.name} schedule"
                )
            return total_steps - cfg.warmup_steps
        if not steps_per_epoch or steps_per_epoch <= 0:
            raise MedTransferError(f"schedule.interval: an epoch-wise {cfg.name} schedule needs steps_per_epoch > 0")
        return math.ceil(total_steps / steps_per_epoch)

    # ------------------------------------------------------------------ formulas

    def _warm(self) -> float:
        cfg, s = self.cfg, self.step_count
        if s >= cfg.warmup_steps:
            return 1.0
        if cfg.warmup == "constant":
            return cfg.warmup_start_factor
        return cfg.warmup_start_factor + (1.0 - cfg.warmup_start_factor) * s / cfg.warmup_steps

    def _time(self) -> int:
        if self.cfg.interval == "step":
            return max(0, self.step_count - self.cfg.warmup_steps)
        return self.epoch

    def _lr(self, base: float) -> float:
        cfg, t = self.cfg, self._time()
        floor = min(cfg.min_lr, base)
        if cfg.name in ("cosine", "poly"):
            frac = min(t, self.horizon) / self.horizon
            decay = (1 + math.cos(math.pi * frac)) / 2 if cfg.name == "cosine" else (1 - frac) ** cfg.power
            value = floor + (base - floor) * decay
        elif cfg.name == "step":
            value = base * cfg.gamma ** (t // cfg.step_size)
        elif cfg.name == "multistep":
            value = base * cfg.gamma ** bisect.bisect_right(cfg.milestones, t)
        elif cfg.name == "exponential":
            value = base * cfg.gamma**t
        elif cfg.name == "plateau":
            value = base * self.plateau_scale
        else:
            value = base
        return self._warm() * max(value, floor)

    def _apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = self._lr(base)

    # ------------------------------------------------------------------ the loop's calls

    def step_batch(self) -> None:
        self.step_count += 1
        self._apply()

    def step_epoch(self, metric: Optional[float] = None) -> None:
        self.epoch += 1
        if metric is not None:
            self.observe(metric)
        self._apply()

    def observe(self, metric: float) -> None:
        """Record a monitored validation value; ``plateau`` cuts the lr by ``factor`` after more than ``patience``
        values without a relative improvement of ``threshold``."""
        if self.cfg.name != "plateau":
            return
        value, thr = float(metric), self.cfg.threshold
        better = value < self.best * (1 - thr) if self.mode == "min" else value > self.best * (1 + thr)
        if better:
            self.best, self.bad_rounds = value, 0
        else:
            self.bad_rounds += 1
            if self.bad_rounds > self.cfg.patience:
                self.plateau_scale *= self.cfg.factor
                self.bad_rounds = 0
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.cfg.name,
            "step_count": self.step_count,
            "epoch": self.epoch,
            "base_lrs": list(self.base_lrs),
            "plateau_scale": self.plateau_scale,
            "best": self.best,
            "bad_rounds": self.bad_rounds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.cfg.name:
            raise MedTransferError(
                f"schedule.name: the checkpoint's schedule is {state.get('name')!r} but the config says "
                f"{self.cfg.name!r}; resume with the run's own config"
            )
        if len(state["base_lrs"]) != len(self.optimizer.param_groups):
            raise MedTransferError(
                f"the checkpoint's schedule has {len(state['base_lrs'])} parameter groups, the optimiser "
                f"{len(self.optimizer.param_groups)}; resume with the run's own config"
            )
        self.step_count = int(state["step_count"])
        self.epoch = int(state["epoch"])
        self.base_lrs = [float(v) for v in state["base_lrs"]]
        self.plateau_scale = float(state["plateau_scale"])
        self.best = float(state["best"])
        self.bad_rounds = int(state["bad_rounds"])
        self._apply()


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: ScheduleConfig,
    *,
    steps_per_epoch: Optional[int],
    total_steps: Optional[int],
    mode: str = "min",
) -> LRSchedule:
    """The schedule of ``cfg`` over ``optimizer``; ``mode`` says whether the monitored value should fall (a loss)
    or rise (a metric), for ``plateau``."""
    return LRSchedule(optimizer, cfg, steps_per_epoch=steps_per_epoch, total_steps=total_steps, mode=mode)
