"""`data inspect` on detection datasets: a box outside its scan, of zero size, with the wrong number of
coordinates or an undeclared label, and a case without its scan, each an error naming the case and the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medtransfer.cli import app
from medtransfer.data.check import check_dataset
from medtransfer.data.datasets import load_dataset
from medtransfer.data.io import write_image
from medtransfer.data.phantoms_detection import write_detection_phantoms
from medtransfer.data.types import Case, Dataset, Image

SMALL = {"shape": (20, 32, 32), "spacing": (2.5, 2.0, 2.0)}


@pytest.fixture(scope="module")
def luna_clean(tmp_path_factory) -> Path:
    return write_detection_phantoms(tmp_path_factory.mktemp("luna"), 2, 4, "luna16", **SMALL)


@pytest.fixture
def luna(luna_clean, tmp_path) -> Path:
    root = tmp_path / "luna"
    shutil.copytree(luna_clean, root)
    return root


def errors(report) -> list[str]:
    return [str(p) for p in report.errors]


def test_clean_luna_phantoms_pass_with_box_counts(luna):
    report = check_dataset(load_dataset(luna, task="detection"), workers=1)
    assert report.ok, errors(report)
    lines = (luna / "annotations.csv").read_text().splitlines()
    assert report.summary()["boxes"]["total"] == len(lines) - 1


def edit_annotations(root: Path, row: str) -> None:
    with (root / "annotations.csv").open("a") as f:
        f.write(row + "\n")


def test_box_outside_zero_size_and_series_without_scan(luna):
    edit_annotations(luna, "phantom_000,500.0,0.0,0.0,6.0")  # 500 mm to the left of a 64 mm wide scan
    edit_annotations(luna, "phantom_001,0.0,0.0,0.0,0.0")
    edit_annotations(luna, "1.2.3.missing,0.0,0.0,0.0,5.0")
    report = check_dataset(load_dataset(luna, task="detection"), workers=1)
    found = errors(report)
    ann = luna / "annotations.csv"
    assert any(e.startswith(f"error: {ann}: case phantom_000, box ") and "(500.0, 0.0, 0.0, 6.0, 6.0, 6.0): lies "
               "outside the image" in e for e in found), found  # fmt: skip
    assert any(e.startswith(f"error: {ann}: case phantom_001, box ") and "zero or negative size" in e
               for e in found), found  # fmt: skip
    assert any(f"{ann}: annotations list series 1.2.3.missing but no scan of it is under subset*/" in e
               for e in found), found  # fmt: skip


def test_missing_scan_names_the_file(luna):
    (luna / "subset0" / "phantom_001.zraw").unlink()
    report = check_dataset(load_dataset(luna, task="detection"), workers=1)
    found = errors(report)
    assert any("phantom_001.mhd: cannot be read" in e and "ElementDataFile" in e for e in found), found


def test_wrong_coordinate_count_and_undeclared_label(tmp_path):
    path = write_image(Image(np.zeros((8, 8, 8), np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3)),
                       tmp_path / "a.nii.gz")  # fmt: skip
    cases = [Case("a", (path,), boxes=((3.0, 3.0, 3.0, 2.0),), box_labels=(1,)),
             Case("b", (path,), boxes=((3.0, 3.0, 3.0, 2.0, 2.0, 2.0),), box_labels=(4,))]  # fmt: skip
    report = check_dataset(Dataset("d", tmp_path, "monai_detection", "detection", cases, labels={1: "nodule"},
                                   description={"source": str(tmp_path / "fold0.json")}), workers=1)  # fmt: skip
    found = errors(report)
    assert f"error: {tmp_path / 'fold0.json'}: case a, box 0 (3.0, 3.0, 3.0, 2.0): 4 coordinates, a 3D box has 6 " \
           "(centre then size, world mm) -> write the box as cx, cy, cz, w, h, d (2D: cx, cy, w, h)" in found, found
    assert any("case b: box labels [4] are not declared classes [1]" in e for e in found), found


def test_deeplesion_missing_neighbour_slice(tmp_path):
    root = write_detection_phantoms(tmp_path / "dl", 2, 3, "deeplesion", **SMALL)
    ds = load_dataset(root)
    case = ds.cases[0]
    gone = Path(ds.description["slices"][case.case_id][0])
    gone.unlink()
    report = check_dataset(load_dataset(root), workers=1)
    assert any(e.startswith(f"error: {gone}: neighbouring slice of the key slice is missing") for e in errors(report))


def test_deeplesion_box_outside_names_the_row(tmp_path):
    root = write_detection_phantoms(tmp_path / "dl", 2, 3, "deeplesion", **SMALL)
    info = root / "DL_info.csv"
    lines = info.read_text().splitlines()
    first = lines[1].split('"')
    first[3] = "100.0, 100.0, 110.0, 110.0"  # Bounding_boxes, on 32 x 32 slices
    lines[1] = '"'.join(first)
    info.write_text("\n".join(lines) + "\n")
    report = check_dataset(load_dataset(root), workers=1)
    assert any(e.startswith(f"error: {info}:2: case ") and "lies outside the image" in e for e in errors(report)), \
        errors(report)


def test_cli_inspect_detection(luna):
    runner = CliRunner()
    result = runner.invoke(app, ["data", "inspect", str(luna), "--task", "detection"])
    assert result.exit_code == 0, result.output
    assert "boxes        :" in result.output and "nodule" in result.output
    edit_annotations(luna, "phantom_000,500.0,0.0,0.0,6.0")
    result = runner.invoke(app, ["data", "inspect", str(luna), "--task", "detection"])
    assert result.exit_code == 1 and "lies outside the image" in result.output
    result = runner.invoke(app, ["data", "inspect", str(luna), "--task", "segmentation"])
    assert result.exit_code != 0 and "task='segmentation' for LUNA16" in result.output
