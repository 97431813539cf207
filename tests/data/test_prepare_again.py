"""A second `data prepare` with nothing to redo reads no image and says so; a changed source is redone alone."""

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

import medtransfer.data.io as mio
from medtransfer.cli import app
from medtransfer.data.phantoms import write_phantom_dataset

runner = CliRunner()


@pytest.fixture
def data(tmp_path):
    return write_phantom_dataset(tmp_path / "data", 3, 0, shape=(16, 16, 16), spacing=(5.0, 5.0, 5.0), with_2d=False)


@pytest.fixture
def reads(monkeypatch):
    calls = []
    real = mio.read_image

    def counting(path, **kw):
        calls.append(f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}")
        return real(path, **kw)

    monkeypatch.setattr(mio, "read_image", counting)
    return calls


def _keys(cache):
    return {k: v["key"] for k, v in json.loads((cache / "manifest.json").read_text())["cases"].items()}


def test_second_prepare_reads_no_image_and_says_nothing_to_redo(data, tmp_path, reads):
    cache = tmp_path / "cache"
    args = ["data", "prepare", str(data), "--out", str(cache), "--preset", "genesis_ct", "--workers", "1"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "prepared 3 cases in" in first.output and "(0 up to date)" in first.output
    assert len(reads) == 12  # the check reads 3 images + 3 labels, the preparation the same again
    keys = _keys(cache)
    reads.clear()
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert reads == []
    assert "3 cases up to date in" in second.output and "nothing to redo" in second.output
    assert _keys(cache) == keys

    # only touched (same bytes, new time): hashed again, not re-read
    image = data / "imagesTr" / "phantom_001.nii.gz"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**10))
    touched = runner.invoke(app, args)
    assert touched.exit_code == 0 and "nothing to redo" in touched.output and reads == []

    # changed content: that case is redone, the others stay
    arr = mio.read_image(image, reorient=False)
    arr.array = arr.array + np.int16(7)
    mio.write_image(arr, image)
    reads.clear()
    changed = runner.invoke(app, args)
    assert changed.exit_code == 0, changed.output
    assert "prepared 1 cases in" in changed.output and "(2 up to date)" in changed.output
    # the check reads every case, the preparation only the changed one
    assert reads.count("imagesTr/phantom_001.nii.gz") == 2 and reads.count("imagesTr/phantom_000.nii.gz") == 1
    new = _keys(cache)
    assert new["phantom_001"] != keys["phantom_001"]
    assert {k: v for k, v in new.items() if k != "phantom_001"} == {k: v for k, v in keys.items() if k != "phantom_001"}


def test_a_changed_preset_redoes_every_case(data, tmp_path, reads):
    cache = tmp_path / "cache"
    base = ["data", "prepare", str(data), "--out", str(cache), "--workers", "1"]
    assert runner.invoke(app, [*base, "--preset", "genesis_ct"]).exit_code == 0
    again = runner.invoke(app, [*base, "--preset", "zscore"])
    assert again.exit_code == 0 and "prepared 3 cases in" in again.output


def test_prepare_after_pending_does_not_hash_the_sources_again(data, tmp_path, monkeypatch):
    import medtransfer.data.cache as cache_mod
    from medtransfer.data.datasets import load_dataset
    from medtransfer.data.preprocess import build_pipeline

    old = 10**18  # files written long before they are hashed (settled), as in a real dataset
    for p in data.rglob("*.nii.gz"):
        os.utime(p, ns=(old, old))
    hashed = []
    real = cache_mod.sha256_file
    monkeypatch.setattr(cache_mod, "sha256_file", lambda p: hashed.append(p) or real(p))
    dataset = load_dataset(data)
    cache = cache_mod.PreparedCache(tmp_path / "cache")
    pipeline = build_pipeline(preset="genesis_ct")
    assert cache.pending(dataset, pipeline, workers=1) == ["phantom_000", "phantom_001", "phantom_002"]
    assert len(hashed) == 6
    cache.prepare(dataset, pipeline, workers=1, progress=False)
    assert len(hashed) == 6 and (cache.redone, cache.reused) == (3, 0)
    assert cache_mod.PreparedCache(tmp_path / "cache").pending(dataset, pipeline, workers=1) == []
    assert len(hashed) == 6
