import json
import os

import torch
from typer.testing import CliRunner

import medtransfer as mt
from medtransfer.cli import app
from medtransfer.weights.export import export_official
from medtransfer.weights.io import read_checkpoint

runner = CliRunner()


def _medicalnet10_file(tmp_path):
    torch.manual_seed(0)
    model = mt.create_model("medicalnet_resnet10", task="features")
    path = export_official(model.state_dict(), tmp_path / "resnet_10.pth", "medicalnet")
    return model.eval(), path


def test_help_explains_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "zoo" in result.output
    result = runner.invoke(app, ["zoo", "--help"])
    assert result.exit_code == 0
    for command in ("list", "inspect", "convert"):
        assert command in result.output


def test_zoo_list_json_has_every_model_with_its_weights():
    result = runner.invoke(app, ["zoo", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert set(rows) == set(mt.list_models())
    assert "medicalnet_resnet18.23dataset" in rows["medicalnet_resnet18"]["weights"]
    assert abs(rows["medicalnet_resnet18"]["encoder_parameters"] - 32.99e6) / 32.99e6 < 0.005


def test_zoo_list_pattern_without_match_fails_clearly():
    result = runner.invoke(app, ["zoo", "list", "nothing*"])
    assert result.exit_code == 2 and "no model matches 'nothing*'" in result.output


def test_zoo_inspect_detects_the_source_and_the_models_it_fits(tmp_path):
    _, path = _medicalnet10_file(tmp_path)
    result = runner.invoke(app, ["zoo", "inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["source"] == "medicalnet"
    fits = {f["model"]: f for f in info["fits"]}
    assert fits["medicalnet_resnet10"]["ok"] and fits["medicalnet_resnet10"]["coverage"] == 1.0
    assert fits["medicalnet_resnet10"]["file_used"] == 1.0
    assert fits["medicalnet_resnet18"]["ok"] and fits["medicalnet_resnet18"]["coverage"] < 1.0  # partial: R10 is R18 with one block a stage
    assert "genesis_unet3d" not in fits  # only fitting models without --all


def test_zoo_inspect_refuses_a_code_carrying_file(tmp_path):
    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": RunsCode()}, path)
    result = runner.invoke(app, ["zoo", "inspect", str(path)])
    assert result.exit_code == 2
    assert "refused" in result.output and "never executes code" in result.output
    assert not (tmp_path / "pwned").exists()


def test_zoo_convert_writes_normalised_weights_that_load_back(tmp_path):
    reference, path = _medicalnet10_file(tmp_path)
    out = tmp_path / "r10"
    result = runner.invoke(app, ["zoo", "convert", str(path), "--model", "medicalnet_resnet10", "-o", str(out)])
    assert result.exit_code == 0, result.output
    written = tmp_path / "r10.safetensors"
    assert written.is_file() and "encoder coverage" in result.output
    raw = read_checkpoint(written)
    meta = raw.metadata
    assert meta["model"] == "medicalnet_resnet10" and meta["converted_from"]["source"] == "medicalnet"
    assert meta["arch_kwargs"]["shortcut"] == "B" and meta["load_report"]["coverage"] == 1.0
    assert not any(k.startswith("conv_seg.") for k in raw.obj.state_dict)  # never the random head
    model = mt.create_model("medicalnet_resnet10", task="features", pretrained=written).eval()
    assert model.load_report.source == "medtransfer" and model.load_report.coverage == 1.0
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_zoo_convert_into_the_wrong_model_fails_without_writing(tmp_path):
    _, path = _medicalnet10_file(tmp_path)
    out = tmp_path / "x.safetensors"
    result = runner.invoke(app, ["zoo", "convert", str(path), "-m", "genesis_unet3d", "-o", str(out)])
    assert result.exit_code == 2 and "no encoder weights of 'genesis_unet3d'" in result.output
    assert not out.exists()


def test_a_converted_file_remembers_its_input_channels(tmp_path):
    _, path = _medicalnet10_file(tmp_path)
    out = tmp_path / "r10x4.safetensors"
    result = runner.invoke(app, ["zoo", "convert", str(path), "-m", "medicalnet_resnet10", "-o", str(out), "--in-channels", "4"])
    assert result.exit_code == 0, result.output
    assert "input channels 1->4" in result.output
    model = mt.create_model("medicalnet_resnet10", task="features", pretrained=out)
    assert model.conv1.in_channels == 4 and model.load_report.adapted == []
