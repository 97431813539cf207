"""End to end: a short pretraining of each method on tiny phantoms lowers its loss and writes a loadable checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import medtransfer as mt
from medtransfer.cli import app
from medtransfer.data.phantoms import write_phantom_dataset
from medtransfer.errors import DataError, MedTransferError
from medtransfer.pretext.runner import run_pretrain
from medtransfer.weights.io import read_checkpoint

RUN_FILES = ("config.yaml", "env.json", "data.json", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/best.pt",
             "pretrained.safetensors")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantoms") / "ds"
    write_phantom_dataset(root, 4, 0, shape=(16, 32, 32), spacing=(5.0, 5.0, 5.0), with_2d=True)
    return root


def _val_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val"]["loss"] for r in records if r.get("val")]


def _config(method: str, data: list, out: Path, **extra) -> dict:
    cfg = {
        "method": method, "out": str(out), "recipe": "none",
        "data": {"paths": [str(p) for p in data], "patch_size": [16, 32, 32], "batch_size": 2, "val_batches": 1,
                 "val_fraction": 0.25},
        "optim": {"name": "adam", "lr": 3e-3},
        "train": {"max_steps": 10, "max_epochs": None, "val_interval": "step", "val_every": 5, "seed": 0},
    }
    for key, value in extra.items():
        cfg.setdefault(key, {}).update(value) if isinstance(value, dict) else cfg.__setitem__(key, value)
    return cfg


def _check_run(run_dir: Path, *, val_drops: bool = True, train_drops: bool = True) -> list[float]:
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    env = json.loads((run_dir / "env.json").read_text())
    assert {"torch", "seed", "method"} <= set(env)
    losses = _val_losses(run_dir)
    assert len(losses) == 2 and all(np.isfinite(losses))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r["train_loss"] for r in records if r["train_loss"] is not None]
    if train_drops:  # per-epoch means of a handful of random patches: compare the first and last thirds
        third = max(1, len(train) // 3)
        assert np.mean(train[-third:]) < np.mean(train[:third]), train
    if val_drops:  # BatchNorm running statistics after 10 steps make some networks' validation loss meaningless
        assert losses[1] < losses[0], losses
    return losses


@pytest.fixture(scope="module")
def genesis_run(phantoms, tmp_path_factory) -> Path:
    return run_pretrain(_config("genesis", [phantoms], tmp_path_factory.mktemp("genesis") / "g"), progress=False)


def test_genesis_pretraining_lowers_loss_and_loads_for_finetuning(genesis_run):
    run = genesis_run
    _check_run(run)
    raw = read_checkpoint(run / "pretrained.safetensors")
    cfg = raw.metadata["pretrained_cfg"]
    assert (cfg["model"], cfg["tag"], cfg["preset"], cfg["patch_size"]) == (
        "genesis_unet3d", "pretrain_genesis", "genesis_ct", [16, 32, 32])
    model = mt.create_model("genesis_unet3d", task="segmentation", num_classes=3, pretrained=run / "pretrained.safetensors")
    report = model.load_report
    assert report.source == "medtransfer" and report.coverage == 1.0
    assert model.pretrained_cfg.tag == "pretrain_genesis" and model.pretrained_cfg.patch_size == (16, 32, 32)
    saved = raw.obj.state_dict
    for key, value in model.state_dict().items():
        if key in saved and saved[key].shape == value.shape and "num_batches" not in key:
            assert torch.equal(saved[key], value), key
    # the output's head is the 1-channel restoration head: a 3-class model reports it mismatched, not loaded
    assert {m[0] for m in report.mismatched} == {"out_tr.final_conv.weight", "out_tr.final_conv.bias"}


def test_finetune_reads_the_contract_of_a_pretrained_file(phantoms, genesis_run):
    from medtransfer.train.config import load_config
    from medtransfer.train.finetune import resolve_contract

    run = genesis_run
    cfg = load_config({"model": {"name": "genesis_unet3d", "pretrained": str(run / "pretrained.safetensors")},
                       "data": {"path": str(phantoms)}})
    contract = resolve_contract(cfg, 3)
    assert contract["preset"] == "genesis_ct" and contract["patch_size"] == [16, 32, 32]
    assert contract["weights"]["tag"] == "pretrain_genesis"


def test_genesis_resume_is_exact(phantoms, tmp_path):
    base = _config("genesis", [phantoms], tmp_path / "full", optim={"name": "sgd", "lr": 0.1},
                   train={"max_steps": 2, "val_every": 1, "deterministic": True})
    base["data"]["batch_size"] = 1  # 3 batches per epoch: the interruption falls inside an epoch
    full = run_pretrain(base, progress=False)
    half = dict(base, out=str(tmp_path / "half"), train={**base["train"], "max_steps": 1})
    run_pretrain(half, progress=False)
    resumed = run_pretrain(dict(half, train={**base["train"]}), resume=True, progress=False)
    assert torch.load(resumed / "checkpoints" / "last.pt", weights_only=False)["batches_done"] == 2
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=False)["model"]
    b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_genesis_from_a_cube_file(tmp_path):
    rng = np.random.default_rng(0)
    cubes = rng.random((6, 16, 32, 32), dtype=np.float32)
    path = tmp_path / "cubes_16x32x32_subset0.npy"
    np.save(path, cubes)
    cfg = _config("genesis", [path], tmp_path / "c", optim={"name": "sgd", "lr": 0.1},
                  train={"max_steps": 1, "val_every": 1})
    cfg["data"]["patch_size"] = None
    run = run_pretrain(cfg, progress=False)
    data = json.loads((run / "data.json").read_text())
    assert data["format"] == "cubes" and data["cubes"] == 6 and data["patch_size"] == [16, 32, 32]
    bad = tmp_path / "bad.npy"
    np.save(bad, cubes * 1000)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        run_pretrain(_config("genesis", [bad], tmp_path / "b"), progress=False)


def test_volf_pretraining_lowers_loss_and_loads(phantoms, tmp_path):
    run = run_pretrain(_config("volf", [phantoms], tmp_path / "v",
                               model={"name": "fmunet", "arch": {"feature_chns": [4, 8, 16, 32, 64]}},
                               options={"block_min": [2, 4, 4], "block_max": [8, 16, 16]}), progress=False)
    _check_run(run, train_drops=False)  # each step fuses new pairs: the fixed validation set is the measure
    model = mt.create_model("fmunet", pretrained=run / "pretrained.safetensors")  # width from the file's metadata
    assert model.load_report.coverage == 1.0 and not model.load_report.mismatched
    assert model(torch.zeros(1, 1, 16, 32, 32)).shape == (1, 5, 16, 32, 32)  # K + 1 = 5 classes from the head
    assert model.pretrained_cfg.preset == "volf_ct"


def test_med3d_two_datasets_write_medicalnet_encoder(phantoms, tmp_path):
    run = run_pretrain(_config("med3d", [phantoms, phantoms], tmp_path / "m", model={"name": "medicalnet_resnet10"},
                               optim={"name": "adam", "lr": 1e-3}), progress=False)
    _check_run(run, val_drops=False)
    data = json.loads((run / "data.json").read_text())
    assert data["head_classes"] == [7, 7] and [d["head"] for d in data["datasets"]] == [0, 1]
    enc = run / "encoder_medicalnet.pth"
    raw = torch.load(enc, weights_only=True)
    assert set(raw) == {"state_dict"} and all(k.startswith("module.") for k in raw["state_dict"])
    for weights, source in ((enc, "medicalnet"), (run / "pretrained.safetensors", "medtransfer")):
        model = mt.create_model("medicalnet_resnet10", task="segmentation", num_classes=2, pretrained=weights)
        assert model.load_report.source == source
        assert model.load_report.coverage == 1.0, (source, model.load_report.missing)


def test_vdt_on_2d_images(phantoms, tmp_path):
    cfg = _config("vdt", [], tmp_path / "d", optim={"name": "sgd", "lr": 0.01},
                  train={"max_steps": 4, "val_every": 2})
    cfg["data"]["patch_size"] = [32, 32]
    cfg["out"] = str(tmp_path / "d")
    run = run_pretrain(cfg, progress=False)
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    model = mt.create_model("vdt_resnet18_3d", task="classification", pretrained=run / "pretrained.safetensors")
    assert model.load_report.coverage == 1.0
    assert model(torch.zeros(2, 1, 3, 32, 32)).shape == (2, 2)
    assert model.pretrained_cfg.patch_size is None  # 2D images: no 3D patch size to impose on fine-tuning
    assert "1 x 3 x 32 x 32" in model.pretrained_cfg.notes


def test_wrong_data_for_a_method(phantoms, tmp_path):
    with pytest.raises(DataError, match="vdt"):
        run_pretrain(_config("genesis", [phantoms / "findings2d.csv"], tmp_path / "x"), progress=False)
    vdt = _config("vdt", [phantoms], tmp_path / "y")
    vdt["data"]["patch_size"] = [32, 32]
    with pytest.raises(DataError, match="2D classification"):
        run_pretrain(vdt, progress=False)
    with pytest.raises(MedTransferError, match="unknown Models Genesis option"):
        run_pretrain(_config("genesis", [phantoms], tmp_path / "z", options={"flip_rat": 0.1}), progress=False)
    with pytest.raises(MedTransferError, match="takes one dataset"):
        run_pretrain(_config("volf", [phantoms, phantoms], tmp_path / "w"), progress=False)


def test_cli_pretrain(phantoms, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(app, ["pretrain", "--method", "genesis", "--data", str(phantoms), "--out", str(out),
                                 "--recipe", "none", "--set", "train.max_steps=2", "--set", "train.max_epochs=null",
                                 "--set", "data.patch_size=[16,32,32]", "--set", "data.val_fraction=0"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("pretrained.safetensors") and (out / "pretrained.safetensors").is_file()
    inspect = runner.invoke(app, ["zoo", "inspect", str(out / "pretrained.safetensors")])
    assert inspect.exit_code == 0 and "genesis (Models Genesis" in inspect.output
    assert "preset genesis_ct, patch [16, 32, 32], native spacing" in " ".join(inspect.output.split())
    bad = runner.invoke(app, ["pretrain", "--method", "nope"])
    assert bad.exit_code == 2 and "method" in bad.output and "Traceback" not in bad.output
    typo = runner.invoke(app, ["pretrain", "--method", "genesis", "--set", "optim.lrr=1"])
    assert typo.exit_code == 2 and "did you mean 'lr'" in typo.output


def test_pretraining_on_mri_records_mri_and_swaps_the_ct_window(tmp_path, caplog):
    # a Genesis pretraining file used to claim CT whatever it was trained on, so fine-tuning it on MRI was called a
    # modality mismatch and on CT it was not; and the method's HU window squashed MRI into a sliver of [0, 1]
    from tests.train.test_contract import write_mri_dataset
    from medtransfer.train.config import validate
    from medtransfer.train.finetune import resolve_contract
    from medtransfer.data.modality import Modality
    from medtransfer.zoo.builder import file_pretrained_cfg

    mri = write_mri_dataset(tmp_path / "mri", n=4)
    cfg = _config("genesis", [mri], tmp_path / "g", train={"max_steps": 2, "val_every": 1})
    cfg["data"]["patch_size"] = [16, 16, 16]
    with caplog.at_level("WARNING"):
        run = run_pretrain(cfg, progress=False)
    assert "the data is MRI" in caplog.text and "using 'percentile'" in caplog.text
    made = file_pretrained_cfg(str(run / "pretrained.safetensors"))
    assert (made.modality, made.preset) == ("MRI", "percentile")
    finetune = validate({"model": {"name": "genesis_unet3d", "pretrained": str(run / "pretrained.safetensors")}})
    on_mri = resolve_contract(finetune, 3, Modality("MRI", "test"))
    assert (on_mri["preset"], on_mri["mismatches"]) == ("percentile", [])
    on_ct = resolve_contract(finetune, 3, Modality("CT", "test"))
    assert on_ct["preset"] == "genesis_ct" and "MODALITY MISMATCH" in on_ct["mismatches"][0]
