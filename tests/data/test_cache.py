"""The prepared-case cache: memmaps equal the pipeline output, reuse, targeted invalidation, corrupt cases."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medtransfer.data.cache import PreparedCache
from medtransfer.data.preprocess import CropForeground, Pipeline, Resample, preset
from medtransfer.data.types import Case, Dataset, Image
from medtransfer.errors import DataError


def read_nifti(path: Path) -> Image:
    """A minimal reader (array order z, y, x) so these tests do not depend on io.py's details."""
    img = nib.load(str(path))
    array = np.asarray(img.dataobj).transpose(2, 1, 0)
    return Image(array, tuple(float(z) for z in img.header.get_zooms()[::-1]), (0.0, 0.0, 0.0), np.eye(3), path)


class CountingReader:
    def __init__(self) -> None:
        self.paths: list[str] = []

    def __call__(self, path: Path) -> Image:
        self.paths.append(Path(path).name)
        return read_nifti(path)


def write_nifti(path: Path, array: np.ndarray, spacing=(2.0, 1.5, 1.0)) -> Path:
    affine = np.diag([*spacing[::-1], 1.0])  # nibabel wants x, y, z
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine), str(path))
    return path


def make_dataset(root: Path, n: int = 3, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(n):
        ct = rng.normal(-800, 50, size=(10, 12, 14)).astype(np.float32)
        ct[2:8, 3:10, 4:12] = rng.normal(40, 20, size=(6, 7, 8))
        label = np.zeros(ct.shape, np.uint8)
        label[3:6, 4:8, 5:9] = 1 + i % 2
        cases.append(Case(f"case_{i:02d}", (write_nifti(root / f"img_{i}.nii.gz", ct),),
                          write_nifti(root / f"lab_{i}.nii.gz", label), target=i % 2))
    return Dataset("toy", root, "folder", "segmentation", cases, labels={0: "background", 1: "a", 2: "b"})


PIPELINE = Pipeline([CropForeground(-500.0, margin=1), Resample((2.0, 2.0, 2.0)), preset("genesis_ct")])


def npy_mtimes(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (root / "cases").glob("*.npy")}


def test_prepare_writes_memmaps_equal_to_the_pipeline_output(tmp_path):
    data = make_dataset(tmp_path / "src")
    cache = PreparedCache(tmp_path / "cache", reader=read_nifti)
    cached = cache.prepare(data, PIPELINE, workers=1, progress=False)
    assert [c.case_id for c in cached] == ["case_00", "case_01", "case_02"]
    for case in data.cases:
        image, label = PIPELINE.pair(read_nifti(case.images[0]), read_nifti(case.label))
        got_image, got_label, meta = cache.load(case.case_id)
        assert isinstance(got_image, np.memmap) and isinstance(got_label, np.memmap)
        assert got_image.dtype == np.float32 and got_label.dtype == np.uint8
        np.testing.assert_array_equal(got_image, image.array[None])  # channels first
        np.testing.assert_array_equal(got_label, label.array)
        assert meta["spacing"] == [2.0, 2.0, 2.0]
        assert meta["shape"] == [1, *image.spatial_shape]
        assert [r["step"] for r in meta["preprocess"]] == ["crop_foreground", "resample", "ct_window"]
        assert meta["target"] == int(case.case_id[-1]) % 2
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["pipeline"] == PIPELINE.to_dict()
    assert "medtransfer" in manifest and set(manifest["cases"]) == {"case_00", "case_01", "case_02"}
    src = manifest["cases"]["case_01"]["sources"][0]
    assert src["sha256"] == __import__("hashlib").sha256(Path(src["path"]).read_bytes()).hexdigest()
    # a fresh cache object reads the same manifest
    np.testing.assert_array_equal(PreparedCache(tmp_path / "cache").load("case_02")[1], cache.load("case_02")[1])


def test_second_prepare_with_nothing_changed_does_no_work(tmp_path):
    data = make_dataset(tmp_path / "src")
    reader = CountingReader()
    cache = PreparedCache(tmp_path / "cache", reader=reader)
    first = cache.prepare(data, PIPELINE, workers=1, progress=False)
    assert len(reader.paths) == 6
    before = npy_mtimes(tmp_path / "cache")
    reader.paths.clear()
    second = cache.prepare(data, PIPELINE, workers=1, progress=False)
    assert reader.paths == []
    assert npy_mtimes(tmp_path / "cache") == before
    assert second == first


def test_changed_parameter_redoes_every_case_and_removes_old_files(tmp_path):
    data = make_dataset(tmp_path / "src")
    reader = CountingReader()
    cache = PreparedCache(tmp_path / "cache", reader=reader)
    cache.prepare(data, PIPELINE, workers=1, progress=False)
    old_files = set(npy_mtimes(tmp_path / "cache"))
    reader.paths.clear()
    changed = Pipeline([CropForeground(-500.0, margin=1), Resample((2.0, 2.0, 2.0)), preset("volf_ct")])
    cache.prepare(data, changed, workers=1, progress=False)
    assert sorted(reader.paths) == sorted(f"{k}_{i}.nii.gz" for k in ("img", "lab") for i in range(3))
    new_files = set(npy_mtimes(tmp_path / "cache"))
    assert len(new_files) == 6 and not new_files & old_files
    assert cache.load("case_00")[0].min() < 0  # volf scales to [-1, 1]


def test_modified_source_file_redoes_only_that_case(tmp_path):
    data = make_dataset(tmp_path / "src")
    reader = CountingReader()
    cache = PreparedCache(tmp_path / "cache", reader=reader)
    cache.prepare(data, PIPELINE, workers=1, progress=False)
    before = npy_mtimes(tmp_path / "cache")
    reader.paths.clear()

    ct = read_nifti(data.cases[1].images[0]).array.copy()
    ct[5, 6, 7] = 900.0
    write_nifti(data.cases[1].images[0], ct)
    cache.prepare(data, PIPELINE, workers=1, progress=False)
    assert sorted(reader.paths) == ["img_1.nii.gz", "lab_1.nii.gz"]
    after = npy_mtimes(tmp_path / "cache")
    unchanged = {k for k in before if not k.startswith("case_01")}
    assert {k: after[k] for k in unchanged} == {k: before[k] for k in unchanged}
    assert not any(k.startswith("case_01") and k in before for k in after)  # case_01 got a new key

    # only touched (new mtime, same bytes): hashed again, found equal, not redone
    reader.paths.clear()
    path = data.cases[0].label
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    cache.prepare(data, PIPELINE, workers=1, progress=False)
    assert reader.paths == []
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["cases"]["case_00"]["label_source"]["mtime_ns"] == path.stat().st_mtime_ns


def test_corrupt_case_fails_by_name_after_the_others_are_cached(tmp_path):
    data = make_dataset(tmp_path / "src", n=3)
    bad = data.cases[1].images[0]
    bad.write_bytes(gzip.compress(b"not a nifti file at all")[:20])  # truncated gzip
    cache = PreparedCache(tmp_path / "cache", reader=read_nifti)
    with pytest.raises(DataError) as err:
        cache.prepare(data, PIPELINE, workers=1, progress=False)
    message = str(err.value)
    assert "1 of 3 cases could not be prepared" in message
    assert "case_01" in message and str(bad) in message
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert list(manifest["cases"]) == ["case_00", "case_02"]
    assert cache.load("case_02")[0].shape[0] == 1
    with pytest.raises(DataError, match="'case_01' is not in the cache"):
        cache.load("case_01")


def test_missing_file_and_duplicate_ids_are_named(tmp_path):
    data = make_dataset(tmp_path / "src", n=2)
    data.cases[0].label.unlink()
    cache = PreparedCache(tmp_path / "cache", reader=read_nifti)
    with pytest.raises(DataError, match=r"lab_0\.nii\.gz: no such file"):
        cache.prepare(data, PIPELINE, workers=1, progress=False)
    assert cache.case_ids() == ["case_01"]
    twice = Dataset("dup", data.root, "folder", "segmentation", [data.cases[1], data.cases[1]])
    with pytest.raises(DataError, match=r"duplicate case ids \['case_01'\]"):
        cache.prepare(twice, PIPELINE, workers=1, progress=False)


def test_removed_cases_leave_the_cache(tmp_path):
    data = make_dataset(tmp_path / "src", n=3)
    cache = PreparedCache(tmp_path / "cache", reader=read_nifti)
    cache.prepare(data, PIPELINE, workers=1, progress=False)
    smaller = Dataset("toy", data.root, "folder", "segmentation", data.cases[:2])
    cache.prepare(smaller, PIPELINE, workers=1, progress=False)
    assert cache.case_ids() == ["case_00", "case_01"]
    assert not any(p.name.startswith("case_02") for p in (tmp_path / "cache" / "cases").iterdir())


def test_channels_labels_dtypes_and_bad_labels(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    t1 = write_nifti(root / "t1.nii.gz", np.full((4, 5, 6), 3.0, np.float32))
    t2 = write_nifti(root / "t2.nii.gz", np.full((4, 5, 6), 5.0, np.float32))
    big = np.zeros((4, 5, 6), np.int16)
    big[0, 0, 0] = 1000
    lab = write_nifti(root / "big.nii.gz", big)
    frac = write_nifti(root / "frac.nii.gz", np.full((4, 5, 6), 0.5, np.float32))
    data = Dataset("mr", root, "nnunet", "segmentation", [Case("a", (t1, t2), lab), Case("b", (t1,), frac)])
    cache = PreparedCache(tmp_path / "cache", reader=read_nifti)
    with pytest.raises(DataError, match=r"frac\.nii\.gz: the label has non-integer"):
        cache.prepare(data, Pipeline([]), workers=1, progress=False)
    image, label, _ = cache.load("a")
    assert image.shape == (2, 4, 5, 6) and image[0].max() == 3 and image[1].min() == 5
    assert label.dtype == np.int16 and label[0, 0, 0] == 1000


def test_worker_processes_with_the_default_reader_match_in_process_results(tmp_path):
    data = make_dataset(tmp_path / "src", n=3)
    serial = PreparedCache(tmp_path / "serial").prepare(data, PIPELINE, workers=1, progress=False)
    parallel = PreparedCache(tmp_path / "parallel").prepare(data, PIPELINE, workers=2, progress=False)
    assert [c.case_id for c in parallel] == ["case_00", "case_01", "case_02"]
    for a, b in zip(serial, parallel):
        image_a, label_a, _ = a.load()
        image_b, label_b, _ = b.load()
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(label_a, label_b)


def test_unchanged_old_files_are_not_hashed_again(tmp_path, monkeypatch):
    import medtransfer.data.cache as cache_module

    data = make_dataset(tmp_path / "src", n=2)
    hour_ago = (Path(data.root).stat().st_mtime_ns - 3600 * 10**9,) * 2
    for case in data.cases:
        for path in (*case.images, case.label):
            os.utime(path, ns=hour_ago)
    cache = PreparedCache(tmp_path / "cache", reader=read_nifti)
    cache.prepare(data, PIPELINE, workers=1, progress=False)
    hashed: list[Path] = []
    real = cache_module.sha256_file
    monkeypatch.setattr(cache_module, "sha256_file", lambda p: hashed.append(p) or real(p))
    cache.prepare(data, PIPELINE, workers=1, progress=False)
    assert hashed == []  # size + mtime fast path
    os.utime(data.cases[1].images[0], None)  # touched now: hashed again, same bytes, nothing redone
    cache.prepare(data, PIPELINE, workers=1, progress=False)
    assert [p.name for p in hashed] == ["img_1.nii.gz"]
