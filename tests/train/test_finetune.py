"""finetune/evaluate/predict on tiny phantoms (16^3 patches, 3 steps), the contract table and the CLI's errors."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

import medtransfer as mt
from medtransfer.data.phantoms import write_phantom_dataset
from medtransfer.errors import MedTransferError
from medtransfer.train.cli_train import build_config, register
from medtransfer.train.config import validate
from medtransfer.train.finetune import evaluate, predict, resolve_contract, run_finetune

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("data"), 5, 0, shape=(32, 32, 32), spacing=(5.0, 5.0, 5.0),
                                 with_2d=False)


def _app():
    app = typer.Typer()
    register(app)
    return app


def _cfg(out, data, **extra):
    base = {
        "model": {"name": "genesis_unet3d", "task": "segmentation"},
        "data": {"path": str(data), "patch_size": [16, 16, 16], "batch_size": 2, "val_fraction": 0.4},
        "train": {"max_epochs": 2, "max_steps": 3, "seed": 0},
        "out": str(out),
    }
    for key, value in extra.items():
        base[key].update(value)
    return validate(base)


def test_contract_fills_unset_values_and_reports_a_preset_mismatch():
    cfg = validate({"model": {"name": "genesis_unet3d"}})
    c = resolve_contract(cfg, 3)
    assert c["preset"] == "genesis_ct" and c["patch_size"] == [64, 64, 32] and c["mismatches"] == []
    cfg = validate({"model": {"name": "genesis_unet3d"}, "data": {"preset": "zscore"}})
    c = resolve_contract(cfg, 3)
    assert c["preset"] == "zscore" and len(c["mismatches"]) == 1 and "genesis_ct" in c["mismatches"][0]
    assert resolve_contract(validate({"model": {"name": "medicalnet_resnet10"}}), 3)["preset"] == "medicalnet_mri"


def test_invalid_config_fails_with_field_name_and_exit_2(tmp_path):
    with pytest.raises(MedTransferError, match=r"optim\.lr"):
        build_config(None, model="genesis_unet3d", overrides=["optim.lr=0"])
    result = CliRunner().invoke(_app(), ["finetune", "--model", "genesis_unet3d", "--set", "optim.lr=-1",
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
    cfg = _cfg(tmp_path / "run", phantoms, model={"pretrained": str(weights)})
    run = run_finetune(cfg, progress=False)
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


def test_finetune_classification_on_phantom_csv(tmp_path, phantoms):
    cfg = validate({
        "model": {"name": "medicalnet_resnet10", "task": "classification"},
        "data": {"path": str(phantoms / "classification.csv"), "patch_size": [16, 16, 16], "batch_size": 2,
                 "val_fraction": 0.4},
        "train": {"max_epochs": 1, "max_steps": 2},
        "out": str(tmp_path / "cls"),
    })
    run = run_finetune(cfg, progress=False)
    assert json.loads((run / "run.json").read_text())["num_classes"] == 2
    assert (run / "metrics.jsonl").is_file()
    summary = json.loads((evaluate(run, split="all") / "summary.json").read_text())
    assert summary["cases"] == 5 and 0.0 <= summary["metrics"]["accuracy"] <= 1.0
