"""Files medtransfer writes get 0666 minus the umask, as every other tool's do (mkstemp alone gives 0600)."""

import os
import stat

import pytest
import torch

from medtransfer.data.phantoms import write_phantom_dataset
from medtransfer.train.config import validate
from medtransfer.train.finetune import run_finetune
from medtransfer.weights.io import atomic_write, current_umask, save_safetensors

torch.set_num_threads(1)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_respects_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    assert current_umask() == mask
    assert os.umask(mask) == mask  # reading it left it unchanged
    text = atomic_write(tmp_path / "a.json", lambda tmp: tmp.write_text("{}"))
    tensors = save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors", {"k": 1})
    assert _mode(text) == expected and _mode(tensors) == expected


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600)])
def test_every_file_of_a_finetune_run_respects_the_umask(tmp_path, umask, mask, expected):
    data = write_phantom_dataset(tmp_path / "data", 3, 0, shape=(16, 16, 16), spacing=(5.0, 5.0, 5.0), with_2d=False)
    umask(mask)
    cfg = validate({
        "model": {"name": "genesis_unet3d", "task": "segmentation"},
        "data": {"path": str(data), "patch_size": [16, 16, 16], "batch_size": 2, "val_fraction": 0.34},
        "train": {"max_epochs": 1, "max_steps": 1, "seed": 0},
        "optim": {},
        "out": str(tmp_path / "run"),
    })
    run = run_finetune(cfg, progress=False)
    files = sorted(p for p in run.rglob("*") if p.is_file())
    names = {str(p.relative_to(run)) for p in files}
    assert {"config.yaml", "contract.json", "split.json", "run.json", "checkpoints/last.pt",
            "cache/manifest.json"} <= names
    assert any(n.startswith("cache/cases/") for n in names)
    assert {str(p.relative_to(run)): oct(_mode(p)) for p in files} == {n: oct(expected) for n in names}


def test_zoo_convert_output_respects_the_umask(tmp_path, umask):
    from typer.testing import CliRunner

    import medtransfer as mt
    from medtransfer.cli import app
    from medtransfer.weights.export import export_official

    model = mt.create_model("medicalnet_resnet10", task="features")
    source = export_official(model.state_dict(), tmp_path / "resnet_10.pth", "medicalnet")
    umask(0o022)
    out = tmp_path / "r10.safetensors"
    result = CliRunner().invoke(app, ["zoo", "convert", str(source), "--model", "medicalnet_resnet10", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert _mode(out) == 0o644
