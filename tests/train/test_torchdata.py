"""PatchDataset / CaseDataset over a prepared phantom cache: shapes, dtypes, reproducibility from (seed, epoch, index)."""

import numpy as np
import pytest
import torch

from medtransfer.data.cache import PreparedCache
from medtransfer.data.datasets import load_dataset
from medtransfer.data.phantoms import write_phantom_dataset
from medtransfer.data.preprocess import build_pipeline
from medtransfer.train.torchdata import CaseDataset, PatchDataset, centre_fit, collate, make_loader


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    torch.set_num_threads(1)
    root = write_phantom_dataset(tmp_path_factory.mktemp("ph"), 4, 0, shape=(32, 32, 32),
                                 spacing=(5.0, 5.0, 5.0), with_2d=False)
    seg = PreparedCache(root / "cache_seg")
    seg.prepare(load_dataset(root), build_pipeline(preset="genesis_ct"), workers=1, progress=False)
    cls = PreparedCache(root / "cache_cls")
    cls.prepare(load_dataset(root / "classification.csv"), build_pipeline(preset="genesis_ct"), workers=1,
                progress=False)
    return seg, cls


def test_patch_dataset_shapes_dtypes_and_reproducibility(prepared):
    seg, _ = prepared
    ids = seg.case_ids()
    ds = PatchDataset(seg, ids, (16, 16, 16), seed=3)
    item = ds[1]
    assert item["image"].shape == (1, 16, 16, 16) and item["image"].dtype == torch.float32
    assert item["label"].shape == (16, 16, 16) and item["label"].dtype == torch.int64
    assert item["case_id"] == ids[1]
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0  # genesis_ct scales to [0, 1]
    again = PatchDataset(seg, ids, (16, 16, 16), seed=3)[1]
    assert torch.equal(item["image"], again["image"]) and torch.equal(item["label"], again["label"])
    # another epoch draws other patches for at least one case; returning to epoch 0 gives the first ones back
    first = [ds[i]["image"] for i in range(len(ds))]
    ds.set_epoch(1)
    assert any(not torch.equal(a, ds[i]["image"]) for i, a in enumerate(first))
    ds.set_epoch(0)
    assert all(torch.equal(a, ds[i]["image"]) for i, a in enumerate(first))


def test_patch_larger_than_volume_is_padded(prepared):
    seg, _ = prepared
    item = PatchDataset(seg, seg.case_ids()[:1], (40, 32, 32), seed=0, fg_ratio=0.0)[0]
    assert item["image"].shape == (1, 40, 32, 32)
    # 8 padded slices, 4 before and 4 after (centred), hold 0 in image and label
    assert float(item["image"][0, :4].abs().max()) == 0.0 and int(item["label"][-4:].max()) == 0


def test_case_dataset_and_collate(prepared):
    _, cls = prepared
    ids = cls.case_ids()
    ds = CaseDataset(cls, ids, (24, 24, 24))
    items = [ds[i] for i in range(len(ds))]
    assert items[0]["image"].shape == (1, 24, 24, 24)
    assert items[0]["label"].dtype == torch.int64 and items[0]["label"].shape == ()
    targets = [cls.load(i)[2]["target"] for i in ids]
    assert [int(it["label"]) for it in items] == targets
    batch = collate(items[:2])
    assert batch["image"].shape == (2, 1, 24, 24, 24) and batch["label"].shape == (2,)
    assert batch["case_id"] == ids[:2]


def test_centre_fit_crops_and_pads_centred():
    a = np.arange(6, dtype=np.float32)[None]  # (1, 6)
    assert centre_fit(a, (4,)).tolist() == [[1, 2, 3, 4]]
    assert centre_fit(a, (8,), value=-1).tolist() == [[-1, 0, 1, 2, 3, 4, 5, -1]]


def test_loader_set_epoch_reaches_dataset(prepared):
    seg, _ = prepared

    class Order(torch.utils.data.Sampler):
        def __init__(self, n):
            self.n, self.epoch = n, 0

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __iter__(self):
            return iter(range(self.n))

        def __len__(self):
            return self.n

    ds = PatchDataset(seg, seg.case_ids(), (16, 16, 16), seed=0)
    loader = make_loader(ds, batch_size=2, sampler=Order(len(ds)))
    loader.sampler.set_epoch(5)
    assert ds.epoch == 5 and loader.sampler.epoch == 5
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 1, 16, 16, 16) and batch["label"].shape == (2, 16, 16, 16)
