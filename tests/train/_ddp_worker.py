"""Toy task shared by tests/train/test_loop.py, and the script its DDP test runs under ``torchrun``.

Usage: ``python -m torch.distributed.run --nproc_per_node 2 tests/train/_ddp_worker.py OUT_DIR`` trains the toy
segmentation net with batch 2 per rank (global batch 4) and leaves ``OUT_DIR/checkpoints/last.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from medtransfer.train.config import OptimConfig, ScheduleConfig, TrainConfig
from medtransfer.train.distributed import EpochShuffleSampler
from medtransfer.train.losses import build_loss
from medtransfer.train.metrics import build_metrics
from medtransfer.train.optim import build_optimizer, build_scheduler


class ToyNet(nn.Module):
    """Two 3D convolutions, no batch-dependent layer: logits of 2 classes per voxel."""

    encoder_prefixes = ("encoder.",)

    def __init__(self, norm: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        layers = [nn.Conv3d(1, 4, 3, padding=1)] + ([nn.BatchNorm3d(4)] if norm else []) + [nn.ReLU()]
        layers += [nn.Dropout(dropout)] if dropout else []  # draws from the torch generator: resume must restore it
        self.encoder = nn.Sequential(*layers)
        self.head = nn.Conv3d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class ToyData(torch.utils.data.Dataset):
    """Random 1x8x8x8 volumes; the label is the voxel's sign (learnable by one convolution)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 1, 8, 8, 8, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        image = self.images[i]
        return {"image": image, "label": (image[0] > 0).long()}


def make_run(batch_size: int, *, n: int = 8, seed: int = 0, optim: str = "sgd", lr: float = 0.1,
             norm: bool = False, dropout: float = 0.0, **train):
    """Model, loaders and the fit keyword arguments of one toy run (model initialised from ``seed``)."""
    torch.manual_seed(seed)
    model = ToyNet(norm=norm, dropout=dropout)
    data = ToyData(n)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=EpochShuffleSampler(n, seed))
    val = torch.utils.data.DataLoader(ToyData(4, seed=1), batch_size=2)
    cfg = TrainConfig(**{"max_epochs": 3, "seed": seed, "deterministic": True, **train})
    optimizer = build_optimizer(model, OptimConfig(name=optim, lr=lr, momentum=0.9))
    schedule = build_scheduler(optimizer, ScheduleConfig(), steps_per_epoch=len(loader), total_steps=None)
    kwargs = dict(loss_fn=build_loss("ce", task="segmentation", num_classes=2),
                  metrics=build_metrics("segmentation", num_classes=2),
                  optimizer=optimizer, schedule=schedule, cfg=cfg, monitor=("dice_mean", "max"), progress=False)
    return model, loader, val, kwargs


def main(out: str) -> None:
    torch.set_num_threads(1)
    from medtransfer.train.loop import fit

    model, loader, val, kwargs = make_run(2, max_epochs=2)
    result = fit(model, loader, val, run_dir=Path(out), **kwargs)
    print(f"rank done: last_step={result.last_step}")


if __name__ == "__main__":
    main(sys.argv[1])
