"""The data commands as a user runs them, on the embedded phantoms."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from medtransfer.cli import app
from medtransfer.data.io import read_image, write_image

runner = CliRunner()


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    result = runner.invoke(app, ["data", "phantoms", "--out", str(out), "--n", "3", "--seed", "2", "--size", "32"])
    assert result.exit_code == 0, result.output
    return out


def test_phantoms_then_inspect_is_clean(phantoms):
    result = runner.invoke(app, ["data", "inspect", str(phantoms), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] and report["format"] == "msd" and report["summary"]["cases"] == 3
    assert report["summary"]["shape"]["max"] == [32, 32, 32]
    assert set(report["summary"]["label_voxels"]) <= {str(v) for v in range(7)}


def test_inspect_names_a_broken_case_and_exits_1(phantoms, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(phantoms, broken)
    label_path = broken / "labelsTr" / "phantom_001.nii.gz"
    label = read_image(label_path)
    label.array[0, 0, 0] = 9
    write_image(label, label_path)
    result = runner.invoke(app, ["data", "inspect", str(broken)])
    assert result.exit_code == 1
    assert "phantom_001.nii.gz" in result.output and "label values [9] are outside the declared classes" in result.output


def test_prepare_builds_a_cache_and_reuses_it(phantoms, tmp_path):
    cache = tmp_path / "cache"
    args = ["data", "prepare", str(phantoms), "--out", str(cache), "--preset", "genesis_ct", "--workers", "1"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    manifest = json.loads((cache / "manifest.json").read_text())
    arrays = sorted(p.name for p in cache.rglob("*.npy"))
    assert len(arrays) == 6  # image + label per case
    mtimes = {p: p.stat().st_mtime_ns for p in cache.rglob("*.npy")}
    second = runner.invoke(app, args)
    again = json.loads((cache / "manifest.json").read_text())
    assert second.exit_code == 0
    assert {k: v["key"] for k, v in again["cases"].items()} == {k: v["key"] for k, v in manifest["cases"].items()}
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.npy")} == mtimes
    image = np.load(next(p for p in cache.rglob("*.npy") if "image" in p.name), mmap_mode="r")
    assert image.dtype == np.float32 and 0.0 <= float(image.min()) and float(image.max()) <= 1.0


def test_cubes_with_margins_for_small_volumes(phantoms, tmp_path):
    out = tmp_path / "cubes"
    result = runner.invoke(app, ["data", "cubes", str(phantoms), "--out", str(out), "--cube-size", "8,16,16",
                                 "--border-xy", "2", "--border-z", "2", "--lung-max", "0.6", "--scale", "4"])
    assert result.exit_code == 0, result.output
    cubes = np.load(out / "cubes_8x16x16_all.npy")
    assert cubes.ndim == 4 and cubes.shape[1:] == (8, 16, 16) and 0 < cubes.shape[0] <= 12
    assert cubes.min() >= 0.0 and cubes.max() <= 1.0


def test_bad_paths_and_options_fail_clearly(tmp_path):
    result = runner.invoke(app, ["data", "inspect", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "nope" in result.output
    result = runner.invoke(app, ["data", "phantoms", "--out", str(tmp_path / "x"), "--size", "8"])
    assert result.exit_code == 2 and "at least 16 voxels" in result.output


@pytest.mark.parametrize("layout,fmt,options", [("luna16", "luna16", ["--task", "detection"]),
                                                ("datalist", "monai_detection", []),
                                                ("deeplesion", "deeplesion", [])])
def test_detection_phantoms_then_inspect_is_clean(tmp_path, layout, fmt, options):
    from medtransfer.data.datasets import load_dataset

    out = tmp_path / layout
    result = runner.invoke(app, ["data", "phantoms", "--out", str(out), "--n", "2", "--layout", layout])
    assert result.exit_code == 0, result.output
    assert f"wrote 2 {layout} detection phantom cases" in result.output
    result = runner.invoke(app, ["data", "inspect", str(out), "--format", fmt, *options, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] and report["format"] == fmt
    dataset = load_dataset(out, format=fmt, **({"task": "detection"} if options else {}))
    assert dataset.task == "detection" and all(len(c.boxes) >= 1 for c in dataset.cases)
    if layout == "luna16":
        assert (out / "candidates.csv").is_file() and len(list((out / "subset0").glob("*.mhd"))) == 2


def test_detection_phantoms_refuse_a_folder_that_is_not_empty(tmp_path):
    out = tmp_path / "luna"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["data", "phantoms", "--out", str(out), "--n", "1", "--layout", "luna16"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "is not empty; nothing was written" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    result = runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (out / "annotations.csv").is_file() and (out / "notes.txt").read_text() == "mine"
    result = runner.invoke(app, ["data", "phantoms", "--out", str(tmp_path / "x"), "--layout", "coco"])
    assert result.exit_code == 2 and "--layout 'coco': choose one of msd, luna16, datalist, deeplesion" in result.output
    assert not (tmp_path / "x").exists()
