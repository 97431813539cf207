"""Parameter groups with lr multipliers, encoder freezing, and hand-computed learning-rate sequences."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import medtransfer as mt
from medtransfer.errors import MedTransferError
from medtransfer.train.config import OptimConfig, ScheduleConfig, load_config
from medtransfer.train.optim import (
    build_optimizer,
    build_scheduler,
    encoder_trainable_at,
    param_groups,
    set_encoder_trainable,
)

torch.set_num_threads(1)


class Tiny(nn.Module):
    encoder_prefixes = ("enc.",)

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.relu(self.enc(x)))


def _one_param_optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs(sched, n_batches: int) -> list[float]:
    out = [sched.get_last_lr()[0]]
    for _ in range(n_batches):
        sched.step_batch()
        out.append(sched.get_last_lr()[0])
    return out


@pytest.fixture(scope="module")
def resnet10():
    return mt.create_model("medicalnet_resnet10", num_classes=2)


def test_medicalnet_groups_on_a_zoo_model(resnet10):
    cfg = load_config({"model": {"name": "medicalnet_resnet10"}, "recipe": "medicalnet"})
    opt = build_optimizer(resnet10, cfg.optim)
    assert isinstance(opt, torch.optim.SGD)
    enc, head = opt.param_groups
    assert (enc["name"], enc["lr"], head["name"], head["lr"]) == ("encoder", 1e-3, "head", 1e-3 * 100)
    assert enc["momentum"] == 0.9 and enc["weight_decay"] == head["weight_decay"] == 1e-3
    names = {id(p): n for n, p in resnet10.named_parameters()}
    assert all(names[id(p)].startswith(("conv1.", "bn1.", "layer")) for p in enc["params"])
    assert {names[id(p)].split(".")[0] for p in head["params"]} == {"conv_seg"}
    assert len(enc["params"]) + len(head["params"]) == len(list(resnet10.parameters()))


def test_group_lrs_and_optimiser_kinds():
    model = Tiny()
    groups = param_groups(model, OptimConfig(lr=0.01, encoder_lr_mult=0.1, head_lr_mult=2.0, weight_decay=0.5))
    assert [(g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in groups] == [
        ("encoder", pytest.approx(0.001), 0.5, 2), ("head", 0.02, 0.5, 2)]
    adam = build_optimizer(model, OptimConfig(name="adam", betas=(0.8, 0.9)))
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["betas"] == (0.8, 0.9)
    assert isinstance(build_optimizer(model, OptimConfig(name="adamw")), torch.optim.AdamW)


def test_model_without_encoder_prefixes():
    plain = nn.Linear(2, 2)
    assert [g["name"] for g in param_groups(plain, OptimConfig())] == ["head"]
    with pytest.raises(MedTransferError, match="optim.encoder_lr_mult: Linear declares no encoder_prefixes"):
        param_groups(plain, OptimConfig(encoder_lr_mult=0.5))
    with pytest.raises(MedTransferError, match="train.freeze_encoder_steps"):
        set_encoder_trainable(plain, False)


def test_ddp_style_wrapper_is_unwrapped():
    wrapper = nn.Module()
    wrapper.module = Tiny()
    assert [len(g["params"]) for g in param_groups(wrapper, OptimConfig())] == [2, 2]


def test_frozen_encoder_does_not_move_and_unfreezes():
    torch.manual_seed(0)
    model = Tiny()
    opt = build_optimizer(model, OptimConfig(name="adam", lr=0.1, weight_decay=0.1))
    assert set_encoder_trainable(model, False) == 2
    enc_before, head_before = model.enc.weight.clone(), model.head.weight.clone()
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    assert torch.equal(model.enc.weight, enc_before) and not torch.equal(model.head.weight, head_before)
    set_encoder_trainable(model, True)
    opt.zero_grad()
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    assert not torch.equal(model.enc.weight, enc_before)


def test_encoder_trainable_at():
    assert [encoder_trainable_at(s, 0) for s in (0, 5)] == [True, True]
    assert [encoder_trainable_at(s, -1) for s in (0, 10**6)] == [False, False]
    assert [encoder_trainable_at(s, 3) for s in (0, 2, 3, 4)] == [False, False, True, True]


def test_warmup_three_steps_then_cosine():
    cfg = ScheduleConfig(name="cosine", interval="step", warmup_steps=3)
    sched = build_scheduler(_one_param_optimizer(1.0), cfg, steps_per_epoch=7, total_steps=7)
    # warm-up 1/3 -> 1 linearly, then cosine over the remaining 4 steps: (1 + cos(pi t / 4)) / 2
    expected = [1 / 3, 5 / 9, 7 / 9, 1.0, 0.8535533905932737, 0.5, 0.14644660940672627, 0.0, 0.0]
    assert _lrs(sched, 8) == pytest.approx(expected, abs=1e-12)


def test_constant_warmup_then_multistep_per_epoch():
    cfg = ScheduleConfig(name="multistep", milestones=(2, 4), gamma=0.1, warmup_steps=2, warmup="constant",
                         warmup_start_factor=0.1)
    sched = build_scheduler(_one_param_optimizer(5e-4), cfg, steps_per_epoch=3, total_steps=30)
    assert _lrs(sched, 3) == pytest.approx([5e-5, 5e-5, 5e-4, 5e-4])
    seen = []
    for _ in range(5):
        sched.step_epoch()
        seen.append(sched.get_last_lr()[0])
    assert seen == pytest.approx([5e-4, 5e-5, 5e-5, 5e-6, 5e-6])


def test_poly_power_08():
    cfg = ScheduleConfig(name="poly", power=0.8, interval="step")
    sched = build_scheduler(_one_param_optimizer(0.01), cfg, steps_per_epoch=None, total_steps=4)
    # 0.01 * (1 - t/4) ** 0.8 for t = 0..4, then held at 0
    expected = [0.01, 0.0079441788, 0.0057434918, 0.0032987698, 0.0, 0.0]
    assert _lrs(sched, 5) == pytest.approx(expected, abs=1e-9)


def test_cosine_min_lr_per_epoch_horizon():
    cfg = ScheduleConfig(name="cosine", interval="epoch", horizon=2, min_lr=0.1)
    sched = build_scheduler(_one_param_optimizer(1.0), cfg, steps_per_epoch=10, total_steps=1000)
    assert _lrs(sched, 5) == [1.0] * 6  # batches do not move an epoch schedule
    seen = []
    for _ in range(3):
        sched.step_epoch()
        seen.append(sched.get_last_lr()[0])
    assert seen == pytest.approx([0.55, 0.1, 0.1])


def test_exponential_099_per_epoch_on_medicalnet_groups(resnet10):
    cfg = load_config({"model": {"name": "medicalnet_resnet10"}, "recipe": "medicalnet"})
    opt = build_optimizer(resnet10, cfg.optim)
    sched = build_scheduler(opt, cfg.schedule, steps_per_epoch=4, total_steps=40)
    assert sched.get_last_lr() == [1e-3, 0.1]  # epoch 0 at lr (the seed code started at 0.99 lr)
    sched.step_batch()
    sched.step_epoch()
    assert sched.get_last_lr() == pytest.approx([1e-3 * 0.99, 0.099])
    sched.step_epoch()
    assert sched.get_last_lr() == pytest.approx([1e-3 * 0.9801, 0.09801])


def test_step_schedule_and_floor():
    cfg = ScheduleConfig(name="step", step_size=2, gamma=0.5, min_lr=0.3)
    sched = build_scheduler(_one_param_optimizer(1.0), cfg, steps_per_epoch=1, total_steps=10)
    seen = []
    for _ in range(5):
        sched.step_epoch()
        seen.append(sched.get_last_lr()[0])
    assert seen == pytest.approx([1.0, 0.5, 0.5, 0.3, 0.3])


def test_plateau_halves_after_patience():
    cfg = ScheduleConfig(name="plateau", factor=0.5, patience=1)
    sched = build_scheduler(_one_param_optimizer(2e-4), cfg, steps_per_epoch=1, total_steps=None, mode="min")
    seen = []
    for loss in (1.0, 0.9, 0.95, 0.95, 0.9, 0.8, 0.85, 0.85):
        sched.step_epoch(loss)
        seen.append(sched.get_last_lr()[0])
    assert seen == pytest.approx([2e-4, 2e-4, 2e-4, 1e-4, 1e-4, 1e-4, 1e-4, 5e-5])
    sched.step_epoch()  # an epoch without validation leaves the plateau state alone
    assert sched.bad_rounds == 0 and sched.get_last_lr()[0] == pytest.approx(5e-5)


def test_plateau_on_a_rising_metric():
    cfg = ScheduleConfig(name="plateau", factor=0.1, patience=0)
    sched = build_scheduler(_one_param_optimizer(1.0), cfg, steps_per_epoch=1, total_steps=None, mode="max")
    for dice in (0.5, 0.6, 0.6):
        sched.step_epoch(dice)
    assert sched.get_last_lr()[0] == pytest.approx(0.1)


def test_scheduler_state_round_trip():
    cfg = ScheduleConfig(name="cosine", interval="step", warmup_steps=2)
    first = build_scheduler(_one_param_optimizer(1.0), cfg, steps_per_epoch=5, total_steps=10)
    for _ in range(4):
        first.step_batch()
    first.step_epoch()
    state = first.state_dict()
    resumed_opt = _one_param_optimizer(1.0)
    resumed = build_scheduler(resumed_opt, cfg, steps_per_epoch=5, total_steps=10)
    resumed.load_state_dict(state)
    assert resumed_opt.param_groups[0]["lr"] == first.get_last_lr()[0] == pytest.approx(
        (1 + math.cos(math.pi * 2 / 8)) / 2)
    assert _lrs(resumed, 4) == _lrs(first, 4)

    plateau = ScheduleConfig(name="plateau", factor=0.5, patience=0)
    a = build_scheduler(_one_param_optimizer(1.0), plateau, steps_per_epoch=1, total_steps=None)
    for v in (1.0, 2.0):
        a.step_epoch(v)
    b = build_scheduler(_one_param_optimizer(1.0), plateau, steps_per_epoch=1, total_steps=None)
    b.load_state_dict(a.state_dict())
    assert (b.best, b.plateau_scale, b.get_last_lr()) == (1.0, 0.5, [0.5])
    with pytest.raises(MedTransferError, match="schedule.name: the checkpoint's schedule is 'plateau'"):
        build_scheduler(_one_param_optimizer(), cfg, steps_per_epoch=5, total_steps=10).load_state_dict(a.state_dict())


def test_scheduler_needs_a_length():
    with pytest.raises(MedTransferError, match="needs total_steps or schedule.horizon"):
        build_scheduler(_one_param_optimizer(), ScheduleConfig(name="poly"), steps_per_epoch=3, total_steps=None)
    with pytest.raises(MedTransferError, match="warm-up steps leave none"):
        build_scheduler(_one_param_optimizer(), ScheduleConfig(name="cosine", interval="step", warmup_steps=5),
                        steps_per_epoch=3, total_steps=5)
