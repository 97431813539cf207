"""NCC candidate cubes (data/candidates.py): centring against SimpleITK on a flipped anisotropic scan, resampling,
the dataset folder, skips, refusals and the CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from medtransfer.cli import app
from medtransfer.data.candidates import cut_cube, extract_candidates, froc_inputs, read_manifest, read_table
from medtransfer.data.check import check_dataset
from medtransfer.data.datasets import load_dataset
from medtransfer.data.geometry import Grid
from medtransfer.data.io import read_image
from medtransfer.errors import DataError

# ITK order (x, y, z): x and z flipped, anisotropic spacing (read_image reorients it, so array and file differ)
DIRECTION = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
SPACING = (0.7, 0.9, 2.5)
ORIGIN = (10.0, -20.0, 30.0)


def _scan(path, array, spacing=SPACING, origin=ORIGIN, direction=DIRECTION):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return img


def _unique_scan(path):
    """(10, 12, 14) [z, y, x] voxels, each with its own value in the HU window, so a voxel tells where it came from."""
    array = (np.arange(10 * 12 * 14) - 1000).astype(np.int16).reshape(10, 12, 14)
    return _scan(path, array), array


def _point(img, index_xyz, offset=(0.2, -0.3, 0.1)):
    return img.TransformContinuousIndexToPhysicalPoint([i + o for i, o in zip(index_xyz, offset)])


def test_cube_centre_and_every_voxel_match_simpleitk_on_a_flipped_anisotropic_scan(tmp_path):
    img, array = _unique_scan(tmp_path / "scan.mhd")
    image = read_image(tmp_path / "scan.mhd")  # reoriented to canonical: the array differs from the file's
    for index in [(3, 4, 5), (0, 0, 0), (13, 11, 9), (7, 2, 8)]:
        xyz = _point(img, index)
        cube, grid = cut_cube(image, xyz, size=(4, 6, 6))
        i, j, k = img.TransformPhysicalPointToIndex(xyz)
        assert (i, j, k) == index
        assert cube.dtype == np.int16 and cube.shape == (4, 6, 6)
        assert cube[2, 3, 3] == array[k, j, i]  # the candidate's voxel is cube voxel size // 2
        for voxel in np.ndindex(cube.shape):  # every cube voxel, by its world position, is SimpleITK's voxel
            world = grid.to_world(voxel)[::-1]  # medtransfer's world components run z, y, x
            ci = np.asarray(img.TransformPhysicalPointToContinuousIndex(world.tolist()))
            assert np.allclose(ci, np.rint(ci), atol=1e-6)
            x, y, z = np.rint(ci).astype(int)
            inside = 0 <= x < 14 and 0 <= y < 12 and 0 <= z < 10
            assert cube[voxel] == (array[z, y, x] if inside else -1000), voxel
        assert grid.spacing == (2.5, 0.9, 0.7)


def test_cube_outside_the_scan_is_none(tmp_path):
    img, _ = _unique_scan(tmp_path / "scan.mhd")
    image = read_image(tmp_path / "scan.mhd")
    assert cut_cube(image, _point(img, (14, 3, 3), (0.0, 0, 0)), size=(4, 6, 6)) == (None, None)  # x = 14 > 13.5
    assert cut_cube(image, _point(img, (13, 3, 3), (0.49, 0, 0)), size=(4, 6, 6))[0] is not None


def test_resampled_cube_is_centred_on_the_candidate_and_interpolates_linearly(tmp_path):
    z, y, x = np.meshgrid(np.arange(10), np.arange(12), np.arange(14), indexing="ij")
    array = (20 * x - 30 * y + 50 * z - 200).astype(np.int16)  # linear in the index: linear interpolation is exact
    img = _scan(tmp_path / "ramp.mhd", array)
    image = read_image(tmp_path / "ramp.mhd")
    xyz = _point(img, (6, 5, 4))
    cube, grid = cut_cube(image, xyz, size=(3, 4, 4), spacing=(1.25, 0.45, 0.35))
    assert grid.spacing == (1.25, 0.45, 0.35)
    assert np.allclose(grid.to_world((1, 2, 2))[::-1], xyz)  # cube voxel size // 2 sits on the candidate
    for voxel in np.ndindex(cube.shape):
        ci = img.TransformPhysicalPointToContinuousIndex(grid.to_world(voxel)[::-1].tolist())
        expected = 20 * ci[0] - 30 * ci[1] + 50 * ci[2] - 200
        assert cube[voxel] == np.rint(expected), voxel


def _luna(root, *, with_annotations=True):
    """subset0/scanA, subset1/scanB; candidates: 2 + 2 inside, one outside scanA, one of a scan not downloaded."""
    a, _ = _unique_scan(root / "subset0" / "scanA.mhd")
    b, _ = _unique_scan(root / "subset1" / "scanB.mhd")
    rows = [("scanA", _point(a, (3, 4, 5)), 1), ("scanA", _point(a, (10, 2, 2)), 0),
            ("scanMissing", (0.0, 0.0, 0.0), 0), ("scanA", _point(a, (40, 2, 2), (0, 0, 0)), 0),
            ("scanB", _point(b, (7, 7, 7)), 0), ("scanB", _point(b, (1, 1, 1)), 1)]
    with (root / "candidates.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seriesuid", "coordX", "coordY", "coordZ", "class"])
        for uid, p, c in rows:
            w.writerow([uid, *p, c])
    if with_annotations:
        with (root / "annotations.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
            w.writerow(["scanA", *rows[0][1], 6.0])
            w.writerow(["scanB", *rows[5][1], 4.0])
            w.writerow(["scanMissing", 1, 2, 3, 5.0])
    return rows


def test_extract_writes_a_classification_dataset_with_skips_listed(tmp_path):
    rows = _luna(tmp_path / "luna")
    out = tmp_path / "ncc"
    result = extract_candidates(tmp_path / "luna", tmp_path / "luna" / "candidates.csv", out, size=(4, 6, 6),
                                progress=False)
    assert (result.written, result.positives, result.scans) == (4, 2, 2)
    assert (result.skipped_no_scan, result.skipped_outside) == (1, 1)
    skipped = json.loads((out / "skipped.json").read_text())
    assert [(s["row"], s["seriesuid"], s["why"]) for s in skipped] == [(2, "scanMissing", "no scan"),
                                                                      (3, "scanA", "outside its scan")]
    with (out / "candidates.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["case_id"] for r in table] == ["c0000000", "c0000001", "c0000004", "c0000005"]
    assert [(r["seriesuid"], r["class"], r["subset"]) for r in table] == [
        ("scanA", "1", "subset0"), ("scanA", "0", "subset0"), ("scanB", "0", "subset1"), ("scanB", "1", "subset1")]
    assert float(table[3]["coordX"]) == rows[5][1][0]
    dataset = load_dataset(out / "candidates.csv")
    assert dataset.task == "classification" and dataset.labels == {0: "0", 1: "1"}
    assert [c.target for c in dataset.cases] == [1, 0, 0, 1]
    assert check_dataset(dataset, workers=1).ok
    cube = read_image(out / table[0]["image"])
    assert cube.array.shape == (4, 6, 6) and cube.array.dtype == np.int16
    manifest = read_manifest(out / "candidates.csv")
    assert manifest["scans"] == ["scanA", "scanB"] and manifest["spacing"] == "native"
    assert sorted(manifest["nodules"]) == ["scanA", "scanB"]  # the scans used, not scanMissing
    assert manifest["nodules"]["scanB"][0]["diameter_mm"] == 4.0


def test_subsets_limit_the_scans(tmp_path):
    _luna(tmp_path / "luna")
    result = extract_candidates(tmp_path / "luna", tmp_path / "luna" / "candidates.csv", tmp_path / "ncc",
                                size=(4, 6, 6), subsets=["subset1"], progress=False)
    assert (result.written, result.scans, result.skipped_no_scan) == (2, 1, 4)
    with pytest.raises(DataError, match="no folder subset7"):
        extract_candidates(tmp_path / "luna", tmp_path / "luna" / "candidates.csv", tmp_path / "x",
                           subsets=["subset7"], progress=False)


def test_refusals_write_nothing(tmp_path):
    _luna(tmp_path / "luna")
    luna, cands, out = tmp_path / "luna", tmp_path / "luna" / "candidates.csv", tmp_path / "ncc"
    extract_candidates(luna, cands, out, size=(4, 6, 6), progress=False)
    before = (out / "candidates.csv").read_bytes()
    with pytest.raises(DataError, match="already holds candidates.csv, ncc.json, skipped.json, cubes of an "
                                        "extraction; pass --overwrite"):
        extract_candidates(luna, cands, out, size=(4, 6, 6), progress=False)
    assert (out / "candidates.csv").read_bytes() == before
    extract_candidates(luna, cands, out, size=(2, 2, 2), overwrite=True, progress=False)
    assert read_image(next((out / "cubes" / "scanA").iterdir())).array.shape == (2, 2, 2)

    bad = tmp_path / "bad.csv"
    bad.write_text("seriesuid,coordX,coordY,class\nscanA,1,2,0\n")
    with pytest.raises(DataError, match=r"bad.csv:1: header .* lacks coordZ"):
        extract_candidates(luna, bad, tmp_path / "n2", progress=False)
    bad.write_text("seriesuid,coordX,coordY,coordZ,class\nscanA,1,2,3,0\nscanA,1,x,3,1\n")
    with pytest.raises(DataError, match=r"bad.csv:3: a coordinate or the class is not a number"):
        extract_candidates(luna, bad, tmp_path / "n2", progress=False)
    bad.write_text("seriesuid,coordX,coordY,coordZ,class\nscanA,1e4,2,3,0\nnone,1,2,3,1\n")
    with pytest.raises(DataError, match="every candidate of .* lies outside its scan or has none; nothing written"):
        extract_candidates(luna, bad, tmp_path / "n2", progress=False)
    assert not (tmp_path / "n2").exists()


def test_froc_inputs_points_form(tmp_path):
    rows = _luna(tmp_path / "luna")
    out = tmp_path / "ncc"
    extract_candidates(tmp_path / "luna", tmp_path / "luna" / "candidates.csv", out, size=(4, 6, 6), progress=False)
    table, manifest = read_table(out), read_manifest(out)
    got = froc_inputs({"c0000000": 2.0, "c0000001": -1.0}, table, manifest)  # only scanA's candidates scored
    assert got["n_scans"] == 1 and got["complete"] is True
    assert got["detections"] == [("scanA", 2.0, tuple(rows[0][1])), ("scanA", -1.0, tuple(rows[1][1]))]
    assert got["lesions"] == [("scanA", tuple(rows[0][1]), 3.0)]
    partial = froc_inputs({"c0000000": 2.0, "c0000005": 0.5}, table, manifest)
    assert partial["n_scans"] == 2 and partial["complete"] is False and len(partial["lesions"]) == 2
    with pytest.raises(DataError, match="not in the candidate table"):
        froc_inputs({"c0000003": 1.0}, table, manifest)


def test_cli_candidates(tmp_path):
    _luna(tmp_path / "luna", with_annotations=False)
    args = ["data", "candidates", str(tmp_path / "luna"), "--candidates", str(tmp_path / "luna" / "candidates.csv"),
            "--out", str(tmp_path / "ncc"), "--cube-size", "4,6,6"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wrote 4 cubes (2 nodule candidates) from 2 scans" in result.output
    assert "skipped 2 candidates: 1 without a scan" in result.output and "1 outside their scan" in result.output
    assert read_manifest(tmp_path / "ncc")["nodules"] is None
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "pass --overwrite" in again.output
    assert CliRunner().invoke(app, args + ["--overwrite"]).exit_code == 0
    bad = CliRunner().invoke(app, args[:-1] + ["4,x,6"])
    assert bad.exit_code == 2 and "give three numbers" in bad.output
