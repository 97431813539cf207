"""Deterministic dataset splits: train/val/test, k-fold, and nested label-fraction subsets.

Every split orders the case ids by ``sha256(f"{seed}:{case_id}")``. Why a hash rather than a shuffle: the order is
the same on every machine, Python and numpy version, does not depend on the order the ids arrive in, and a case's
place does not move when other cases are added or removed (a new case joins a split without reshuffling the rest).
Results are returned sorted by id so that a saved split reads naturally and compares with ``==``.

Sizes round half up (``floor(fraction * n + 0.5)``), so 10% of 25 cases is 3, and a requested non-zero part never
rounds down to nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Hashable, Iterable, Mapping

from ..errors import DataError

SPLIT_FORMAT_VERSION = 1


class SplitError(DataError, ValueError):
    """Split arguments that cannot work for these cases (too few cases, fractions out of range, duplicate ids)."""


def hash_order(case_ids: Iterable[str], seed: int = 0) -> list[str]:
    """The ids in the order of ``sha256("<seed>:<id>")``: the one shuffle all splits use."""
    ids = _unique(case_ids)
    return sorted(ids, key=lambda cid: (hashlib.sha256(f"{seed}:{cid}".encode()).hexdigest(), cid))


def train_val_test(case_ids: Iterable[str], *, val: float = 0.2, test: float = 0.0, seed: int = 0) -> dict[str, list[str]]:
    """Hold out ``test`` then ``val`` (fractions of all cases). The test part is the start of the hash order, so it
    does not change when ``val`` changes."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise SplitError(f"val={val}, test={test}: each must be in [0, 1) and together below 1")
    order = hash_order(case_ids, seed)
    n = len(order)
    n_test, n_val = _count(test, n), _count(val, n)
    if n and n_test + n_val >= n:
        raise SplitError(f"{n} case(s) cannot give {n_val} validation and {n_test} test case(s) and still leave one "
                         "to train on; fix: lower val/test or add cases")  # fmt: skip
    return {
        "train": sorted(order[n_test + n_val :]),
        "val": sorted(order[n_test : n_test + n_val]),
        "test": sorted(order[:n_test]),
    }


def kfold(case_ids: Iterable[str], *, k: int = 5, fold: int, seed: int = 0) -> dict[str, list[str]]:
    """Fold ``fold`` of ``k``: the hash order cut into ``k`` contiguous parts (sizes differ by at most one);
    part ``fold`` is ``val``, the rest ``train``. Over ``fold = 0..k-1`` the val parts partition the ids."""
    order = hash_order(case_ids, seed)
    if k < 2 or k > len(order):
        raise SplitError(f"k={k} folds need 2 <= k <= the number of cases ({len(order)})")
    if not 0 <= fold < k:
        raise SplitError(f"fold={fold} must be in 0..{k - 1}")
    base, extra = divmod(len(order), k)
    start = fold * base + min(fold, extra)
    stop = start + base + (fold < extra)
    return {"train": sorted(order[:start] + order[stop:]), "val": sorted(order[start:stop])}


def label_fraction(
    case_ids: Iterable[str],
    fraction: float,
    *,
    seed: int = 0,
    targets: Mapping[str, Hashable | list] | None = None,
) -> list[str]:
    """The labelled subset for ``fraction`` of the cases: a prefix of one fixed order, hence NESTED (for one seed,
    the 1% subset lies inside the 10% subset, inside the 25%...) and stable. At least one case when ``fraction >
    0``; ``1.0`` gives all.

    ``targets`` (case id -> class, or a multi-label vector used as a whole as the stratum) stratifies while keeping
    nesting: within each class the cases keep their hash order, and the j-th of a class of size m is placed at
    quantile ``(j + 1/2) / m`` of the merged order. Every prefix therefore holds ``round(q * m_c)`` cases of each
    class c for one common quantile q: every class at the same within-class fraction, up to rounding. The
    smallest subsets favour the largest classes; a class may be absent from a subset smaller than the class count.
    """
    if not 0 <= fraction <= 1:
        raise SplitError(f"fraction={fraction} must be in [0, 1]")
    order = stratified_order(case_ids, seed, targets) if targets is not None else hash_order(case_ids, seed)
    if fraction == 0:
        return []
    return sorted(order[: max(1, _count(fraction, len(order)))])


def stratified_order(
    case_ids: Iterable[str], seed: int, targets: Mapping[str, Hashable | list]
) -> list[str]:
    """Merge the per-class hash orders by within-class quantile (see `label_fraction`)."""
    order = hash_order(case_ids, seed)
    missing = [cid for cid in order if cid not in targets]
    if missing:
        raise SplitError(f"targets lack {len(missing)} case id(s), e.g. {missing[:3]}; fix: give every case a target")
    strata: dict[Hashable, list[str]] = {}
    for cid in order:
        target = targets[cid]
        strata.setdefault(tuple(target) if isinstance(target, (list, tuple)) else target, []).append(cid)
    rank = {cid: i for i, cid in enumerate(order)}
    keyed = [((2 * j + 1) / (2 * len(members)), rank[cid], cid) for members in strata.values()
             for j, cid in enumerate(members)]  # fmt: skip
    return [cid for _, _, cid in sorted(keyed)]


@dataclass(frozen=True)
class Split:
    """A split saved with a run so that the run can be repeated on exactly the same cases."""

    train: list[str]
    val: list[str]
    test: list[str] = field(default_factory=list)
    seed: int = 0
    method: str = "train_val_test"  # or "kfold"
    params: dict[str, Any] = field(default_factory=dict)  # val, test, k, fold, fraction

    def save(self, path: str | os.PathLike) -> Path:
        """Write as JSON, atomically."""
        from ..weights.io import atomic_write

        text = json.dumps({"version": SPLIT_FORMAT_VERSION, **asdict(self)}, indent=2) + "\n"
        return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Split":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise DataError(f"{path}: cannot read the split file ({e.strerror}); fix the path") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}); fix or delete the split file") from None
        if not isinstance(data, dict) or not {"train", "val"} <= set(data):
            raise DataError(f"{path}: not a split file (needs 'train' and 'val' lists); fix: write it with Split.save")
        version = data.pop("version", SPLIT_FORMAT_VERSION)
        if not isinstance(version, int) or version > SPLIT_FORMAT_VERSION:
            raise DataError(f"{path}: written by a newer medtransfer; fix: upgrade medtransfer")
        known = {k: data[k] for k in ("train", "val", "test", "seed", "method", "params") if k in data}
        return cls(**known)

    def check(self, case_ids: Iterable[str]) -> None:
        """Refuse a split that names cases the dataset does not have (a split reused on the wrong dataset)."""
        have = set(case_ids)
        unknown = sorted({*self.train, *self.val, *self.test} - have)
        if unknown:
            raise DataError(f"the split names {len(unknown)} case(s) not in the dataset, e.g. {unknown[:3]}; fix: "
                            "make a new split for this dataset")  # fmt: skip
        overlap = sorted((set(self.train) & set(self.val)) | (set(self.train) & set(self.test))
                         | (set(self.val) & set(self.test)))  # fmt: skip
        if overlap:
            raise DataError(f"the split puts {overlap[:3]} in more than one part; fix: make a new split")


def make_split(
    case_ids: Iterable[str],
    *,
    val: float = 0.2,
    test: float = 0.0,
    k: int | None = None,
    fold: int | None = None,
    fraction: float = 1.0,
    seed: int = 0,
    targets: Mapping[str, Hashable | list] | None = None,
) -> Split:
    """One call for a run: hold out ``test``; then ``val`` by fraction, or fold ``fold`` of ``k`` when ``k`` is given;
    then keep ``fraction`` of the training cases labelled (val and test stay whole, as in label-efficiency studies)."""
    ids = _unique(case_ids)
    if k is not None:
        if fold is None:
            raise SplitError(f"k={k} needs fold=0..{k - 1}")
        held = train_val_test(ids, val=0.0, test=test, seed=seed)
        parts = {**kfold(held["train"], k=k, fold=fold, seed=seed), "test": held["test"]}
        method, params = "kfold", {"test": test, "k": k, "fold": fold, "fraction": fraction}
    else:
        parts = train_val_test(ids, val=val, test=test, seed=seed)
        method, params = "train_val_test", {"val": val, "test": test, "fraction": fraction}
    train = label_fraction(parts["train"], fraction, seed=seed, targets=targets) if fraction < 1 else parts["train"]
    return Split(train=train, val=parts["val"], test=parts["test"], seed=seed, method=method, params=params)


def dataset_split(
    parts: Mapping[str, str],
    case_ids: Iterable[str],
    *,
    fraction: float = 1.0,
    seed: int = 0,
    targets: Mapping[str, Hashable | list] | None = None,
    source: str = "",
) -> Split:
    """The split a dataset ships (``parts``: case id -> ``train``, ``val`` or ``test``, as the DeepLesion and MONAI
    datalist readers keep it in ``description["split"]``); ``fraction`` of its training cases stay labelled, the
    nested subset :func:`label_fraction` gives (val and test stay whole). Every case must have a known part, and
    the training part must not be empty."""
    ids = _unique(case_ids)
    missing = [cid for cid in ids if cid not in parts]
    if missing:
        raise SplitError(f"the dataset's split names no part for {len(missing)} case(s), e.g. {missing[:3]}; fix: "
                         "give every case its part, or draw a split with data.split: random")
    wrong = sorted({str(parts[cid]) for cid in ids} - {"train", "val", "test"})
    if wrong:
        raise SplitError(f"the dataset's split has unknown part(s) {wrong}; the parts are train, val and test")
    by = {name: sorted(cid for cid in ids if parts[cid] == name) for name in ("train", "val", "test")}
    if not by["train"]:
        raise SplitError("the dataset's split has no training cases; fix the dataset, or draw a split with "
                         "data.split: random")
    train = label_fraction(by["train"], fraction, seed=seed, targets=targets) if fraction < 1 else by["train"]
    return Split(train=train, val=by["val"], test=by["test"], seed=seed, method="dataset",
                 params={"fraction": fraction, "source": source})


def _unique(case_ids: Iterable[str]) -> list[str]:
    ids = [str(c) for c in case_ids]
    dupes = sorted(c for c, n in Counter(ids).items() if n > 1)
    if dupes:
        raise SplitError(f"duplicate case ids {dupes[:5]}; fix: give every case its own id before splitting")
    return ids


def _count(fraction: float, n: int) -> int:
    """Round half up; a non-zero fraction of a non-empty set is at least one case."""
    if fraction <= 0 or n == 0:
        return 0
    return max(1, math.floor(fraction * n + 0.5))
