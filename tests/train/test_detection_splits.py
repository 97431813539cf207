"""A dataset's own split (DeepLesion's Train_Val_Test, a MONAI datalist's training/validation lists) is the run's
split by default; ``data.split: random`` or ``data.fold`` draw one; ``label_fraction`` subsets its training part."""

from __future__ import annotations

import logging

import pytest

from medtransfer.data.datasets import load_dataset
from medtransfer.data.phantoms_detection import write_detection_phantoms
from medtransfer.data.splits import SplitError, dataset_split, label_fraction, make_split
from medtransfer.train.config import load_config
from medtransfer.train.finetune import _draw_split


def _cfg(**data):
    return load_config({"model": {"name": "resnet50_2d", "task": "detection"}, "data": {"val_fraction": 0.25, **data},
                        "out": "unused"})


@pytest.fixture(scope="module")
def deeplesion(tmp_path_factory):
    return load_dataset(write_detection_phantoms(tmp_path_factory.mktemp("dl"), 6, 0, "deeplesion"))


@pytest.fixture(scope="module")
def datalist(tmp_path_factory):
    return load_dataset(write_detection_phantoms(tmp_path_factory.mktemp("dlist"), 4, 0, "datalist"))


def _parts(dataset):
    parts = dataset.description["split"]
    return {name: sorted(c for c, p in parts.items() if p == name) for name in ("train", "val", "test")}


def test_deeplesion_split_is_the_runs_by_default(deeplesion, caplog):
    want = _parts(deeplesion)
    assert want["val"] and want["test"] and want["train"]  # the phantoms fill every part
    with caplog.at_level(logging.WARNING, logger="medtransfer.train.finetune"):
        split = _draw_split(_cfg(), deeplesion, 0, None)
    assert (split.train, split.val, split.test) == (want["train"], want["val"], want["test"])
    assert split.method == "dataset" and split.params == {"fraction": 1.0,
                                                          "source": "DL_info.csv column Train_Val_Test"}
    assert ("split: the dataset's own (DL_info.csv column Train_Val_Test): "
            f"{len(want['train'])} train, {len(want['val'])} val, {len(want['test'])} test cases") in caplog.text


def test_label_fraction_subsets_the_datasets_training_part(deeplesion):
    want = _parts(deeplesion)
    split = _draw_split(_cfg(label_fraction=0.5), deeplesion, 3, None)
    assert split.train == label_fraction(want["train"], 0.5, seed=3) and len(split.train) < len(want["train"])
    assert (split.val, split.test) == (want["val"], want["test"])


def test_random_or_fold_draws_a_split(deeplesion, caplog):
    ids = [c.case_id for c in deeplesion.cases]
    with caplog.at_level(logging.WARNING, logger="medtransfer.train.finetune"):
        drawn = _draw_split(_cfg(split="random"), deeplesion, 0, None)
    assert drawn == make_split(ids, val=0.25, seed=0) and drawn.method == "train_val_test"
    assert "the dataset has its own split, not used (data.split is random)" in caplog.text
    fold = _draw_split(_cfg(fold=1), deeplesion, 0, None)
    assert fold.method == "kfold" and fold == make_split(ids, val=0.25, k=5, fold=1, seed=0)


def test_monai_datalist_training_validation_lists(datalist):
    want = _parts(datalist)
    assert want["train"] and want["val"]
    split = _draw_split(_cfg(), datalist, 0, None)
    assert (split.train, split.val, split.test) == (want["train"], want["val"], [])
    assert split.params["source"] == "the datalist's training/validation/test lists"


def test_dataset_split_refuses_what_it_cannot_use():
    with pytest.raises(SplitError, match=r"names no part for 1 case\(s\), e.g. \['c'\]"):
        dataset_split({"a": "train", "b": "val"}, ["a", "b", "c"])
    with pytest.raises(SplitError, match=r"unknown part\(s\) \['holdout'\]"):
        dataset_split({"a": "train", "b": "holdout"}, ["a", "b"])
    with pytest.raises(SplitError, match="no training cases"):
        dataset_split({"a": "val", "b": "test"}, ["a", "b"])
