"""Nodule candidate classification end to end: balanced sampling, the genesis_ncc recipe, candidate cubes ->
fine-tune -> evaluate with AUC, per-candidate scores and the FROC of the candidates."""

from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medtransfer.data.candidates import extract_candidates
from medtransfer.errors import MedTransferError
from medtransfer.train import apply
from medtransfer.train.config import resolve, validate
from medtransfer.train.finetune import evaluate, resolve_contract, run_finetune
from medtransfer.train.samplers import BalancedClassSampler, balanced_sampler

torch.set_num_threads(1)


def test_balanced_epoch_draws_classes_equally_and_minority_cases_evenly():
    classes = [0] * 95 + [1] * 5
    sampler = BalancedClassSampler(classes, seed=3)
    order = list(sampler)
    assert len(order) == len(sampler) == 100
    assert Counter(classes[i] for i in order) == {0: 50, 1: 50}
    assert Counter(i for i in order if classes[i] == 1) == {95: 10, 96: 10, 97: 10, 98: 10, 99: 10}
    assert len({i for i in order if classes[i] == 0}) == 50  # the majority subsampled without replacement


def test_balanced_remainder_and_three_classes():
    classes = [0] * 7 + [1] * 3 + [2]  # 11 draws: 4, 4, 3 in some order
    for epoch in range(5):
        sampler = BalancedClassSampler(classes, seed=0)
        sampler.set_epoch(epoch)
        counts = Counter(classes[i] for i in sampler)
        assert sorted(counts.values()) == [3, 4, 4] and set(counts) == {0, 1, 2}


def test_balanced_order_is_a_function_of_seed_and_epoch_and_shards_like_the_shuffle_sampler():
    classes = [0] * 20 + [1] * 3
    a, b = BalancedClassSampler(classes, seed=7), BalancedClassSampler(classes, seed=7)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b)
    b.set_epoch(5)
    assert list(a) != list(b)
    assert list(a) != list(BalancedClassSampler(classes, seed=8))
    full = a.epoch_order()
    shards = [BalancedClassSampler(classes, seed=7, rank=r, world_size=2) for r in (0, 1)]
    for s in shards:
        s.set_epoch(4)
    r0, r1 = (list(s) for s in shards)
    assert len(r0) == len(r1) == 12
    assert r0 == (full + full[:1])[0::2] and r1 == (full + full[:1])[1::2]


def test_balanced_sampling_refusals():
    with pytest.raises(MedTransferError, match="data.sampling: balanced needs one class per training case; d.csv"):
        balanced_sampler([(1.0, 0.0), (0.0, 1.0)], 0, "d.csv")
    with pytest.raises(MedTransferError, match="data.sampling: balanced draws classes equally, so it needs "
                                               "model.task: classification"):
        validate({"model": {"name": "genesis_unet3d", "task": "segmentation"}, "data": {"sampling": "balanced"}})


def test_genesis_ncc_recipe_is_the_published_ncc_setting():
    cfg = resolve({"model": {"name": "genesis_unet3d", "task": "classification"}, "recipe": "genesis_ncc"})
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.schedule.name) == ("adam", 1e-3, 0.0, "none")
    assert (cfg.data.batch_size, cfg.data.patch_size, cfg.data.sampling) == (24, (32, 64, 64), "balanced")
    assert (cfg.train.monitor, cfg.train.early_stop_patience, cfg.loss.name, cfg.model.num_classes) == (
        "loss", 10, "bce", 1)
    contract = resolve_contract(cfg, 3, "CT")
    assert contract["patch_size"] == [32, 64, 64]
    assert contract["sources"]["patch_size"] == "recipe genesis_ncc (data.patch_size)"
    mine = resolve({"model": {"name": "genesis_unet3d", "task": "classification"}, "recipe": "genesis_ncc",
                    "data": {"patch_size": [16, 32, 32], "sampling": "shuffle"}})
    assert resolve_contract(mine, 3, "CT")["sources"]["patch_size"] == "user config (data.patch_size)"
    assert mine.data.sampling == "shuffle"


# ------------------------------------------------------------------------------------------ end to end

SPACING = (1.5, 1.2, 2.0)  # ITK (x, y, z)


def _luna(root, n_scans=3, seed=0):
    """Lung-like scans (-800 HU, noise) of 16 x 24 x 24 voxels [z, y, x]; 3 nodules (+40 HU balls, radius 2.5
    voxels) and 9 false candidates on empty lung per scan."""
    rng = np.random.default_rng(seed)
    cands, nodules = [], []
    zz, yy, xx = np.meshgrid(np.arange(16), np.arange(24), np.arange(24), indexing="ij")
    for s in range(n_scans):
        uid = f"1.3.6.{s}"
        array = rng.normal(-800, 30, size=(16, 24, 24))
        centres = [(4 + 4 * k, 6 + 6 * k, 18 - 6 * k) for k in range(3)]  # [z, y, x]
        for z, y, x in centres:
            array[(zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= 2.5 ** 2] = 40
        img = sitk.GetImageFromArray(array.astype(np.int16))
        img.SetSpacing(SPACING)
        img.SetOrigin((-20.0 * s, 5.0, -100.0))
        (root / f"subset{s}").mkdir(parents=True)
        sitk.WriteImage(img, str(root / f"subset{s}" / f"{uid}.mhd"))
        for z, y, x in centres:
            p = img.TransformIndexToPhysicalPoint((x, y, z))
            cands.append((uid, p, 1))
            nodules.append((uid, p, 5.0 * min(SPACING)))
        for _ in range(9):
            z, y, x = rng.integers(2, 14), rng.integers(2, 22), rng.integers(2, 22)
            if min(abs(z - c[0]) + abs(y - c[1]) + abs(x - c[2]) for c in centres) < 6:
                z, y, x = 2, 2, 21
            cands.append((uid, img.TransformIndexToPhysicalPoint((int(x), int(y), int(z))), 0))
    for name, rows, last in (("candidates.csv", cands, "class"), ("annotations.csv", nodules, "diameter_mm")):
        with (root / name).open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["seriesuid", "coordX", "coordY", "coordZ", last])
            w.writerows([uid, *p, v] for uid, p, v in rows)


@pytest.fixture(scope="module")
def ncc(tmp_path_factory):
    root = tmp_path_factory.mktemp("ncc")
    _luna(root / "luna")
    extract_candidates(root / "luna", root / "luna" / "candidates.csv", root / "cubes", size=(8, 16, 16),
                       progress=False)
    cfg = resolve({
        "model": {"name": "medicalnet_resnet10", "task": "classification"},
        "recipe": "genesis_ncc",
        "data": {"path": str(root / "cubes" / "candidates.csv"), "patch_size": [8, 16, 16], "batch_size": 6,
                 "val_fraction": 0.25},
        "train": {"max_epochs": 3, "max_steps": 12, "val_every": 3, "val_interval": "step", "seed": 0},
        "out": str(root / "run"),
    })
    return root, run_finetune(cfg, progress=False)


def test_ncc_fine_tune_balanced_lowers_the_loss_and_evaluate_reports_auc_and_froc(ncc, caplog):
    root, run = ncc
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records]
    assert len(losses) >= 3 and losses[-1] < losses[0], losses
    saved = json.loads((run / "contract.json").read_text())
    assert saved["preset"] == "genesis_ct" and saved["data_modality"] == "CT"  # the cubes' HU scaled to [0, 1]
    assert json.loads((run / "run.json").read_text())["num_classes"] == 1
    assert (run / "config.yaml").read_text().count("sampling: balanced") == 1

    out = evaluate(run, split="all")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == 36 and 0.0 <= summary["metrics"]["auc_0"] <= 1.0
    with (out / "luna16_submission.csv").open() as f:
        submission = list(csv.DictReader(f))
    assert len(submission) == 36 and set(submission[0]) == {"seriesuid", "coordX", "coordY", "coordZ", "probability"}
    with (out / "cases.csv").open() as f:
        cases = list(csv.DictReader(f))
    assert [int(c["prediction"]) for c in cases] == [int(float(s["probability"]) > 0.5) for s in submission]
    froc = summary["froc"]
    assert froc["n_scans"] == 3 and froc["lesions"] == 9 and froc["every_candidate_of_those_scans_scored"]
    fps = ("0.125", "0.25", "0.5", "1", "2", "4", "8")
    assert set(froc) == {"cpm", "n_scans", "lesions", "every_candidate_of_those_scans_scored",
                         *(f"sensitivity@{fp}" for fp in fps)}
    assert froc["cpm"] == pytest.approx(np.mean([froc[f"sensitivity@{fp}"] for fp in fps]))


def test_single_logit_predictions_are_the_sign_of_the_logit(ncc, monkeypatch):
    root, run = ncc
    cfg, info, model = apply._load_run(run)

    class Positive(torch.nn.Module):  # one logit of +2 for every cube: every candidate called a nodule
        def forward(self, x):
            return torch.full((x.shape[0], 1), 2.0)

    monkeypatch.setattr(apply, "_load_run", lambda run_dir: (cfg, info, Positive()))
    out = evaluate(run, split="all", overwrite=True)
    with (out / "cases.csv").open() as f:
        assert {c["prediction"] for c in csv.DictReader(f)} == {"1"}
    with (out / "luna16_submission.csv").open() as f:
        assert {r["probability"] for r in csv.DictReader(f)} == {"0.880797"}  # sigmoid(2)


def test_froc_of_the_candidate_scores_by_hand(ncc, monkeypatch):
    """Scores chosen per candidate: the 9 nodule candidates all score above every false one except one false
    candidate per scan that scores highest. Sorted by score: 3 FPs (one per scan, 1 FP per scan), then the 9 nodules,
    then 24 FPs. LUNA16's curve: sensitivity 0 up to 1 FP/scan, 1 from there: at 1/8..1/2 the linear interpolation
    between (0, 0) and (1, 0) is 0; at 1, 2, 4, 8 it is 1 -> CPM 4/7."""
    root, run = ncc
    cfg, info, _ = apply._load_run(run)
    with (root / "cubes" / "candidates.csv").open() as f:
        rows = list(csv.DictReader(f))
    first_false = {}
    for r in rows:
        if r["class"] == "0":
            first_false.setdefault(r["seriesuid"], r["case_id"])
    score = {r["case_id"]: 10.0 if r["case_id"] in first_false.values() else (5.0 if r["class"] == "1" else -5.0)
             for r in rows}
    order = iter(r["case_id"] for r in rows)  # evaluate scores the cases in the table's order

    class ByCase(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[score[next(order)]]])

    monkeypatch.setattr(apply, "_load_run", lambda run_dir: (cfg, info, ByCase()))
    monkeypatch.setattr("medtransfer.data.cache.PreparedCache.case_ids", lambda self: [r["case_id"] for r in rows])
    froc = json.loads((evaluate(run, split="all", overwrite=True) / "summary.json").read_text())["froc"]
    assert [froc[f"sensitivity@{fp}"] for fp in ("0.125", "0.25", "0.5", "1", "2", "4", "8")] == [0, 0, 0, 1, 1, 1, 1]
    assert froc["cpm"] == pytest.approx(4 / 7)


def test_evaluate_gives_froc_points_the_candidates_and_the_nodules_of_their_scans(ncc, monkeypatch):
    import sys
    import types

    root, run = ncc
    calls = []

    def froc_points(candidates, nodules, *, n_scans, **kwargs):
        calls.append((candidates, nodules, n_scans))
        return {"sensitivity@1": 0.5, "cpm": 0.25}

    monkeypatch.setitem(sys.modules, "medtransfer.train.detection_metrics",
                        types.SimpleNamespace(froc_points=froc_points))
    out = evaluate(run, split="all", overwrite=True)
    (detections, lesions, n_scans), = calls
    assert n_scans == 3 and len(detections) == 36 and len(lesions) == 9
    with (root / "luna" / "annotations.csv").open() as f:
        first = next(csv.DictReader(f))
    assert lesions[0] == (first["seriesuid"], tuple(float(first[k]) for k in ("coordX", "coordY", "coordZ")),
                          float(first["diameter_mm"]) / 2)
    assert {d[0] for d in detections} == {"1.3.6.0", "1.3.6.1", "1.3.6.2"}
    assert json.loads((out / "summary.json").read_text())["froc"] == {
        "sensitivity@1": 0.5, "cpm": 0.25, "n_scans": 3, "lesions": 9, "every_candidate_of_those_scans_scored": True}


def test_resume_mid_epoch_under_balanced_sampling_ends_with_the_same_weights(ncc, tmp_path):
    from medtransfer.train.checkpoint import read_run_checkpoint

    root, _ = ncc

    def cfg(out, steps):
        return resolve({
            "model": {"name": "medicalnet_resnet10", "task": "classification"}, "recipe": "genesis_ncc",
            "data": {"path": str(root / "cubes" / "candidates.csv"), "patch_size": [8, 16, 16], "batch_size": 6,
                     "val_fraction": 0.25},
            "train": {"max_epochs": 3, "max_steps": steps, "val_every": 3, "val_interval": "step", "seed": 1},
            "out": str(out)})

    whole = run_finetune(cfg(tmp_path / "whole", 8), progress=False)
    cut = run_finetune(cfg(tmp_path / "cut", 4), progress=False)  # step 4 of 5 per epoch: mid-epoch
    run_finetune(cfg(tmp_path / "cut", 8), resume=True, progress=False)
    a = read_run_checkpoint(whole / "checkpoints" / "last.pt")["model"]
    b = read_run_checkpoint(cut / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ncc_on_the_luna16_detection_phantoms(tmp_path):
    """The embedded phantoms (data/phantoms_detection.py, LUNA16 layout with candidates.csv): extract -> a few
    balanced steps -> evaluate with AUC and the FROC over every candidate of the phantoms' scans."""
    from medtransfer.data.phantoms_detection import write_detection_phantoms

    luna = write_detection_phantoms(tmp_path / "luna", 2, 0, "luna16", false_per_true=2)
    result = extract_candidates(luna, luna / "candidates.csv", tmp_path / "cubes", size=(8, 16, 16), progress=False)
    with (luna / "candidates.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert result.written == len(rows) and result.positives == sum(r["class"] == "1" for r in rows) > 0
    cfg = resolve({
        "model": {"name": "medicalnet_resnet10", "task": "classification"}, "recipe": "genesis_ncc",
        "data": {"path": str(tmp_path / "cubes" / "candidates.csv"), "patch_size": [8, 16, 16], "batch_size": 6,
                 "val_fraction": 0.25},
        "train": {"max_epochs": 4, "max_steps": 6, "val_every": 2, "val_interval": "step"},
        "out": str(tmp_path / "run")})
    run = run_finetune(cfg, progress=False)
    losses = [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0], losses
    summary = json.loads((evaluate(run, split="all") / "summary.json").read_text())
    with (luna / "annotations.csv").open() as f:
        n_nodules = len(list(csv.DictReader(f)))
    assert summary["cases"] == len(rows) and 0 <= summary["metrics"]["auc_0"] <= 1
    assert summary["froc"]["n_scans"] == 2 and summary["froc"]["lesions"] == n_nodules
    assert 0 <= summary["froc"]["cpm"] <= 1
