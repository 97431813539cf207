"""finetune/evaluate/predict on tiny phantoms (16^3 / 32^2 patches, 6-8 full-batch steps) for the four tasks of issue 4
(3D/2D segmentation, 3D classification, 2D multi-label classification), the contract table and the CLI's errors.

Every fine-tune test asserts that the epoch-mean train loss of the last ``metrics.jsonl`` record is below the first
one's: with 3 training cases and ``batch_size`` 3 each epoch is one optimiser step on the same cases."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

import medtransfer as mt
from medtransfer.cli import app
from medtransfer.cli.train import build_config
from medtransfer.data.phantoms import write_phantom_dataset
from medtransfer.errors import MedTransferError
from medtransfer.train.config import validate
from medtransfer.train.finetune import evaluate, predict, resolve_contract, run_finetune

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("data"), 5, 0, shape=(32, 32, 32), spacing=(5.0, 5.0, 5.0),
                                 with_2d=True)  # 2D: images2d/, masks2d/ (32x32 PNG), findings2d.csv


RUN_FILES = ("config.yaml", "env.json", "split.json", "metrics.jsonl", "contract.json", "run.json")


def _assert_complete_run_and_lower_loss(run):
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "checkpoints" / "best.pt").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if r["train_loss"] is not None]
    assert len(losses) >= 3, records
    assert losses[-1] < losses[0], losses
    return records


def _cfg(out, data_path, **extra):
    base = {
        "model": {"name": "genesis_unet3d", "task": "segmentation"},
        "data": {"path": str(data_path), "patch_size": [16, 16, 16], "batch_size": 2, "val_fraction": 0.4},
        "train": {"max_epochs": 2, "max_steps": 3, "seed": 0},
        "optim": {},
        "out": str(out),
    }
    for key, value in extra.items():
        base[key].update(value)
    return validate(base)


def test_contract_fills_unset_values_and_reports_a_preset_mismatch():
    # the published weights' contract applies when they are loaded (pretrained: true); tests/train/test_contract.py
    # covers scratch runs, foreign files and modality mismatches
    cfg = validate({"model": {"name": "genesis_unet3d", "pretrained": True}})
    c = resolve_contract(cfg, 3, "CT")
    assert c["preset"] == "genesis_ct" and c["patch_size"] == [32, 64, 64] and c["mismatches"] == []
    cfg = validate({"model": {"name": "genesis_unet3d", "pretrained": True}, "data": {"preset": "zscore"}})
    c = resolve_contract(cfg, 3, "CT")
    assert c["preset"] == "zscore" and len(c["mismatches"]) == 1 and "genesis_ct" in c["mismatches"][0]
    medicalnet = validate({"model": {"name": "medicalnet_resnet10", "pretrained": True}})
    assert resolve_contract(medicalnet, 3, "CT")["preset"] == "medicalnet_mri"


def test_invalid_config_fails_with_field_name_and_exit_2(tmp_path):
    with pytest.raises(MedTransferError, match=r"optim\.lr"):
        build_config(None, model="genesis_unet3d", overrides=["optim.lr=0"])
    result = CliRunner().invoke(app, ["finetune", "--model", "genesis_unet3d", "--set", "optim.lr=-1",
                                      "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "optim.lr" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()  # failed before any work


def test_dataset_errors_abort_before_training(tmp_path, phantoms):
    broken = tmp_path / "broken"
    broken.mkdir()
    desc = json.loads((phantoms / "dataset.json").read_text())
    desc["training"][0]["image"] = str(phantoms / "imagesTr" / "missing.nii.gz")
    for item in desc["training"][1:]:
        item["image"], item["label"] = str(phantoms / item["image"]), str(phantoms / item["label"])
    desc["training"][0]["label"] = str(phantoms / desc["training"][0]["label"])
    (broken / "dataset.json").write_text(json.dumps(desc))
    with pytest.raises(MedTransferError, match="missing.nii.gz"):
        run_finetune(_cfg(tmp_path / "run", broken), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_finetune_segmentation_end_to_end_then_evaluate_and_predict(tmp_path, phantoms):
    source = mt.create_model("genesis_unet3d", task="segmentation", num_classes=7)
    from medtransfer.weights.export import export_official

    weights = export_official(source.state_dict(), tmp_path / "genesis.pt", "genesis")
    cfg = _cfg(tmp_path / "run", phantoms, model={"pretrained": str(weights)}, data={"batch_size": 3},
               train={"max_epochs": 4, "max_steps": 4}, optim={"lr": 1e-2})
    run = run_finetune(cfg, progress=False)
    _assert_complete_run_and_lower_loss(run)
    for name in ("config.yaml", "env.json", "split.json", "metrics.jsonl", "load_report.json", "contract.json"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "best.pt").is_file() or (run / "checkpoints" / "last.pt").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["patch_size"] == [16, 16, 16]
    split = json.loads((run / "split.json").read_text())
    assert len(split["val"]) == 2 and len(split["train"]) == 3  # 40% of 5 cases held out
    assert json.loads((run / "env.json").read_text())["seed"] == 0
    assert json.loads((run / "load_report.json").read_text())
    assert json.loads((run / "contract.json").read_text())["preset"] == "genesis_ct"

    ev = evaluate(run, split="val")
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["cases"] == 2 and "dice_mean" in summary["metrics"]
    assert len((ev / "cases.csv").read_text().strip().splitlines()) == 3  # header + 2 cases

    source_img = phantoms / "imagesTr" / "phantom_000.nii.gz"
    (out,) = predict(run, [source_img], tmp_path / "pred")
    pred, ref = nib.load(str(out)), nib.load(str(source_img))
    assert pred.shape == ref.shape
    np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-5)
    assert set(np.unique(np.asarray(pred.dataobj))) <= set(range(7))

    result = CliRunner().invoke(app, ["predict", str(run), str(source_img)])  # default: RUN_DIR/predictions
    assert result.exit_code == 0, result.output
    assert (run / "predictions" / "phantom_000.nii.gz").is_file()


def test_finetune_classification_on_phantom_csv(tmp_path, phantoms):
    cfg = validate({
        "model": {"name": "medicalnet_resnet10", "task": "classification"},
        "data": {"path": str(phantoms / "classification.csv"), "patch_size": [16, 16, 16], "batch_size": 3,
                 "val_fraction": 0.4},
        "train": {"max_epochs": 8, "max_steps": 8},
        "out": str(tmp_path / "cls"),
    })
    run = run_finetune(cfg, progress=False)
    _assert_complete_run_and_lower_loss(run)
    assert json.loads((run / "run.json").read_text())["num_classes"] == 2
    assert (run / "metrics.jsonl").is_file()
    summary = json.loads((evaluate(run, split="all") / "summary.json").read_text())
    assert summary["cases"] == 5 and 0.0 <= summary["metrics"]["accuracy"] <= 1.0


def test_finetune_2d_segmentation_resnet50_on_phantom_radiographs(tmp_path, phantoms):
    # the image_mask_2d layout reads images/ + masks/; the phantoms name them images2d/ + masks2d/ (and the config
    # has no loader options), so the test links them under the layout's names
    root = tmp_path / "lungs2d"
    root.mkdir()
    (root / "images").symlink_to(phantoms / "images2d", target_is_directory=True)
    (root / "masks").symlink_to(phantoms / "masks2d", target_is_directory=True)
    cfg = validate({
        "model": {"name": "resnet50_2d", "task": "segmentation"},  # in_channels 1: the grayscale PNGs
        "data": {"path": str(root), "patch_size": [32, 32], "batch_size": 3, "val_fraction": 0.4},
        "train": {"max_epochs": 6, "max_steps": 6},
        "out": str(tmp_path / "seg2d"),
    })
    run = run_finetune(cfg, progress=False)
    records = _assert_complete_run_and_lower_loss(run)
    assert "dice_mean" in records[-1]["val"]
    info = json.loads((run / "run.json").read_text())
    assert info["spatial_dims"] == 2 and info["num_classes"] == 2 and info["divisor"] == [32, 32]
    assert json.loads((run / "contract.json").read_text())["preset"] == "zscore"  # no CT window on 8-bit PNGs
    summary = json.loads((evaluate(run, split="all") / "summary.json").read_text())
    assert summary["cases"] == 5 and 0.0 <= summary["metrics"]["dice_mean"] <= 1.0


def test_finetune_2d_multilabel_classification_resnet50_on_findings_csv(tmp_path, phantoms):
    cfg = validate({
        "model": {"name": "resnet50_2d", "task": "classification"},
        "data": {"path": str(phantoms / "findings2d.csv"), "patch_size": [32, 32], "batch_size": 3,
                 "val_fraction": 0.4},
        "train": {"max_epochs": 6, "max_steps": 6},
        "out": str(tmp_path / "cls2d"),
    })
    run = run_finetune(cfg, progress=False)
    records = _assert_complete_run_and_lower_loss(run)
    info = json.loads((run / "run.json").read_text())
    assert info["multilabel"] is True and info["num_classes"] == 3  # nodule, cardiomegaly, effusion
    assert "auc_mean" in records[-1]["val"]  # metric_for(classification, multilabel=True)
    summary = json.loads((evaluate(run, split="all") / "summary.json").read_text())
    assert summary["cases"] == 5 and "auc_mean" in summary["metrics"]


def test_the_finetune_command_runs_under_torchrun_with_two_processes(tmp_path):
    import json
    import socket
    import subprocess
    import sys

    import torch.distributed

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "medtransfer.cli", "finetune", "--model", "medicalnet_resnet10", "--out", str(out),
           "--set", "train.max_steps=2", "--set", "data.patch_size=[16,16,16]", "--set", "data.batch_size=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "env.json").read_text())["world_size"] == 2
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "split.json").is_file()
