"""The preprocessing contract (issue 10): who decides the intensity preset, spacing and patch size of a run.

The user's config wins; else the contract of the weights actually loaded, when their modality matches the data's
(a mismatch is a loud warning and a line in contract.json); else the modality default. A run from scratch, or from
a file without a contract, never takes the published weights' contract. Synthetic MRI: a bright ellipsoid on an
exactly-zero background (no value below 0, so it cannot pass for HU)."""

import json
import logging

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import medtransfer as mt
from medtransfer.data.datasets import load_dataset, write_dataset_json
from medtransfer.data.io import write_image
from medtransfer.data.modality import Modality, channel_modality, dataset_modality, weights_modalities
from medtransfer.data.phantoms import write_phantom_dataset
from medtransfer.data.types import Image
from medtransfer.errors import CheckpointMismatchError, MedTransferError
from medtransfer.train.config import validate
from medtransfer.train.finetune import resolve_contract, run_finetune

torch.set_num_threads(1)

CT = Modality("CT", "test")
MRI = Modality("MRI", "test")


def _mri_volume(seed: int, shape=(16, 16, 16)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    r = np.sqrt(((z - 7.5) / 6) ** 2 + ((y - 7.5) / 5) ** 2 + ((x - 7.5) / 6) ** 2)
    image = np.where(r < 1, 150 + 300 * rng.random(shape), 0.0).astype(np.float32)
    return image, (r < 0.5).astype(np.uint8)


def write_mri_dataset(root, n=5, channel="T2"):
    """An MSD dataset of ``n`` synthetic MRI cases (16^3 at 2 mm), channel named ``channel``."""
    training = []
    for i in range(n):
        image, label = _mri_volume(i)
        for name, array, folder in (("image", image, "imagesTr"), ("label", label, "labelsTr")):
            path = root / folder / f"mri_{i:03d}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_image(Image(array=array, spacing=(2.0, 2.0, 2.0), origin=(0.0,) * 3, direction=np.eye(3)), path)
        training.append((root / "imagesTr" / f"mri_{i:03d}.nii.gz", root / "labelsTr" / f"mri_{i:03d}.nii.gz"))
    write_dataset_json(root, "mri", {0: "background", 1: "core"}, {0: channel}, training)
    return root


@pytest.fixture(scope="module")
def mri(tmp_path_factory):
    return write_mri_dataset(tmp_path_factory.mktemp("mri"))


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("ct"), 4, 0, shape=(16, 16, 16), spacing=(10.0,) * 3,
                                 with_2d=False)


def _run_cfg(out, data, **model):
    return validate({"model": {"name": "genesis_unet3d", **model},
                     "data": {"path": str(data), "patch_size": [16, 16, 16], "batch_size": 2, "val_fraction": 0.4},
                     "train": {"max_epochs": 1, "max_steps": 1}, "out": str(out)})


# ------------------------------------------------------------------------------------------ resolve_contract


def test_a_run_from_scratch_never_takes_the_published_contract():
    # MedicalNet's published weights expect medicalnet_mri and genesis' genesis_ct with a 32x64x64 patch: from
    # scratch neither applies; the data's modality decides
    c = resolve_contract(validate({"model": {"name": "medicalnet_resnet10"}}), 3, CT)
    assert (c["preset"], c["sources"]["preset"]) == ("genesis_ct", "modality default for CT")
    assert c["weights"] is None and c["initial_weights"] == "no weights (a run from scratch)"
    c = resolve_contract(validate({"model": {"name": "genesis_unet3d"}}), 3, MRI)
    assert (c["preset"], c["sources"]["preset"]) == ("mri_zscore", "modality default for MRI")
    assert c["patch_size"] == [64, 64, 64] and c["sources"]["patch_size"] == "default for 3D (DEFAULT_PATCH)"
    assert c["spacing"] is None and c["mismatches"] == [] and c["warnings"] == []
    c = resolve_contract(validate({"model": {"name": "resnet50_2d"}}), 2, None)
    assert (c["preset"], c["sources"]["preset"]) == ("zscore", "modality default for 2D images")


def test_a_foreign_file_without_a_contract_gets_the_modality_default(tmp_path):
    path = tmp_path / "mine.pt"
    torch.save(mt.create_model("medicalnet_resnet10").state_dict(), path)
    c = resolve_contract(validate({"model": {"name": "medicalnet_resnet10", "pretrained": str(path)}}), 3, CT)
    assert c["preset"] == "genesis_ct" and c["weights"] is None
    assert c["initial_weights"] == f"file {path} (it carries no input contract)"


def test_loaded_weights_of_the_other_modality_fall_back_and_say_so():
    cfg = validate({"model": {"name": "genesis_unet3d", "pretrained": True}})
    c = resolve_contract(cfg, 3, Modality("MRI", "x/dataset.json modality ['T2']"))
    assert c["preset"] == "mri_zscore" and c["contract_preset"] == "genesis_ct"
    assert c["patch_size"] == [32, 64, 64]  # the network's input geometry still comes from its weights
    assert c["sources"]["patch_size"] == "weights genesis_unet3d.chest_ct (Genesis_Chest_CT.pt)"
    (line,) = c["mismatches"]
    assert line.startswith("MODALITY MISMATCH: the weights genesis_unet3d.chest_ct (Genesis_Chest_CT.pt) were "
                           "trained on CT with preset 'genesis_ct', but the data is MRI (x/dataset.json modality")
    c = resolve_contract(cfg, 3, CT)
    assert (c["preset"], c["mismatches"]) == ("genesis_ct", [])
    assert c["sources"]["preset"] == "weights genesis_unet3d.chest_ct (Genesis_Chest_CT.pt)"
    c = resolve_contract(cfg, 3, None)  # unknown modality: the weights' preset, with a warning to check it
    assert c["preset"] == "genesis_ct" and "modality is unknown" in c["warnings"][0]


def test_the_user_value_wins_and_a_differing_one_is_recorded():
    cfg = validate({"model": {"name": "genesis_unet3d", "pretrained": True},
                    "data": {"preset": "zscore", "spacing": [2, 2, 2], "patch_size": [16, 32, 32]}})
    c = resolve_contract(cfg, 3, CT)
    assert (c["preset"], c["spacing"], c["patch_size"]) == ("zscore", [2.0, 2.0, 2.0], [16, 32, 32])
    assert c["sources"] == {"preset": "user config (data.preset)", "spacing": "user config (data.spacing)",
                            "patch_size": "user config (data.patch_size)"}
    assert c["mismatches"] == ["data.preset='zscore' but the weights genesis_unet3d.chest_ct (Genesis_Chest_CT.pt) "
                               "expect 'genesis_ct'"]
    # same step under another name is no mismatch
    cfg = validate({"model": {"name": "medicalnet_resnet10", "pretrained": True}, "data": {"preset": "mri_zscore"}})
    assert resolve_contract(cfg, 3, MRI)["mismatches"] == []
    with pytest.raises(MedTransferError, match=r"data.patch_size \[16, 32, 32\] has 3 values but the dataset is 2D"):
        resolve_contract(validate({"model": {"name": "resnet50_2d"}, "data": {"patch_size": [16, 32, 32]}}), 2)


def test_data_modality_config_field():
    assert validate({"model": {"name": "genesis_unet3d"}, "data": {"modality": "mri"}}).data.modality == "MRI"
    assert validate({"model": {"name": "genesis_unet3d"}}).data.modality == "auto"
    with pytest.raises(MedTransferError, match=r"data.modality"):
        validate({"model": {"name": "genesis_unet3d"}, "data": {"modality": "PET"}})


# ------------------------------------------------------------------------------------------------- modality


def test_channel_and_weights_modality_names():
    assert [channel_modality(n) for n in ("CT", "ct", "T2", "t1gd", "FLAIR", "ADC", "DWI", "PD", "MRI", "T1w",
                                          "noNorm", "PET", "rescale_to_0_1")] == \
        ["CT", "CT", "MRI", "MRI", "MRI", "MRI", "MRI", "MRI", "MRI", "MRI", None, None, None]
    assert weights_modalities("CT and MRI") == {"CT", "MRI"} and weights_modalities("CT") == {"CT"}
    assert weights_modalities("natural images (ImageNet-1k via the variable dimension transform)") == set()
    assert weights_modalities("chest X-ray") == set()


def test_dataset_modality_from_declared_names_intensities_or_the_user(mri, ct, tmp_path):
    found = dataset_modality(load_dataset(mri))
    assert found.value == "MRI" and found.source == f"{mri / 'dataset.json'} modality ['T2']"
    assert dataset_modality(load_dataset(ct)).value == "CT"
    # a CSV list declares nothing: CT is read from its HU intensities (air far below -500)
    found = dataset_modality(load_dataset(ct / "classification.csv"))
    assert found.value == "CT" and "is below -500 HU" in found.source and found.source.startswith("intensities")
    rows = ["image,target"] + [f"{p},{i % 2}" for i, p in enumerate(sorted((mri / "imagesTr").iterdir()))]
    (tmp_path / "mri.csv").write_text("\n".join(rows) + "\n")
    found = dataset_modality(load_dataset(tmp_path / "mri.csv"))
    assert found.value is None and "not HU-like (minimum 0 over 3 image(s), none below -500)" in found.source
    assert dataset_modality(load_dataset(tmp_path / "mri.csv"), "MRI") == Modality(
        "MRI", "stated by the user (data.modality)")


def test_dataset_modality_of_declared_multichannel_names(ct):
    from dataclasses import replace

    phantoms = load_dataset(ct)
    nnunet = replace(phantoms, format="nnunet", channel_names=["T2", "ADC"])
    assert dataset_modality(nnunet) == Modality("MRI", f"{ct / 'dataset.json'} channel_names ['T2', 'ADC']")
    mixed = dataset_modality(replace(phantoms, format="nnunet", channel_names=["CT", "PET"]))
    assert mixed.value == "CT" and "['CT', 'PET'] are not all CT or all MR channels" in mixed.source  # by HU
    stated = dataset_modality(phantoms, "MRI")  # the user wins, the declaration is kept in the record
    assert stated == Modality("MRI", "stated by the user (data.modality); the dataset declares ['CT']")


# ------------------------------------------------------------------------------------------------ full runs


def test_mri_run_from_scratch_records_its_sources(mri, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="medtransfer.train.finetune"):
        run = run_finetune(_run_cfg(tmp_path / "run", mri), progress=False)
    c = json.loads((run / "contract.json").read_text())
    assert (c["preset"], c["data_modality"]) == ("mri_zscore", "MRI")
    assert c["data_modality_source"] == f"{mri / 'dataset.json'} modality ['T2']"
    assert c["sources"] == {"preset": "modality default for MRI",
                            "spacing": "default (no resampling: each case keeps its spacing)",
                            "patch_size": "user config (data.patch_size)"}
    assert json.loads((run / "run.json").read_text())["pipeline"] == {
        "steps": [{"type": "nonzero_zscore", "rel_threshold": 1e-6}]}
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("input contract: preset 'mri_zscore' (modality default for MRI); spacing native")
               for m in lines)


def test_ct_weights_on_mri_data_warn_loudly_before_training(mri, tmp_path, caplog, monkeypatch):
    from medtransfer.weights.export import export_official
    from medtransfer.zoo.pretrained import weights_home

    weights_home().mkdir(parents=True, exist_ok=True)  # the test's own cache (conftest)
    export_official(mt.create_model("genesis_unet3d").state_dict(), weights_home() / "Genesis_Chest_CT.pt",
                    "genesis")
    with caplog.at_level(logging.WARNING, logger="medtransfer.train.finetune"):
        run = run_finetune(_run_cfg(tmp_path / "run", mri, pretrained=True), progress=False)
    c = json.loads((run / "contract.json").read_text())
    assert c["preset"] == "mri_zscore" and c["weights_modality"] == "CT" and len(c["mismatches"]) == 1
    loud = [r for r in caplog.records if r.getMessage().startswith("INPUT CONTRACT MISMATCH: MODALITY MISMATCH")]
    assert len(loud) == 1 and loud[0].levelno == logging.WARNING


def test_a_weight_file_that_fits_nothing_fails_before_any_data_work(tmp_path):
    junk = tmp_path / "junk.pt"
    torch.save({"foo.weight": torch.zeros(3, 3)}, junk)
    out = tmp_path / "run"
    cfg = validate({"model": {"name": "genesis_unet3d", "pretrained": str(junk)}, "out": str(out)})  # phantoms
    with pytest.raises(CheckpointMismatchError, match=rf"^{junk}: no encoder weights of 'genesis_unet3d'"):
        run_finetune(cfg, progress=False)
    assert not out.exists()  # no phantoms, no cache, no run files


def test_cli_finetune_with_a_bad_weight_file_exits_2_naming_it(tmp_path):
    from medtransfer.cli import app

    junk = tmp_path / "junk.pt"
    torch.save({"foo.weight": torch.zeros(3, 3)}, junk)
    result = CliRunner().invoke(app, ["finetune", "--model", "genesis_unet3d", "--pretrained", str(junk),
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and str(junk) in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "cache").exists()


def test_data_prepare_default_preset_follows_the_modality(mri, ct, tmp_path):
    from medtransfer.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["data", "prepare", str(mri), "--out", str(tmp_path / "m"), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "intensity preset mri_zscore (modality default for MRI); data modality MRI" in result.output
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["pipeline"] == {"steps": [{"type": "nonzero_zscore", "rel_threshold": 1e-6}]}
    result = runner.invoke(app, ["data", "prepare", str(ct), "--out", str(tmp_path / "c"), "--workers", "1"])
    assert result.exit_code == 0 and "intensity preset genesis_ct (modality default for CT)" in result.output
    result = runner.invoke(app, ["data", "prepare", str(mri), "--out", str(tmp_path / "z"), "--workers", "1",
                                 "--preset", "zscore"])
    assert result.exit_code == 0 and "intensity preset zscore (user config (--preset))" in result.output


def test_a_published_file_passed_by_path_keeps_its_published_contract(tmp_path):
    # MedicalNet's resnet_10.pth downloaded and passed by path: its contract (medicalnet_mri), said to come from
    # the file name; the same tensors under another name are a foreign file and get the modality default
    published = validate({"model": {"name": "medicalnet_resnet10", "pretrained": str(tmp_path / "resnet_10.pth")}})
    c = resolve_contract(published, 3, Modality("CT", "test"))
    assert c["preset"] == "medicalnet_mri"
    assert "the file name resnet_10.pth is that of the published file" in c["sources"]["preset"]
    foreign = validate({"model": {"name": "medicalnet_resnet10", "pretrained": str(tmp_path / "mine.pth")}})
    c = resolve_contract(foreign, 3, Modality("CT", "test"))
    assert (c["preset"], c["sources"]["preset"]) == ("genesis_ct", "modality default for CT")
