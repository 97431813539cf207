"""Fixed validation batches of the pretraining runner: each sample at most once, the same every time."""

from __future__ import annotations

import torch

from medtransfer.pretext.data import fixed_batches


class _Numbers:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.full((1, 2), float(i)), "label": torch.tensor(i), "case_id": str(i)}


def test_each_sample_at_most_once_and_count_caps():
    labels = lambda n, bs, count: [b["label"].tolist() for b in fixed_batches(_Numbers(n), batch_size=bs, count=count)]
    assert labels(5, 2, 4) == [[0, 1], [2, 3], [4]]
    assert labels(5, 2, 2) == [[0, 1], [2, 3]]
    assert labels(1, 2, 4) == [[0]]
    assert labels(0, 2, 3) == []


def test_transform_draws_from_a_fixed_generator():
    def noisy(image, label, generator=None):
        return image + torch.rand(image.shape, generator=generator), label

    a = fixed_batches(_Numbers(4), batch_size=2, count=2, transform=noisy, seed=7)
    b = fixed_batches(_Numbers(4), batch_size=2, count=2, transform=noisy, seed=7)
    c = fixed_batches(_Numbers(4), batch_size=2, count=2, transform=noisy, seed=8)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert not torch.equal(a[0]["image"], c[0]["image"])
    assert not torch.equal(a[0]["image"] - a[0]["image"].floor(), a[1]["image"] - a[1]["image"].floor())
