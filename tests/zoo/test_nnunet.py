"""nnU-Net v2 models: reference networks built directly with dynamic_network_architectures from small plans, saved as
``checkpoint_final.pth`` in nnUNetTrainer's layout, loaded through medtransfer key for key."""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

try:
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
except ImportError:  # dynamic_network_architectures 0.4 (the pinned release without timm) keeps it here
    from dynamic_network_architectures.architectures.residual_unet import ResidualEncoderUNet
from torch import nn

import medtransfer as mt
from medtransfer.errors import MedTransferError, UnsafeCheckpointError, WeightsNotFoundError
from medtransfer.weights.io import read_checkpoint
from medtransfer.zoo import nnunet as nz

IN = {"eps": 1e-5, "affine": True}
DATASET = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2}, "file_ending": ".nii.gz"}
CT_PROPS = {"0": {"mean": 100.0, "median": 90.0, "std": 50.0, "min": -1024.0, "max": 3000.0,
                  "percentile_00_5": -900.0, "percentile_99_5": 1200.0}}


def _new_style_config(dim: int = 3, n_stages: int = 3) -> dict:
    return {
        "data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 2, "patch_size": [32] * dim,
        "spacing": [2.0, 0.8, 0.8][-dim:], "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": n_stages, "features_per_stage": [4, 8, 16][:n_stages],
                "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
                "kernel_sizes": [[3] * dim] * n_stages, "strides": [[1] * dim] + [[2] * dim] * (n_stages - 1),
                "n_conv_per_stage": [2] * n_stages, "n_conv_per_stage_decoder": [2] * (n_stages - 1),
                "conv_bias": True, "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
                "norm_op_kwargs": IN, "dropout_op": None, "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
    }


def _plans(**configs) -> dict:
    return {"dataset_name": "Dataset999_Toy", "plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2],
            "transpose_backward": [0, 1, 2], "foreground_intensity_properties_per_channel": CT_PROPS,
            "configurations": configs or {"3d_fullres": _new_style_config()}}


def _old_style_config() -> dict:
    # nnU-Net < 2.4 plans of a residual-encoder configuration: features min(4 * 2**i, 12) -> 4, 8, 12
    return {
        "patch_size": [32, 32, 32], "spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [True], "UNet_class_name": "ResidualEncoderUNet", "UNet_base_num_features": 4,
        "unet_max_num_features": 12, "n_conv_per_stage_encoder": [1, 2, 2], "n_conv_per_stage_decoder": [1, 1],
        "num_pool_per_axis": [2, 2, 2], "pool_op_kernel_sizes": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        "conv_kernel_sizes": [[3, 3, 3], [3, 3, 3], [3, 3, 3]],
    }


def _reference_plain(dim: int = 3, in_ch: int = 1, classes: int = 3) -> nn.Module:
    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if dim == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    return PlainConvUNet(in_ch, 3, [4, 8, 16], conv, 3, [1, 2, 2], 2, classes, 2, True, norm, IN, None, None,
                         nn.LeakyReLU, {"inplace": True}, deep_supervision=True)


def _randomise(net: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere, InstanceNorm affine parameters included (they start at 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def _save_checkpoint(path, net: nn.Module, plans: dict | None, configuration="3d_fullres", dataset=DATASET,
                     fold=0, extra_init: dict | None = None):
    """nnUNetTrainer.save_checkpoint's layout, with the types it stores: numpy scalars in logging and _best_ema,
    a torch.device in init_args, an SGD optimizer state with momentum buffers."""
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    first = next(m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
    out = net(torch.randn(1, first.in_channels, *[16] * (first.weight.ndim - 2)))
    (out[0] if isinstance(out, list) else out).mean().backward()
    opt.step()
    opt.zero_grad()
    init_args = {"plans": plans, "configuration": configuration, "fold": fold, "dataset_json": dataset,
                 "device": torch.device("cpu"), **(extra_init or {})}
    ckpt = {
        "network_weights": net.state_dict(),
        "optimizer_state": opt.state_dict(),
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float64(0.71)], "ema_fg_dice": [np.float64(0.7)],
                    "dice_per_class_or_region": [[np.float64(0.6), np.float64(0.8)]],
                    "train_losses": [np.float64(-0.5)], "val_losses": [np.float64(-0.4)], "lrs": [0.01],
                    "epoch_start_timestamps": [1.0], "epoch_end_timestamps": [2.0]},
        "_best_ema": np.float64(0.7),
        "current_epoch": 1000,
        "init_args": init_args,
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    if plans is None:
        del ckpt["init_args"]
    torch.save(ckpt, path)
    return path


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def toy_checkpoint(tmp_path):
    ref = _randomise(_reference_plain())
    path = _save_checkpoint(tmp_path / "checkpoint_final.pth", ref, _plans())
    ref.decoder.deep_supervision = False
    return ref.eval(), path


def test_new_style_checkpoint_loads_key_for_key_with_identical_outputs(toy_checkpoint):
    ref, path = toy_checkpoint
    model = mt.create_model("nnunet", pretrained=path).eval()
    report = model.load_report
    assert report.source == "nnunet"
    assert report.coverage == 1.0 and report.encoder_total == 48
    assert report.missing == [] and report.unexpected == [] and report.mismatched == [] and report.adapted == []
    assert set(model.state_dict()) == set(ref.state_dict())  # decoder.encoder.* duplicates included
    x = _x(2, 1, 32, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 3, 32, 32, 32)  # background, liver, spleen; deep supervision off
        assert torch.equal(out, ref(x))
        assert torch.equal(model.forward_features(x), ref.encoder(x)[-1])
    assert model.size_divisor == (4, 4, 4)


def test_the_real_layout_reads_with_weights_only(toy_checkpoint):
    raw = read_checkpoint(toy_checkpoint[1])
    assert raw.container == "torch-zip"
    assert set(raw.obj) == {"network_weights", "optimizer_state", "grad_scaler_state", "logging", "_best_ema",
                            "current_epoch", "init_args", "trainer_name", "inference_allowed_mirroring_axes"}
    assert raw.obj["init_args"]["device"] == torch.device("cpu") and raw.obj["_best_ema"] == 0.7


def test_a_checkpoint_with_code_in_init_args_is_refused(tmp_path):
    ref = _randomise(_reference_plain())
    path = _save_checkpoint(tmp_path / "checkpoint_final.pth", ref, _plans(), extra_init={"hook": nz.NNUNetPlansError})
    with pytest.raises(UnsafeCheckpointError, match="never executes code"):
        mt.create_model("nnunet", pretrained=path)


def test_the_report_names_trainer_configuration_fold_and_the_input_contract(toy_checkpoint):
    model = mt.create_model("nnunet", pretrained=toy_checkpoint[1])
    notes = model.load_report.notes
    assert notes[0] == ("nnU-Net v2 checkpoint: trainer nnUNetTrainer, configuration 3d_fullres, fold 0, 1000 epochs, "
                        "plans nnUNetPlans of Dataset999_Toy")
    assert notes[1].startswith("input contract from the plans: spacing 2x0.8x0.8 mm, patch 32x32x32")
    # (x - 100) / 50 on [-900, 1200]: the window ends map to -20 and 22
    assert "percentiles (-900, 1200), then (x - 100) / 50" in notes[2]
    assert "CTWindow(lo=-900, hi=1200, out=(-20, 22))" in notes[2]
    cfg = model.pretrained_cfg
    assert (cfg.source, cfg.tag, cfg.modality) == ("nnunet", "Dataset999_Toy.3d_fullres.fold0", "CT")
    assert cfg.in_channels == 1
    assert cfg.spacing == (2.0, 0.8, 0.8) and cfg.patch_size == (32, 32, 32) and cfg.preset is None


def test_the_ct_window_named_in_the_report_is_nnunets_ct_normalisation():
    from medtransfer.data.preprocess import CTWindow
    from medtransfer.data.types import Image

    hu = np.linspace(-1500, 2500, 4001, dtype=np.float32).reshape(1, 1, 4001)
    expected = (np.clip(hu, -900.0, 1200.0) - 100.0) / 50.0  # nnunetv2 CTNormalization.run
    step = CTWindow(lo=-900.0, hi=1200.0, out=((-900 - 100) / 50, (1200 - 100) / 50))
    got = step(Image(hu, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3))).array
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)


def test_old_style_plans_build_the_residual_encoder_unet_as_nnunet_maps_them(tmp_path):
    ref = _randomise(ResidualEncoderUNet(1, 3, [4, 8, 12], nn.Conv3d, 3, [1, 2, 2], [1, 2, 2], 3, [1, 1], True,
                                         nn.InstanceNorm3d, IN, None, None, nn.LeakyReLU, {"inplace": True},
                                         deep_supervision=True), seed=4)
    plans = _plans(**{"3d_fullres": _old_style_config()})
    path = _save_checkpoint(tmp_path / "checkpoint_final.pth", ref, plans, fold=3)
    model = mt.create_model("nnunet", pretrained=path).eval()
    report = model.load_report
    assert report.coverage == 1.0 and report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert model.network_class == "ResidualEncoderUNet"
    assert model.first_conv_keys == ("encoder.stem.convs.0.conv.weight", "encoder.stem.convs.0.all_modules.0.weight")
    ref.decoder.deep_supervision = False
    x = _x(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ref.eval()(x))
    assert "fold 3" in report.notes[0]
    assert model.pretrained_cfg.preset == "mri_zscore"  # ZScoreNormalization inside the non-zero mask
    arch = nz.architecture(_old_style_config())
    assert arch["arch_kwargs"]["features_per_stage"] == [4, 8, 12]
    assert arch["arch_kwargs"]["n_blocks_per_stage"] == [1, 2, 2] and "n_conv_per_stage" not in arch["arch_kwargs"]


def test_plans_given_as_files_build_without_a_checkpoint(tmp_path):
    (tmp_path / "plans.json").write_text(json.dumps(_plans()))
    (tmp_path / "dataset.json").write_text(json.dumps(DATASET))
    model = mt.create_model("nnunet", num_classes=3, plans=tmp_path / "plans.json",
                            dataset_json=str(tmp_path / "dataset.json"), configuration="3d_fullres")
    ref = _reference_plain()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_a_checkpoint_without_init_args_asks_for_the_plans_and_loads_with_them(tmp_path):
    ref = _randomise(_reference_plain())
    path = _save_checkpoint(tmp_path / "checkpoint_final.pth", ref, plans=None)
    with pytest.raises(nz.NNUNetPlansError, match="holds no plans .* plans='plans.json'"):
        mt.create_model("nnunet", pretrained=path)
    model = mt.create_model("nnunet", pretrained=path, plans=_plans(), dataset_json=DATASET, num_classes=3)
    assert model.load_report.source == "nnunet" and model.load_report.coverage == 1.0
    assert model.load_report.mismatched == []


def test_a_missing_configuration_is_named_with_the_ones_the_plans_have(toy_checkpoint):
    with pytest.raises(MedTransferError, match="no configuration '3d_lowres'; the plans have: 3d_fullres"):
        mt.create_model("nnunet", pretrained=toy_checkpoint[1], configuration="3d_lowres")


def test_a_2d_configuration_builds_a_2d_network(tmp_path):
    ref = _randomise(_reference_plain(dim=2), seed=2)
    path = _save_checkpoint(tmp_path / "checkpoint_final.pth", ref, _plans(**{"2d": _new_style_config(dim=2)}),
                            configuration="2d")
    model = mt.create_model("nnunet", pretrained=path).eval()
    assert model.spatial_dims == 2 and model.load_report.coverage == 1.0 and model.load_report.mismatched == []
    ref.decoder.deep_supervision = False
    x = _x(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ref.eval()(x))


def test_inheritance_and_cascade_input_channels():
    plans = _plans(**{"3d_lowres": _new_style_config(),
                      "3d_cascade_fullres": {"inherits_from": "3d_lowres", "previous_stage": "3d_lowres",
                                             "spacing": [1.0, 1.0, 1.0]}})
    cascade = nz.resolve_configuration(plans, "3d_cascade_fullres")
    assert cascade["spacing"] == [1.0, 1.0, 1.0] and cascade["patch_size"] == [32, 32, 32]
    assert nz.input_channels(DATASET, cascade) == 3  # the image + one channel per foreground label
    assert nz.input_channels(DATASET, plans["configurations"]["3d_lowres"]) == 1
    plans["configurations"]["3d_lowres"]["inherits_from"] = "3d_cascade_fullres"
    with pytest.raises(MedTransferError, match="inherit in a circle: 3d_cascade_fullres -> 3d_lowres -> 3d_cascade"):
        nz.resolve_configuration(plans, "3d_cascade_fullres")


def test_multichannel_checkpoint_sets_in_channels_without_adapting(tmp_path):
    ref = _randomise(_reference_plain(in_ch=2))
    dataset = {**DATASET, "channel_names": {"0": "T1", "1": "T2"}}
    plans = _plans()
    plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["ZScoreNormalization"] * 2
    plans["configurations"]["3d_fullres"]["use_mask_for_norm"] = [False, False]
    path = _save_checkpoint(tmp_path / "checkpoint_final.pth", ref, plans, dataset=dataset)
    model = mt.create_model("nnunet", pretrained=path)
    assert model.load_report.adapted == [] and model.load_report.coverage == 1.0
    assert model.encoder.stages[0][0].convs[0].conv.in_channels == 2
    assert model.pretrained_cfg.in_channels == 2 and model.pretrained_cfg.preset == "zscore"
    assert model.pretrained_cfg.modality == "T1, T2"


def test_segmentation_heads_count_labels_regions_and_skip_ignore():
    assert nz.segmentation_heads({"labels": {"background": 0, "a": 1, "b": 2, "ignore": 3}}) == 3
    regions = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}
    assert nz.segmentation_heads({"labels": regions, "regions_class_order": [1, 2, 3]}) == 3
    with pytest.raises(MedTransferError, match="no 'labels'"):
        nz.segmentation_heads({"channel_names": {"0": "CT"}})


def test_classification_and_features_keep_the_encoder(toy_checkpoint):
    ref, path = toy_checkpoint
    clf = mt.create_model("nnunet", task="classification", num_classes=4, pretrained=path).eval()
    assert clf.load_report.coverage == 1.0 and clf.load_report.missing == ["head.mlp.0.weight", "head.mlp.0.bias"]
    assert all(k.startswith("decoder.") for k in clf.load_report.unexpected) and clf.load_report.unexpected
    x = _x(2, 1, 32, 32, 32)
    feats = mt.create_model("nnunet", task="features", pretrained=path).eval()
    with torch.no_grad():
        assert clf(x).shape == (2, 4)
        assert torch.equal(feats(x), ref.encoder(x)[-1]) and feats(x).shape == (2, 16, 8, 8, 8)


def test_another_class_count_gets_a_new_head_and_keeps_the_rest(toy_checkpoint):
    model = mt.create_model("nnunet", num_classes=5, pretrained=toy_checkpoint[1])
    report = model.load_report
    assert report.coverage == 1.0
    assert sorted(k for k, _, _ in report.mismatched) == sorted(
        f"decoder.seg_layers.{i}.{p}" for i in range(2) for p in ("weight", "bias"))


@pytest.mark.parametrize("key, value, match", [
    ("nonlin", "os.system", "nonlin 'os.system' is not one of"),
    ("norm_op", "evil_module_xyz.Norm", "norm_op 'evil_module_xyz.Norm' is not one of"),
])
def test_names_in_the_plans_are_looked_up_never_imported(key, value, match):
    plans = _plans()
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"][key] = value
    with pytest.raises(MedTransferError, match=match):
        mt.create_model("nnunet", plans=plans)
    assert "evil_module_xyz" not in sys.modules


def test_a_custom_network_class_is_refused_clearly():
    plans = _plans()
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "my_lab.nets.MyUNet"
    with pytest.raises(MedTransferError, match="network class 'my_lab.nets.MyUNet' is not one medtransfer builds"):
        mt.create_model("nnunet", plans=plans)


def test_bad_plans_arguments_are_clear_errors(tmp_path):
    with pytest.raises(MedTransferError, match="no such plans file"):
        mt.create_model("nnunet", plans=tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MedTransferError, match="bad.json: not a readable JSON plans"):
        mt.create_model("nnunet", plans=tmp_path / "bad.json")
    with pytest.raises(MedTransferError, match="need the plans too"):
        mt.create_model("nnunet", configuration="2d")


def test_without_plans_the_default_3d_fullres_topology():
    with torch.device("meta"):
        model = mt.create_model("nnunet")
        out = model(torch.empty(1, 1, 64, 64, 64))
    assert out.shape == (1, 2, 64, 64, 64)
    assert sum(p.numel() for p in model.parameters()) == 31_195_594
    assert model.size_divisor == (32, 32, 32)
    assert [s[0].convs[0].conv.out_channels for s in model.encoder.stages] == [32, 64, 128, 256, 320, 320]


def test_totalsegmentator_entry_points_inside_the_unzipped_results_folder(tmp_path, monkeypatch):
    cfg = mt.get_entry("nnunet").pretrained_cfg("totalseg_v2_organs")
    assert cfg.url == ("https://github.com/wasserth/TotalSegmentator/releases/download/v2.0.0-weights/"
                       "Dataset291_TotalSegmentator_part1_organs_1559subj.zip")
    monkeypatch.setenv("MEDTRANSFER_HOME", str(tmp_path))
    with pytest.raises(WeightsNotFoundError) as info:
        mt.create_model("nnunet.totalseg_v2_organs", pretrained=True)
    assert cfg.url in str(info.value) and "fold_0/checkpoint_final.pth" in str(info.value)
    # the zip unpacked into the cache: the checkpoint sits in its results folder
    target = tmp_path / "weights" / cfg.file_name
    target.parent.mkdir(parents=True)
    _save_checkpoint(target, _randomise(_reference_plain()), _plans())
    model = mt.create_model("nnunet.totalseg_v2_organs", pretrained=True)
    assert model.load_report.coverage == 1.0 and model.pretrained_cfg is cfg


def test_zoo_lists_nnunet_with_its_weights():
    from medtransfer.zoo.tools import describe_model

    info = describe_model("nnunet")
    assert info.weights == ["nnunet.totalseg_v2_organs"] and info.parameters == 31_195_594
    assert info.options == ["plans", "configuration", "dataset_json"]
    assert info.input_contract == "CT, 1 ch, 1.5x1.5x1.5 mm"


def test_arch_dicts_are_not_mutated(toy_checkpoint):
    plans = _plans()
    before = copy.deepcopy(plans)
    mt.create_model("nnunet", plans=plans, num_classes=3)
    assert plans == before


def test_zoo_inspect_finds_the_nnunet_fit_from_the_files_own_plans(toy_checkpoint):
    from medtransfer.zoo.tools import inspect_checkpoint

    info = inspect_checkpoint(toy_checkpoint[1])
    fit = next(f for f in info.fits if f.model == "nnunet")
    assert info.source == "nnunet" and fit.ok and fit.coverage == 1.0 and fit.file_used == 1.0
    assert fit.reason == ("plans=<nnUNetPlans of Dataset999_Toy>, configuration=3d_fullres, "
                          "dataset_json=<dataset.json, 3 labels>")
    assert info.metadata["in_channels"] == 1 and info.metadata["pretrained_cfg"]["spacing"] == (2.0, 0.8, 0.8)


def test_source_nnunet_on_another_layout_is_a_clear_error(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save({"conv.weight": torch.zeros(2, 1, 3, 3, 3)}, path)
    with pytest.raises(MedTransferError, match="plain.pth: the file does not have the layout of a 'nnunet' checkpoint"):
        mt.create_model("nnunet", pretrained=path, source="nnunet")


def test_a_run_finetuned_from_a_checkpoint_evaluates_with_the_checkpoints_network(tmp_path):
    """evaluate/predict rebuild the model without the weight file: the plans read from it are kept in run.json."""
    from medtransfer.data.phantoms import write_phantom_dataset
    from medtransfer.train.config import validate
    from medtransfer.train.finetune import evaluate, run_finetune

    data = write_phantom_dataset(tmp_path / "data", 5, 0, shape=(32, 32, 32), spacing=(5.0, 5.0, 5.0))
    ckpt = _save_checkpoint(tmp_path / "checkpoint_final.pth", _randomise(_reference_plain()), _plans())
    cfg = validate({"model": {"name": "nnunet", "task": "segmentation", "pretrained": str(ckpt)},
                    "data": {"path": str(data), "patch_size": [16, 16, 16], "batch_size": 3, "val_fraction": 0.4},
                    "train": {"max_epochs": 1, "max_steps": 1, "seed": 0}, "optim": {}, "out": str(tmp_path / "run")})
    run = run_finetune(cfg, progress=False)
    recorded = json.loads((run / "run.json").read_text())["arch_kwargs"]
    assert recorded["configuration"] == "3d_fullres" and recorded["plans"]["plans_name"] == "nnUNetPlans"
    summary = json.loads((evaluate(run, split="val") / "summary.json").read_text())
    assert summary["cases"] == 2
