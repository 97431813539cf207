"""Splits: pinned expected ids (an algorithm change is caught), determinism, partitions, nested label fractions."""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from medtransfer.data.splits import (
    Split,
    SplitError,
    hash_order,
    kfold,
    label_fraction,
    make_split,
    stratified_order,
    train_val_test,
)
from medtransfer.errors import DataError

IDS = [f"case_{i:02d}" for i in range(10)]
FRACTIONS = (0.01, 0.1, 0.25, 1.0)


# ---------------------------------------------------------------- pinned values (stable across runs and versions)


def test_order_is_sha256_of_seed_and_id():
    digest = lambda cid: hashlib.sha256(f"0:{cid}".encode()).hexdigest()  # noqa: E731
    assert hash_order(IDS, 0) == sorted(IDS, key=digest)
    assert hash_order(IDS, 0) == ["case_02", "case_04", "case_00", "case_08", "case_05",
                                  "case_01", "case_03", "case_09", "case_07", "case_06"]  # fmt: skip


def test_pinned_splits_for_a_small_case():
    assert train_val_test(IDS, val=0.2, test=0.2, seed=0) == {
        "train": ["case_01", "case_03", "case_05", "case_06", "case_07", "case_09"],
        "val": ["case_00", "case_08"],
        "test": ["case_02", "case_04"],
    }
    assert kfold(IDS, k=3, fold=1, seed=0) == {
        "train": ["case_00", "case_02", "case_04", "case_06", "case_07", "case_08", "case_09"],
        "val": ["case_01", "case_03", "case_05"],
    }
    assert label_fraction(IDS, 0.25, seed=0) == ["case_00", "case_02", "case_04"]
    assert label_fraction(IDS, 0.25, seed=1) == ["case_02", "case_05", "case_08"]
    # classes True = {00, 03, 06, 09} (quantiles 1/8, 3/8, ...) merged with False (quantiles 1/12, 3/12, ...)
    targets = {cid: i % 3 == 0 for i, cid in enumerate(IDS)}
    assert stratified_order(IDS, 0, targets) == ["case_02", "case_00", "case_04", "case_03", "case_08",
                                                  "case_05", "case_09", "case_01", "case_06", "case_07"]  # fmt: skip


# ---------------------------------------------------------------- determinism


def test_same_seed_same_split_whatever_the_input_order():
    shuffled = IDS[:]
    random.Random(3).shuffle(shuffled)
    assert train_val_test(shuffled, val=0.3, seed=7) == train_val_test(IDS, val=0.3, seed=7)
    assert kfold(reversed(IDS), k=4, fold=2, seed=7) == kfold(IDS, k=4, fold=2, seed=7)
    assert label_fraction(shuffled, 0.5, seed=7) == label_fraction(IDS, 0.5, seed=7)
    assert len({tuple(hash_order(IDS, s)) for s in range(20)}) == 20  # seeds differ


def test_adding_a_case_does_not_move_the_others():
    grown = hash_order(IDS + ["case_new"], 5)
    grown.remove("case_new")
    assert grown == hash_order(IDS, 5)


# ---------------------------------------------------------------- partitions


def test_train_val_test_partitions_with_half_up_sizes():
    ids = [f"s{i}" for i in range(25)]
    parts = train_val_test(ids, val=0.2, test=0.1, seed=1)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [17, 5, 3]  # 2.5 -> 3
    assert sorted(parts["train"] + parts["val"] + parts["test"]) == sorted(ids)
    assert train_val_test(ids, val=0.2, test=0.0, seed=1)["test"] == []
    assert train_val_test(ids, val=0.25, test=0.1, seed=1)["test"] == parts["test"]  # test does not depend on val
    assert [len(v) for v in train_val_test(["a", "b"], val=0.01).values()] == [1, 1, 0]  # non-zero -> at least 1


def test_kfold_val_parts_partition_the_ids():
    ids = [f"s{i}" for i in range(23)]
    for k in range(2, 8):
        folds = [kfold(ids, k=k, fold=f, seed=4) for f in range(k)]
        vals = [set(f["val"]) for f in folds]
        assert sorted(x for v in vals for x in v) == sorted(ids)
        assert max(map(len, vals)) - min(map(len, vals)) <= 1
        for f in folds:
            assert sorted(f["train"] + f["val"]) == sorted(ids) and not set(f["train"]) & set(f["val"])


# ---------------------------------------------------------------- nested label fractions


def test_label_fractions_are_nested_for_many_seeds():
    ids = [f"p{i:03d}" for i in range(150)]
    for seed in range(40):
        subsets = [set(label_fraction(ids, f, seed=seed)) for f in FRACTIONS]
        assert [len(s) for s in subsets] == [2, 15, 38, 150]  # 1.5 -> 2, 37.5 -> 38
        assert subsets[0] < subsets[1] < subsets[2] < subsets[3] == set(ids)


def test_label_fraction_bounds():
    assert label_fraction(IDS, 0.0001) == ["case_02"]  # at least one case
    assert label_fraction(IDS, 0.0) == []
    assert label_fraction(IDS, 1.0) == sorted(IDS)
    for bad in (-0.1, 1.5):
        with pytest.raises(SplitError, match=rf"fraction={bad} must be in \[0, 1\]"):
            label_fraction(IDS, bad)


def test_stratified_fractions_are_nested_and_balanced_for_many_seeds():
    ids = [f"p{i:03d}" for i in range(120)]
    targets = {cid: ("a", "b", "c")[0 if i < 80 else 1 if i < 110 else 2] for i, cid in enumerate(ids)}  # 80/30/10
    sizes = {"a": 80, "b": 30, "c": 10}
    for seed in range(25):
        subsets = [set(label_fraction(ids, f, seed=seed, targets=targets)) for f in FRACTIONS]
        assert subsets[0] < subsets[1] < subsets[2] < subsets[3] == set(ids)
        order = stratified_order(ids, seed, targets)
        for m in range(1, len(ids) + 1):  # every prefix: each class at one within-class fraction, up to rounding
            counts = {c: sum(targets[x] == c for x in order[:m]) for c in sizes}
            for c in sizes:
                for d in sizes:
                    gap = abs(counts[c] / sizes[c] - counts[d] / sizes[d])
                    assert gap <= 1 / (2 * sizes[c]) + 1 / (2 * sizes[d]) + 1e-12
    subset = label_fraction(ids, 0.25, seed=0, targets=targets)
    assert [sum(targets[x] == c for x in subset) for c in "abc"] == [20, 8, 2]  # 25% of 80/30/10, rounded


def test_stratification_accepts_multilabel_vectors_and_needs_every_target():
    targets = {cid: [i % 2, 0] for i, cid in enumerate(IDS)}
    assert len(label_fraction(IDS, 0.5, targets=targets)) == 5
    with pytest.raises(SplitError, match=r"targets lack 1 case id\(s\), e.g. \['case_09'\]"):
        label_fraction(IDS, 0.5, targets={c: 0 for c in IDS[:-1]})


# ---------------------------------------------------------------- errors


def test_bad_arguments_are_refused_with_the_reason():
    with pytest.raises(SplitError, match=r"duplicate case ids \['a'\]"):
        train_val_test(["a", "b", "a"])
    with pytest.raises(SplitError, match="together below 1"):
        train_val_test(IDS, val=0.6, test=0.5)
    with pytest.raises(SplitError, match="1 case\\(s\\) cannot give 1 validation and 0 test"):
        train_val_test(["only"], val=0.2)
    with pytest.raises(SplitError, match=r"k=11 folds need 2 <= k <= the number of cases \(10\)"):
        kfold(IDS, k=11, fold=0)
    with pytest.raises(SplitError, match=r"fold=3 must be in 0\.\.2"):
        kfold(IDS, k=3, fold=3)
    assert issubclass(SplitError, DataError) and issubclass(SplitError, ValueError)


# ---------------------------------------------------------------- Split record


def test_split_saves_and_loads_exactly(tmp_path):
    split = make_split(IDS, val=0.2, test=0.2, fraction=0.5, seed=0)
    assert split.test == ["case_02", "case_04"] and split.val == ["case_00", "case_08"]
    assert split.train == label_fraction(["case_01", "case_03", "case_05", "case_06", "case_07", "case_09"], 0.5)
    assert split.params == {"val": 0.2, "test": 0.2, "fraction": 0.5}
    path = split.save(tmp_path / "runs/split.json")
    assert json.loads(path.read_text())["version"] == 1
    assert Split.load(path) == split
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]  # atomic: no temp file left
    split.check(IDS)


def test_make_split_kfold_holds_out_test_first():
    split = make_split(IDS, test=0.2, k=4, fold=0, seed=0)
    assert split.method == "kfold" and split.test == ["case_02", "case_04"]
    rest = sorted(set(IDS) - set(split.test))
    assert split.val == kfold(rest, k=4, fold=0)["val"] and sorted(split.train + split.val) == rest
    with pytest.raises(SplitError, match="k=4 needs fold=0..3"):
        make_split(IDS, k=4)


def test_split_load_and_check_errors(tmp_path):
    with pytest.raises(DataError, match="cannot read the split file"):
        Split.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"train": [\n"a",\n}')
    with pytest.raises(DataError, match=r"bad\.json:3:1: invalid JSON"):
        Split.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"name": "x"}')
    with pytest.raises(DataError, match="not a split file"):
        Split.load(tmp_path / "other.json")
    (tmp_path / "new.json").write_text('{"version": 99, "train": [], "val": []}')
    with pytest.raises(DataError, match="newer medtransfer"):
        Split.load(tmp_path / "new.json")
    with pytest.raises(DataError, match=r"names 1 case\(s\) not in the dataset, e.g. \['zz'\]"):
        Split(train=["case_00", "zz"], val=["case_01"]).check(IDS)
    with pytest.raises(DataError, match=r"puts \['case_01'\] in more than one part"):
        Split(train=["case_00", "case_01"], val=["case_01"]).check(IDS)
