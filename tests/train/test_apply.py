"""evaluate/predict of a run (issue 10): labels back on the input grid by world coordinates, scores on the original
label grid, evaluation folders never overwritten, a clear refusal of 2D inputs to a 3D run, progress lines.

One tiny run (1 optimiser step, phantoms of 32^3 at 5 mm resampled to 7 mm) is shared; where the test is about
geometry the network is replaced by an oracle whose logits come from the label itself."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from medtransfer.data.io import read_image
from medtransfer.data.phantoms import write_phantom_dataset
from medtransfer.data.preprocess import Pipeline
from medtransfer.data.types import Image
from medtransfer.errors import MedTransferError
from medtransfer.train import apply
from medtransfer.train.config import validate
from medtransfer.train.finetune import evaluate, predict, run_finetune

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("data"), 4, 0, shape=(32, 32, 32), spacing=(5.0, 5.0, 5.0))


@pytest.fixture(scope="module")
def run(tmp_path_factory, phantoms):
    cfg = validate({
        "model": {"name": "genesis_unet3d", "task": "segmentation", "pretrained": False},
        "data": {"path": str(phantoms), "patch_size": [16, 16, 16], "spacing": [7.0, 7.0, 7.0], "batch_size": 2,
                 "val_fraction": 0.5},
        "train": {"max_epochs": 1, "max_steps": 1, "seed": 0},
        "out": str(tmp_path_factory.mktemp("run") / "run"),
    })
    return run_finetune(cfg, progress=False)


def _one_hot(label: np.ndarray, k: int) -> np.ndarray:
    return np.stack([(label == c).astype(np.float32) for c in range(k)])


def _oracle(monkeypatch, make_logits):
    """Replace the network: ``make_logits(prepared array)`` gives the case's logits (1, C, *spatial)."""
    monkeypatch.setattr(apply, "_case_logits", lambda model, image, run, options=None: make_logits(np.asarray(image)))


def _centroids(label: np.ndarray, values) -> np.ndarray:
    return np.array([np.argwhere(label == v).mean(0) for v in values])


def test_predict_puts_labels_back_on_a_flipped_anisotropic_input_by_world_position(tmp_path, run, monkeypatch):
    from medtransfer.data.geometry import Grid

    # an input stored with flipped x and z axes and 8 x 4 x 3.5 mm voxels (nibabel: RAS affine, x y z order); the
    # run resamples it to 7 mm and the oracle predicts a ball of radius 25 mm, smoothly, from world positions
    affine = np.diag([-3.5, 4.0, -8.0, 1.0])
    affine[:3, 3] = (40.0, -30.0, 60.0)
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 32), np.float32), affine), str(tmp_path / "scan.nii.gz"))
    original = read_image(tmp_path / "scan.nii.gz")
    grid = Grid.of(original)
    centre, radius = grid.to_world([15.3, 16.2, 14.7]), 25.0
    pipeline = Pipeline.from_dict(json.loads((run / "run.json").read_text())["pipeline"])
    prepared = pipeline(original)
    assert prepared.spacing == (7.0, 7.0, 7.0) and prepared.spatial_shape != original.spatial_shape

    def ball_logits(index_grid: Grid) -> np.ndarray:
        index = np.stack(np.meshgrid(*[np.arange(n) for n in index_grid.shape], indexing="ij"), -1)
        distance = np.linalg.norm(index_grid.to_world(index) - centre, axis=-1)
        return np.stack([np.zeros_like(distance), (radius - distance) / 3.0]).astype(np.float32)

    _oracle(monkeypatch, lambda array: torch.from_numpy(ball_logits(Grid.of(prepared)))[None])
    (out,) = predict(run, [tmp_path / "scan.nii.gz"], tmp_path / "pred")
    written = nib.load(str(out))
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    pred = read_image(out)  # back in the canonical orientation of `original`, voxel for voxel
    expected = (ball_logits(grid)[1] > 0).astype(np.uint8)
    assert expected.sum() > 500 and pred.array.shape == expected.shape
    error = np.abs(_centroids(pred.array, [1]) - _centroids(expected, [1]))  # voxels of the input grid
    assert error.max() < 0.1, error
    assert (pred.array != expected).mean() < 0.01


def test_evaluate_scores_on_the_original_label_grid_and_says_so(run, monkeypatch):
    from medtransfer.data.cache import PreparedCache
    from medtransfer.data.geometry import Grid, labels_back

    record = json.loads((run / "run.json").read_text())
    cache, k = PreparedCache(record["cache"]), int(record["num_classes"])
    val = json.loads((run / "split.json").read_text())["val"]
    truth_of = {}  # prepared image bytes -> prepared label: an oracle that is right on the prepared grid
    for case_id in val:
        image, label, _ = cache.load(case_id)
        truth_of[np.asarray(image).tobytes()] = np.asarray(label)
    _oracle(monkeypatch, lambda prepared: torch.from_numpy(_one_hot(truth_of[prepared.tobytes()], k) * 20 - 10)[None])

    prepared_dir = evaluate(run, split="val", grid="prepared")
    prepared = json.loads((prepared_dir / "summary.json").read_text())
    assert prepared["grid"] == "prepared" and prepared["metrics"]["dice_mean"] == pytest.approx(1.0)
    assert prepared["spacing"] == {"prepared": [[7.0, 7.0, 7.0]]}
    original_dir = evaluate(run, split="val", overwrite=True)
    assert original_dir == prepared_dir == run / "evaluation"
    original = json.loads((original_dir / "summary.json").read_text())
    assert original["grid"] == "original" and original["cases"] == len(val)
    assert original["spacing"] == {"original": [[5.0, 5.0, 5.0]], "prepared": [[7.0, 7.0, 7.0]]}
    assert original["inference"] == {"window_size": None, "overlap": 0.5, "batch_size": 4, "memory_gb": None}
    # a perfect prediction at 7 mm is not perfect at 5 mm: the score is taken on each label file's own grid
    dices = []
    for case_id in val:
        _, label, meta = cache.load(case_id)
        truth = np.asarray(read_image(meta["source_label"]).array)
        back = labels_back(_one_hot(np.asarray(label), k), Grid.of(meta), meta["preprocess"])
        assert back.shape == truth.shape == (32, 32, 32)
        fg = [c for c in range(1, k) if (truth == c).any() or (back == c).any()]
        dices.append([2 * ((back == c) & (truth == c)).sum() / ((back == c).sum() + (truth == c).sum()) for c in fg])
    rows = {r["case_id"]: r for r in csv.DictReader((original_dir / "cases.csv").open())}
    for case_id, dice in zip(val, dices):
        assert float(rows[case_id]["dice_mean"]) == pytest.approx(np.mean(dice), abs=1e-6)
    assert 0.5 < original["metrics"]["dice_mean"] < 0.999


def test_evaluate_with_other_data_writes_beside_and_never_overwrites(tmp_path, run, phantoms, capsys):
    other = write_phantom_dataset(tmp_path / "other", 2, 7, shape=(32, 32, 32), spacing=(5.0, 5.0, 5.0))
    name = json.loads((other / "dataset.json").read_text())["name"]
    first = evaluate(run, other)
    assert first.parent == run and first.name.startswith("evaluation-") and name.replace(" ", "_") in first.name
    assert not (run / "evaluation" / "cache").exists()
    rows = list(csv.DictReader((first / "cases.csv").open()))
    assert len(rows) == 2
    err = capsys.readouterr().err
    assert "evaluate 1/2 " in err and "evaluate 2/2 " in err  # one progress line per case
    before = (first / "summary.json").read_text()
    with pytest.raises(MedTransferError, match=rf"{first}.*--overwrite"):
        evaluate(run, other)
    assert (first / "summary.json").read_text() == before
    from medtransfer.cli import app

    result = CliRunner().invoke(app, ["evaluate", str(run), "--data", str(other)])
    assert result.exit_code == 2 and "--overwrite" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["evaluate", str(run), "--data", str(other), "--overwrite", "--window",
                                      "16,16,16", "--overlap", "0.25", "--window-batch", "2", "--memory-gb", "0"])
    assert result.exit_code == 0, result.output
    summary = json.loads((first / "summary.json").read_text())
    assert summary["inference"] == {"window_size": [16, 16, 16], "overlap": 0.25, "batch_size": 2, "memory_gb": 0.0}


def test_predict_refuses_a_2d_slice_for_a_3d_run_in_one_sentence(tmp_path, run):
    slice_ = sitk.GetImageFromArray(np.arange(64 * 64, dtype=np.int16).reshape(64, 64))
    sitk.WriteImage(slice_, str(tmp_path / "slice.dcm"))
    png = tmp_path / "xray.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((32, 32), np.uint8)), str(png))
    for path in (tmp_path / "slice.dcm", png):
        with pytest.raises(MedTransferError, match=rf"{path.name}: a 2D image .* is a 3D model"):
            predict(run, [path], tmp_path / "pred")
    from medtransfer.cli import app

    result = CliRunner().invoke(app, ["predict", str(run), str(tmp_path / "slice.dcm"), "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "3D model" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "p").exists() and not (tmp_path / "pred").exists()


def test_inference_options_come_from_the_config_then_the_call(run):
    from medtransfer.train.config import load_config

    cfg = load_config(run / "config.yaml")
    assert apply.inference_options(cfg) == {"window_size": None, "overlap": 0.5, "batch_size": 4, "memory_gb": None}
    assert apply.inference_options(cfg, overlap=0.0, window_size=[8, 16, 16])["window_size"] == (8, 16, 16)
    with pytest.raises(MedTransferError, match="overlap"):
        apply.inference_options(cfg, overlap=1.0)
    with pytest.raises(MedTransferError, match=r"window \[16, 16\] has 2 axes; the run is 3D"):
        apply.inference_options(cfg, 3, window_size=[16, 16])
    old = json.loads(json.dumps(cfg.model_dump(mode="json")))
    del old["inference"]  # a config.yaml written before the section existed
    assert validate(old).inference.batch_size == 4


def test_predict_names_formats_and_refuses_clashes_before_writing(tmp_path, run):
    from medtransfer.cli import app

    image = sitk.GetImageFromArray(np.full((16, 16, 16), -200, np.int16))
    image.SetSpacing((5.0, 5.0, 5.0))
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        sitk.WriteImage(image, str(tmp_path / folder / "scan.nrrd"))
    sitk.WriteImage(image, str(tmp_path / "sub-01.ses-1.nii.gz"))
    out = tmp_path / "pred"
    # two inputs named scan: refused, naming both, and nothing is written
    result = CliRunner().invoke(app, ["predict", str(run), str(tmp_path / "a" / "scan.nrrd"),
                                      str(tmp_path / "b" / "scan.nrrd"), "--out", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "a/scan.nrrd and" in result.output and "b/scan.nrrd would both be written to" in result.output
    assert not out.exists() or not any(out.iterdir())
    # the whole name before the image extension is kept; --format same keeps NRRD
    written = predict(run, [tmp_path / "sub-01.ses-1.nii.gz", tmp_path / "a" / "scan.nrrd"], out, fmt="same")
    assert [p.name for p in written] == ["sub-01.ses-1.nii.gz", "scan.nrrd"]
    assert sitk.ReadImage(str(written[1])).GetSize() == (16, 16, 16)
    # a second predict into the same folder overwrites nothing unless asked
    before = written[0].read_bytes()
    with pytest.raises(MedTransferError, match=r"exist already, nothing was written: .*sub-01\.ses-1\.nii\.gz"):
        predict(run, [tmp_path / "sub-01.ses-1.nii.gz"], out)
    assert written[0].read_bytes() == before
    assert [p.name for p in predict(run, [tmp_path / "b" / "scan.nrrd"], out, fmt="mha")] == ["scan.mha"]
    assert predict(run, [tmp_path / "sub-01.ses-1.nii.gz"], out, overwrite=True) == [written[0]]
