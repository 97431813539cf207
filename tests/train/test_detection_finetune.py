"""Task detection end to end on the LUNA16-layout phantoms: finetune (loss down, run folder), exact resume,
evaluate (hits and misses, FROC), predict (boxes JSON in voxel and world coordinates, box label map)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medtransfer.data.cache import PreparedCache
from medtransfer.data.phantoms_detection import write_detection_phantoms
from medtransfer.errors import MedTransferError
from medtransfer.data.datasets import load_dataset
from medtransfer.train.finetune import evaluate, predict, run_finetune
from medtransfer.train.torchdata import BoxPatchDataset

torch.set_num_threads(1)

RUN_FILES = ("config.yaml", "run.json", "contract.json", "env.json", "split.json", "metrics.jsonl",
             "checkpoints/last.pt", "checkpoints/best.pt")


@pytest.fixture(scope="module")
def luna(tmp_path_factory):
    return write_detection_phantoms(tmp_path_factory.mktemp("luna"), 4, 0, "luna16")


def _cfg(out: Path, data: Path, steps: int, **model) -> dict:
    return {"model": {"name": "medicalnet_resnet10", "task": "detection", "detector": {"fpn_channels": 16},
                      **model},
            "data": {"path": str(data), "format": "luna16", "options": {"task": "detection"},
                     "patch_size": [32, 32, 32], "batch_size": 2, "val_fraction": 0.25, "test_fraction": 0.0,
                     "cache_dir": str(out.parent / "cache")},
            "optim": {"lr": 1e-3}, "out": str(out),
            "train": {"max_steps": steps, "max_epochs": None, "val_every": 2, "val_interval": "step"}}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, luna):
    out = tmp_path_factory.mktemp("runs") / "run"
    run_finetune(_cfg(out, luna, 4), progress=False)
    return out


def test_detection_finetune_writes_run_and_lowers_loss(finished):
    for name in RUN_FILES:
        assert (finished / name).is_file(), name
    records = [json.loads(x) for x in (finished / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["val"]] == [2, 4]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert {"cpm", "map_iou0.1", "sensitivity@0.125", "sensitivity@8", "loss"} <= set(records[1]["val"])
    run = json.loads((finished / "run.json").read_text())
    assert run["task"] == "detection" and run["protocol"] == "luna16" and run["in_channels"] == 1
    assert torch.load(finished / "checkpoints" / "best.pt", weights_only=True)["monitor"] == "cpm"


def test_detection_resume_is_exact(tmp_path, luna, finished):
    out = tmp_path / "run"
    run_finetune(_cfg(out, luna, 2), progress=False)
    run_finetune({**_cfg(out, luna, 4)}, resume=True, progress=False)
    a = torch.load(finished / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "metrics.jsonl").read_text() == (finished / "metrics.jsonl").read_text().replace(
        str(finished), str(out)) or [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2, 3, 4]


def test_box_patches_hold_their_boxes(luna, finished):
    cache = PreparedCache(finished.parent / "cache")
    case = cache.case_ids()[0]
    boxes, labels = cache.boxes(case)
    sizes = boxes[:, 3:] - boxes[:, :3]
    assert (sizes <= 16).all()  # every box fits a 16^3 patch, so a positive crop holds one whole
    ds = BoxPatchDataset(cache, [case], (16, 16, 16), n_max=8, seed=3, pos_ratio=1.0)
    for epoch in range(4):
        ds.set_epoch(epoch)
        item = ds[0]
        assert item["image"].shape == (1, 16, 16, 16) and item["label"].shape == (8, 7)
        rows = item["label"][item["label"][:, -1] >= 0].numpy()
        assert (rows[:, 3:6] > rows[:, :3]).all() and rows[:, :6].min() >= 0 and rows[:, :6].max() <= 16
        whole = [np.allclose(r[3:6] - r[:3], s) and r[6] == lab for r in rows for s, lab in zip(sizes, labels)]
        assert any(whole)
    # uniform crops (pos_ratio 0) are drawn from the same (seed, epoch, index) stream: repeatable
    a = BoxPatchDataset(cache, [case], (16, 16, 16), n_max=8, seed=3, pos_ratio=0.0)[0]
    b = BoxPatchDataset(cache, [case], (16, 16, 16), n_max=8, seed=3, pos_ratio=0.0)[0]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_detection_evaluate_writes_hits_and_froc(finished):
    ev = evaluate(finished, split="val")
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["protocol"] == "luna16" and summary["cases"] == 1
    assert {"cpm", "map_iou0.1", "sensitivity@1"} <= set(summary["metrics"])
    hits = json.loads((ev / "hits.json").read_text())["cases"][0]
    cache = PreparedCache(finished.parent / "cache")
    assert len(hits["lesions"]) == len(cache.boxes(hits["case_id"])[0])
    assert all(set(les) == {"box", "label", "hit", "score", "detection"} for les in hits["lesions"])
    rows = (ev / "cases.csv").read_text().splitlines()
    assert rows[0] == "case_id,lesions,hit,missed,detections,false_positives"


def test_detection_evaluate_data_reads_boxes_of_another_luna_folder(tmp_path, finished):
    # a second LUNA16 folder is read as the run read its own (format luna16, task detection): its nodules are
    # scored, where a bare load_dataset gave a dataset without boxes
    other = write_detection_phantoms(tmp_path / "luna2", 2, 7, "luna16")
    ev = evaluate(finished, data_path=other)
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["split"] == "all" and summary["cases"] == 2 and summary["protocol"] == "luna16"
    assert {"cpm", "sensitivity@0.125", "sensitivity@8", "map_iou0.1"} <= set(summary["metrics"])
    hits = json.loads((ev / "hits.json").read_text())["cases"]
    cache = PreparedCache(ev / "cache")
    assert sorted(h["case_id"] for h in hits) == sorted(cache.case_ids())
    assert [len(h["lesions"]) for h in hits] == [len(cache.boxes(h["case_id"])[0]) for h in hits]
    assert all(len(h["lesions"]) >= 1 for h in hits)


def test_detection_evaluate_data_of_another_task_is_refused(tmp_path, finished):
    from medtransfer.data.phantoms import write_phantom_dataset

    seg = write_phantom_dataset(tmp_path / "seg", 2, 0, shape=(16, 16, 16), with_2d=False)
    # read as the run's format (luna16, task detection): a clear error naming what is missing, before writing
    with pytest.raises(MedTransferError, match="seg: task='detection' needs annotations.csv"):
        evaluate(finished, data_path=seg)
    assert not (finished / "evaluation-seg").exists()


def test_detection_predict_boxes_json_and_label_map(tmp_path, luna, finished):
    import SimpleITK as sitk

    scan = sorted((luna / "subset0").glob("*.mhd"))[0]
    out = tmp_path / "pred"
    written = predict(finished, [scan], out, box_labels=True, box_threshold=0.0)
    js = json.loads(written[0].read_text())
    assert written[0].name == scan.stem + ".boxes.json"
    for det in js["detections"]:
        v, w = np.array(det["voxel"]), np.array(det["world_cccwhd"])
        assert (v[3:] > v[:3]).all() and (w[3:] > 0).all()
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(written[1])))
    assert lab.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(scan))).shape
    assert (lab > 0).any() == bool(js["detections"])
    with pytest.raises(MedTransferError, match="exist already"):
        predict(finished, [scan], out)


def test_detection_25d_deeplesion_phantoms(tmp_path):
    root = write_detection_phantoms(tmp_path / "dl", 4, 0, "deeplesion")
    out = tmp_path / "run"
    # score_thresh 0: the 3-step model's boxes all kept, so predict below has detections to write
    cfg = {"model": {"name": "resnet50_2d", "task": "detection",
                     "detector": {"fpn_channels": 16, "score_thresh": 0.0, "detections_per_image": 5}},
           "data": {"path": str(root), "format": "deeplesion", "patch_size": [48, 48], "batch_size": 2,
                    "val_fraction": 0.25, "test_fraction": 0.0},
           "optim": {"lr": 1e-3}, "out": str(out),
           "train": {"max_steps": 3, "max_epochs": None, "val_every": 1, "val_interval": "step"}}
    run_finetune(cfg, progress=False)
    run = json.loads((out / "run.json").read_text())
    # 9 neighbouring slices as channels, read from the prepared images; DeepLesion's protocol for 2D boxes
    assert run["in_channels"] == 9 and run["protocol"] == "deeplesion" and run["spatial_dims"] == 2
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert {"sensitivity@0.5", "sensitivity@16", "cpm", "map_iou0.1"} <= set(records[-1]["val"])
    assert (out / "checkpoints" / "best.pt").is_file()
    # DeepLesion's Train_Val_Test is the run's split (the phantoms: patients 1, 2 train, 3 val, 4 test; a case is
    # a key slice <patient>_<study>_<series>_<slice>), not drawn from val_fraction
    split = json.loads((out / "split.json").read_text())
    patients = {part: sorted({c[:6] for c in split[part]}) for part in ("train", "val", "test")}
    assert split["method"] == "dataset" and patients == {"train": ["000001", "000002"], "val": ["000003"],
                                                         "test": ["000004"]}
    assert json.loads((out / "contract.json").read_text())["split"] == {
        "method": "dataset", "source": "DL_info.csv column Train_Val_Test"}
    # predict on a key-slice PNG: its neighbours and spacing from DL_info.csv, boxes in pixel and world coordinates
    dataset = load_dataset(root)
    case = dataset.cases[0]
    pred = tmp_path / "pred"
    written = predict(out, [case.images[0]], pred)
    assert [p.name for p in written] == [f"{case.case_id}.boxes.json"]
    js = json.loads(written[0].read_text())
    assert js["slices"] == dataset.description["slices"][case.case_id] and len(js["slices"]) == 9
    sy, sx = dataset.description["spacing"][case.case_id][:2]
    assert len(js["detections"]) == 5
    for det in js["detections"]:
        r0, c0, r1, c1 = det["voxel"]
        assert det["pixel_xyxy"] == pytest.approx([c0 - 0.5, r0 - 0.5, c1 - 0.5, r1 - 0.5])
        x1, y1, x2, y2 = det["pixel_xyxy"]
        assert det["world_cxcywh"] == pytest.approx([(x1 + x2) / 2 * sx, (y1 + y2) / 2 * sy, (x2 - x1) * sx,
                                                     (y2 - y1) * sy])
    # the whole folder: one file per key slice; refused before writing when one exists, or for a 3D volume
    with pytest.raises(MedTransferError, match="exist already, nothing was written"):
        predict(out, [root], pred)
    assert sorted(p.name for p in pred.iterdir()) == [f"{case.case_id}.boxes.json"]
    assert len(predict(out, [root], tmp_path / "all")) == len(dataset.cases)
    volume = write_detection_phantoms(tmp_path / "luna", 1, 0, "luna16")
    with pytest.raises(MedTransferError, match="predicts DeepLesion key slices"):
        predict(out, [sorted((volume / "subset0").glob("*.mhd"))[0]], tmp_path / "none")
    with pytest.raises(MedTransferError, match="--box-labels draws label maps of 3D volumes"):
        predict(out, [root], tmp_path / "none", box_labels=True)
    assert not (tmp_path / "none").exists()
