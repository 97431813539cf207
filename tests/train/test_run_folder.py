"""The run-folder rule (issue 11): nothing is written into an existing run folder unless the command resumes it or
was given --overwrite; the split is written once; --out naming a file is one clear error. And predict says when it
resampled (summary.json, logging INFO) and refuses a scan of another channel count before running the model."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from medtransfer.cli import app
from medtransfer.data.phantoms import write_phantom_dataset
from medtransfer.errors import MedTransferError
from medtransfer.train.finetune import predict

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("data"), 5, 0, shape=(32, 32, 32), spacing=(5.0, 5.0, 5.0))


def _args(out: Path, data: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", "genesis_unet3d", "--data", str(data), "--out", str(out),
            "--set", "data.patch_size=[16,16,16]", "--set", "data.val_fraction=0.4", "--set", "data.spacing=[5,5,5]",
            "--set", "train.max_steps=1", "--set", "train.max_epochs=null", *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, phantoms):
    out = tmp_path_factory.mktemp("runs") / "run"
    result = CliRunner().invoke(app, _args(out, phantoms))
    assert result.exit_code == 0, result.output
    return out


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_new_run_into_a_finished_run_writes_nothing(tmp_path, finished, phantoms):
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    before = _snapshot(run)
    split = json.loads((run / "split.json").read_text())
    for extra in ([], ["--seed", "7"], ["--set", "data.val_fraction=0.2"]):  # the same run, or another split
        result = CliRunner().invoke(app, _args(run, phantoms, *extra))
        assert result.exit_code == 2, result.output
        assert f"{run} holds a run already" in " ".join(result.output.split()) and "Traceback" not in result.output
        assert "--resume" in result.output and "--overwrite" in result.output
        assert _snapshot(run) == before  # split.json, checkpoints and the log untouched
    result = CliRunner().invoke(app, ["evaluate", str(run)])
    assert result.exit_code == 0, result.output
    scored = [line.split(",")[0] for line in (run / "evaluation" / "cases.csv").read_text().splitlines()[1:]]
    assert scored == split["val"] and not set(scored) & set(split["train"])  # no case the model was trained on


def test_overwrite_replaces_the_old_run_and_keeps_a_named_cache(tmp_path, phantoms):
    run, cache = tmp_path / "run", tmp_path / "run" / "mycache"
    assert CliRunner().invoke(app, _args(run, phantoms, "--set", f"data.cache_dir={cache}")).exit_code == 0
    assert CliRunner().invoke(app, ["evaluate", str(run)]).exit_code == 0
    (run / "notes.txt").write_text("mine")
    cached = sorted(p.name for p in cache.iterdir())
    first_split = json.loads((run / "split.json").read_text())
    result = CliRunner().invoke(app, _args(run, phantoms, "--seed", "7", "--set", f"data.cache_dir={cache}",
                                           "--overwrite"))
    assert result.exit_code == 0, result.output
    assert not (run / "evaluation").exists()  # the old run's evaluation went with it
    assert (run / "notes.txt").read_text() == "mine" and sorted(p.name for p in cache.iterdir()) == cached
    assert json.loads((run / "split.json").read_text()) != first_split
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert "seed: 7" in (run / "config.yaml").read_text()


def test_out_that_is_a_file_is_one_clear_error(tmp_path, phantoms):
    target = tmp_path / "file.txt"
    target.write_text("keep")
    for args in (_args(target, phantoms), ["finetune", "--out", str(target), "--resume"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert f"--out {target}: is a file" in " ".join(result.output.split())
    assert target.read_text() == "keep"


def test_resume_reads_the_split_and_never_writes_it_again(tmp_path, finished, phantoms):
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    (run / "split.json").write_text(json.dumps({**json.loads((run / "split.json").read_text()), "note": "kept"}))
    before = (run / "split.json").read_bytes()
    result = CliRunner().invoke(app, ["finetune", "--out", str(run), "--resume", "--set", "train.max_steps=2"])
    assert result.exit_code == 0, result.output
    assert (run / "split.json").read_bytes() == before


def _scan(path: Path, spacing: float, channels: int = 1) -> Path:
    shape = (16, 16, 16) if channels == 1 else (16, 16, 16, channels)
    img = nib.Nifti1Image(np.zeros(shape, np.int16), np.diag([spacing, spacing, spacing, 1.0]))
    nib.save(img, str(path))
    return path


def test_predict_says_when_it_resampled_and_records_it(tmp_path, finished, caplog):
    native, fine = _scan(tmp_path / "a.nii.gz", 5.0), _scan(tmp_path / "b.nii.gz", 4.0)
    with caplog.at_level(logging.INFO, logger="medtransfer.train.apply"):
        written = predict(finished, [native, fine], tmp_path / "pred")
    assert [r.getMessage() for r in caplog.records if "resampled" in r.getMessage()] == [
        f"{fine}: resampled from 4x4x4 mm to the run's 5x5x5 mm for the model; the labels are written on the "
        "input's own grid"]
    summary = json.loads((tmp_path / "pred" / "summary.json").read_text())
    assert summary["cases"] == [
        {"input": str(native), "output": str(written[0]), "input_spacing": [5.0, 5.0, 5.0], "input_shape": [16] * 3,
         "model_spacing": [5.0, 5.0, 5.0], "model_shape": [16] * 3, "resampled": False},
        {"input": str(fine), "output": str(written[1]), "input_spacing": [4.0, 4.0, 4.0], "input_shape": [16] * 3,
         "model_spacing": [5.0, 5.0, 5.0], "model_shape": [13] * 3, "resampled": True}]
    # a later call into the folder adds to the summary, it never drops what an earlier one recorded
    third = predict(finished, [_scan(tmp_path / "c.nii.gz", 5.0)], tmp_path / "pred")
    cases = json.loads((tmp_path / "pred" / "summary.json").read_text())["cases"]
    assert [c["output"] for c in cases] == [str(written[0]), str(written[1]), str(third[0])]


def test_predict_refuses_another_channel_count_naming_the_file(tmp_path, finished):
    two = _scan(tmp_path / "two.nii.gz", 5.0, channels=2)
    with pytest.raises(MedTransferError, match=rf"{two}: 2 channel\(s\), but the run at {finished} is a 3D model of "
                                               r"1 input channel\(s\)"):
        predict(finished, [_scan(tmp_path / "one.nii.gz", 5.0), two], tmp_path / "pred")
    assert not (tmp_path / "pred").exists()
