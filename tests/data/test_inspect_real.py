"""`data inspect` on folders like real ones: 2D files beside 3D scans, an atlas of 117 labels in a CSV list,
flipped/oblique/anisotropic scans, an unevenly sliced DICOM series; and finetune on that atlas."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medtransfer.cli import app
from medtransfer.data.io import write_image
from medtransfer.data.types import Image
from medtransfer.errors import MedTransferError
from medtransfer.train.config import validate
from medtransfer.train.finetune import run_finetune

sys.path.insert(0, str(Path(__file__).parent))
from test_io import write_dicom_series  # noqa: E402

torch.set_num_threads(1)
runner = CliRunner()


def _volume(arr, spacing=(1.0, 1.0, 1.0), direction=None):
    return Image(arr, spacing, (0.0, 0.0, 0.0), np.eye(3) if direction is None else direction)


def test_inspect_of_2d_files_beside_3d_scans_is_one_error_line_not_a_traceback(tmp_path):
    for i in range(2):
        write_image(_volume(np.zeros((16, 16, 16), np.int16)), tmp_path / f"scan{i}.nii.gz")
    np.save(tmp_path / "baseline.npy", np.zeros((16, 16), np.float32))
    result = runner.invoke(app, ["data", "inspect", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert "error: cases mix spatial dimensions {2: 1, 3: 2} (e.g. baseline (2D))" in result.output
    assert "dimensions   : 1 2D, 2 3D (shape and spacing below: the 3D cases)" in result.output
    report = json.loads(runner.invoke(app, ["data", "inspect", str(tmp_path), "--json"]).output)
    assert report["summary"]["spatial_dims"] == {"2": 1, "3": 2}
    assert report["summary"]["shape"]["max"] == [16, 16, 16]


@pytest.fixture
def atlas_list(tmp_path):
    """Three 16^3 cases whose labels are atlas indices 0..116 (every value present), listed in a CSV."""
    rows = ["image,label"]
    for i in range(3):
        rng = np.random.default_rng(i)
        labels = np.roll(np.arange(16**3) % 117, i).reshape(16, 16, 16).astype(np.int16)
        image = (labels * 10 + rng.normal(0, 5, labels.shape)).astype(np.float32)
        write_image(_volume(image, (2.0, 2.0, 2.0)), tmp_path / f"t1_{i}.nii.gz")
        write_image(_volume(labels, (2.0, 2.0, 2.0)), tmp_path / f"atlas_{i}.nii.gz")
        rows.append(f"t1_{i}.nii.gz,atlas_{i}.nii.gz")
    (tmp_path / "atlas.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "atlas.csv"


def test_inspect_shows_the_class_count_of_an_atlas_and_wraps_its_labels(atlas_list):
    result = runner.invoke(app, ["data", "inspect", str(atlas_list)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) < 200
    assert "  labels       : 117 values, 0..116" in lines
    assert "    0: 108 voxels in 3 cases" in lines  # 4096 = 35 * 117 + 1 voxels a case: value 0 once more
    assert "    1: 105 voxels in 3 cases" in lines and "    ... and 105 more (--json lists all)" in lines
    assert sum(line.startswith("    ") for line in lines) == 13
    assert any(line.startswith("  classes      : 117 (from the label values (no label set declared)") for line in lines)
    summary = json.loads(runner.invoke(app, ["data", "inspect", str(atlas_list), "--json"]).output)["summary"]
    assert summary["num_classes"] == 117 and len(summary["label_voxels"]) == 117


def _atlas_cfg(path, out, **model):
    return validate({
        "model": {"name": "genesis_unet3d", "task": "segmentation", **model},
        "data": {"path": str(path), "patch_size": [16, 16, 16], "batch_size": 2, "val_fraction": 0.34,
                 "preset": "zscore"},
        "train": {"max_epochs": 1, "max_steps": 1, "seed": 0},
        "optim": {},
        "out": str(out),
    })


def test_finetune_on_an_atlas_list_takes_the_class_count_from_the_labels(atlas_list, tmp_path, caplog):
    run = run_finetune(_atlas_cfg(atlas_list, tmp_path / "run"), progress=False)
    assert json.loads((run / "run.json").read_text())["num_classes"] == 117
    assert "num_classes 117: taken from the label values (0..116)" in caplog.text
    manifest = json.loads((run / "cache" / "manifest.json").read_text())
    assert all(e["meta"]["label_values"] == list(range(117)) for e in manifest["cases"].values())


def test_finetune_refuses_a_head_too_small_for_the_labels_before_training(atlas_list, tmp_path):
    with pytest.raises(MedTransferError, match="model.num_classes is 2 but the labels of .* go up to 116; set "
                       "model.num_classes to 117"):
        run_finetune(_atlas_cfg(atlas_list, tmp_path / "run", num_classes=2), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_labels_outside_a_declared_label_set_stay_an_error(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    write_image(_volume(np.zeros((16, 16, 16), np.int16)), tmp_path / "imagesTr" / "c1_0000.nii.gz")
    write_image(_volume(np.arange(16**3).reshape(16, 16, 16) % 3), tmp_path / "labelsTr" / "c1.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "name": "two", "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "numTraining": 1,
        "file_ending": ".nii.gz"}))
    result = runner.invoke(app, ["data", "inspect", str(tmp_path)])
    assert result.exit_code == 1
    assert "label values [2] are outside the declared classes [0, 1]" in result.output
    assert "    1 liver: " in result.output and "classes      : 2 (from the declared labels" in result.output


def test_inspect_shows_orientation_on_disk_oblique_and_anisotropy(tmp_path):
    c, s = np.cos(np.deg2rad(12)), np.sin(np.deg2rad(12))
    ras = np.diag([1.0, -1.0, -1.0])  # array order (S, P, L): y towards A, x towards R -> ITK codes "RAS"
    oblique = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])
    write_image(_volume(np.zeros((8, 16, 16), np.int16), (5.0, 1.0, 1.0), ras), tmp_path / "a.nrrd")
    write_image(_volume(np.zeros((16, 16, 16), np.int16), (1.0, 1.0, 1.0), oblique), tmp_path / "b.nrrd")
    write_image(_volume(np.zeros((16, 16, 16), np.int16), (1.0, 1.0, 1.0)), tmp_path / "c.nrrd")
    result = runner.invoke(app, ["data", "inspect", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "  orientation  : LPS 2, RAS 1 (on disk; 1 oblique)" in result.output
    assert "  anisotropy   : largest/smallest spacing median 1, max 5" in result.output
    assert "1 of 3 cases are anisotropic (largest / smallest spacing above 3; at most 5, case a spacing " in result.output
    summary = json.loads(runner.invoke(app, ["data", "inspect", str(tmp_path), "--json"]).output)["summary"]
    assert summary["orientation"] == {"LPS": 2, "RAS": 1} and summary["oblique_cases"] == 1


def test_uneven_dicom_slices_are_reported_and_itk_stays_off_the_console(tmp_path, capfd):
    vol = _volume(np.zeros((6, 8, 8), np.int16), (2.0, 1.0, 1.0))
    write_dicom_series(vol, tmp_path / "ct" / "series", "1.2.826.0.1.3680043.2.1125.9")
    (tmp_path / "ct" / "series" / "slice002.dcm").unlink()  # slices at 0, 2, 6, 8, 10 mm
    write_dicom_series(vol, tmp_path / "ct" / "even", "1.2.826.0.1.3680043.2.1125.10")
    capfd.readouterr()
    result = runner.invoke(app, ["data", "inspect", str(tmp_path / "ct")])
    assert result.exit_code == 0, result.output
    assert ("DICOM slice positions are unevenly spaced: gaps from 2 to 4 mm (median 2), but the volume is read at "
            "one spacing") in result.output
    assert result.output.count("unevenly spaced") == 1
    captured = capfd.readouterr()
    assert "Non uniform" not in captured.err + captured.out


def test_itk_warnings_go_to_the_log(tmp_path, caplog):
    from medtransfer.data.io import read_image

    vol = _volume(np.zeros((6, 8, 8), np.int16), (2.0, 1.0, 1.0))
    write_dicom_series(vol, tmp_path / "s", "1.2.826.0.1.3680043.2.1125.11")
    (tmp_path / "s" / "slice002.dcm").unlink()
    with caplog.at_level("INFO", logger="medtransfer.data.io"):
        image = read_image(tmp_path / "s")
    assert image.meta["dicom_slice_gaps"] == {"min": 2.0, "median": 2.0, "max": 4.0}
    assert any(r.message.startswith("ITK: Non uniform sampling or missing slices detected") for r in caplog.records)
