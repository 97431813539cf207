"""Detection speed: a 3D RetinaNet on a MedicalNet ResNet-10, medtransfer's packed network + DetectionLoss against the
same modules assembled directly from MONAI classes (``RetinaNet`` + ``RetinaNetDetector``) in a bare loop.

Sizes, scaled from MONAI's LUNA16 bundle (training patch 192x192x80, batch 4) so that it runs in minutes on 2 cores:

- training step: batch 2 of 40x96x96 ([z, y, x]) patches with 2 nodule boxes each, SGD, forward + loss + backward +
  step; the two loops alternate, median of ``--steps`` each after a warm-up step;
- inference per scan: one 64x176x176 volume (1.05e5 anchors at strides 4 and 8), network + postprocess (decode,
  score threshold, top-k, NMS), median of ``--scans``;
- anchor matching (MONAI ``ATSSMatcher``, 3 boxes) and box selection (``BoxSelector``: threshold, top-k per level,
  NMS) alone on that scan's 1.05e5 anchors.

Both paths share the very same modules (encoder, FPN, heads), so they compute the same numbers; the difference is
the packing of the output and the unpacking in the loss (medtransfer) vs MONAI's dict of per-level maps. MONAI's
``compute_anchor_matched_idxs`` tests ``isinstance(matcher, torchvision Matcher)``, which fails without
torchvision, so the MONAI path overrides that one method with its ATSS branch (as medtransfer does).

    python benchmarks/detection.py            # ~3-5 min on 2 cores
Prints a table and writes JSON (default ``benchmarks/results/detection-cpu.json``, atomically).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

TRAIN_PATCH = (40, 96, 96)
SCAN = (64, 176, 176)


def _boxes(shape, n, gen):
    lo = torch.stack([torch.randint(2, s - 14, (n,), generator=gen) for s in shape], 1).float()
    return torch.cat([lo, lo + 6 + 6 * torch.rand(n, 3, generator=gen)], 1)


def build(backbone: str):
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
    from monai.apps.detection.networks.retinanet_network import RetinaNet

    from medtransfer.train.detector import build_detector

    model, loss_fn, post = build_detector(backbone, spatial_dims=3, detector={"fpn_channels": 128})

    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.pyramid, self.fpn, self.out_channels = model.pyramid, model.fpn, 128

        def forward(self, x):
            from collections import OrderedDict

            return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.pyramid(x))))

    net = RetinaNet(3, 1, model.num_anchors, Features(), size_divisible=model.size_divisible)
    net.classification_head, net.regression_head = model.classification_head, model.regression_head

    class Detector(RetinaNetDetector):
        def compute_anchor_matched_idxs(self, anchors, targets, locs):  # ATSS branch only (no torchvision)
            return [self.proposal_matcher(t["boxes"], a, locs, self.num_anchors_per_loc)[1]
                    for a, t in zip(anchors, targets)]

    det = Detector(net, model.anchor_generator)
    eng = loss_fn.engine
    det.set_cls_loss(eng.cls_loss_func)
    det.set_atss_matcher(num_candidates=4, center_in_gt=False)
    det.set_hard_negative_sampler(batch_size_per_image=64, positive_fraction=0.3, pool_size=20, min_neg=16)
    det.set_box_selector_parameters(score_thresh=eng.box_selector.score_thresh,
                                    topk_candidates_per_level=eng.box_selector.topk_candidates_per_level,
                                    nms_thresh=eng.box_selector.nms_thresh,
                                    detections_per_img=eng.box_selector.detections_per_img)
    return model, loss_fn, post, det


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="medicalnet_resnet10")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--scans", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from medtransfer.train.detector import pad_targets, unpack
    from medtransfer.weights.io import atomic_write

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model, loss_fn, post, det = build(args.backbone)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    x = torch.randn(2, 1, *TRAIN_PATCH, generator=gen)
    boxes = [_boxes(TRAIN_PATCH, 2, gen) for _ in range(2)]
    target = pad_targets(boxes, [torch.ones(2)] * 2)
    monai_targets = [{"boxes": b, "labels": torch.zeros(2, dtype=torch.long)} for b in boxes]

    def ours():
        loss = loss_fn(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())

    def monai():
        losses = det(x, monai_targets)
        loss = losses[det.cls_key] + losses[det.box_reg_key]
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())

    model.train()
    det.train()
    times = {"medtransfer": [], "monai": []}
    cpu = {"medtransfer": [], "monai": []}  # process CPU time: what other processes on a shared machine disturb least
    ours(), monai()  # warm-up (allocations, anchor caches)
    pair = [("medtransfer", ours), ("monai", monai)]
    for step in range(args.steps):
        for name, fn in (pair if step % 2 == 0 else pair[::-1]):  # alternate which goes first
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}  # the least disturbed step
    cpu_med = {k: sorted(v)[len(v) // 2] for k, v in cpu.items()}

    # inference on a whole scan
    model.eval()
    det.eval()
    scan = torch.randn(1, 1, *SCAN, generator=gen)
    inf = {"medtransfer": [], "monai": []}
    inf_cpu = {"medtransfer": [], "monai": []}

    with torch.no_grad():
        for i in range(args.scans):
            for name in (["medtransfer", "monai"] if i % 2 == 0 else ["monai", "medtransfer"]):
                t0, c0 = time.perf_counter(), time.process_time()
                if name == "medtransfer":
                    out = model(scan)
                    dets = post(out, SCAN)
                else:
                    mdets = det(scan)
                inf[name].append(time.perf_counter() - t0)
                inf_cpu[name].append(time.process_time() - c0)
    inf_med = {k: sorted(v)[len(v) // 2] for k, v in inf.items()}
    inf_cpu_med = {k: sorted(v)[len(v) // 2] for k, v in inf_cpu.items()}
    same = bool(torch.allclose(dets[0][0], mdets[0]["boxes"], atol=1e-4)) if len(dets[0][0]) == len(mdets[0]["boxes"]) else False

    # anchor matching and box selection alone, on the scan's anchors
    u = unpack(out, 1, 3)
    n_anchors = int(u["anchors"].shape[0])
    locs = [c // model.num_anchors for c in u["counts"]]
    gt = _boxes(SCAN, 3, gen)
    t0 = time.perf_counter()
    for _ in range(3):
        det.proposal_matcher(gt, u["anchors"], locs, model.num_anchors)
    t_match = (time.perf_counter() - t0) / 3
    logits = torch.randn(n_anchors, 1, generator=gen)
    split = [c for c in u["counts"]]
    boxes_lv = list(loss_fn.engine.box_coder.decode_single(torch.zeros(n_anchors, 6), u["anchors"]).split(split))
    t0 = time.perf_counter()
    for _ in range(3):
        loss_fn.engine.box_selector.select_boxes_per_image(boxes_lv, list(logits.split(split)), list(SCAN))
    t_select = (time.perf_counter() - t0) / 3

    overhead = (med["medtransfer"] - med["monai"]) / med["monai"] * 100
    overhead_min = (best["medtransfer"] - best["monai"]) / best["monai"] * 100
    overhead_cpu = (cpu_med["medtransfer"] - cpu_med["monai"]) / cpu_med["monai"] * 100
    inf_overhead_cpu = (inf_cpu_med["medtransfer"] - inf_cpu_med["monai"]) / inf_cpu_med["monai"] * 100
    payload = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "backbone": args.backbone, "describe": model.describe(),
        "train_patch_zyx": TRAIN_PATCH, "batch": 2, "scan_zyx": SCAN, "anchors_per_scan": n_anchors,
        "train_step_s": {"medtransfer_median": med["medtransfer"], "monai_median": med["monai"],
                         "medtransfer_min": best["medtransfer"], "monai_min": best["monai"],
                         "all": times, "overhead_percent": overhead, "overhead_percent_min": overhead_min,
                         "cpu_s": cpu, "cpu_medians": cpu_med, "overhead_percent_cpu": overhead_cpu},
        "inference_per_scan_s": {"medtransfer_median": inf_med["medtransfer"], "monai_median": inf_med["monai"],
                                 "all": inf, "same_boxes": same, "cpu_s": inf_cpu, "cpu_medians": inf_cpu_med,
                                 "overhead_percent_cpu": inf_overhead_cpu},
        "atss_matching_s": t_match, "box_selection_nms_s": t_select,
    }
    rows = [
        ("train step, medtransfer (median)", f"{med['medtransfer']:.3f} s"),
        ("train step, bare MONAI (median)", f"{med['monai']:.3f} s"),
        ("overhead (medians)", f"{overhead:+.2f} %"),
        ("train step, medtransfer / bare MONAI (min)", f"{best['medtransfer']:.3f} / {best['monai']:.3f} s"),
        ("overhead (minima)", f"{overhead_min:+.2f} %"),
        ("train step CPU time, medtransfer / MONAI", f"{cpu_med['medtransfer']:.3f} / {cpu_med['monai']:.3f} s"),
        ("overhead (CPU time medians)", f"{overhead_cpu:+.2f} %"),
        ("inference per scan, medtransfer", f"{inf_med['medtransfer']:.3f} s"),
        ("inference per scan, bare MONAI", f"{inf_med['monai']:.3f} s"),
        ("inference CPU time, medtransfer / MONAI",
         f"{inf_cpu_med['medtransfer']:.3f} / {inf_cpu_med['monai']:.3f} s ({inf_overhead_cpu:+.2f} %)"),
        ("same boxes", str(same)),
        (f"ATSS matching, {n_anchors} anchors", f"{t_match * 1000:.1f} ms"),
        (f"box selection + NMS, {n_anchors} anchors", f"{t_select * 1000:.1f} ms"),
    ]
    for k, v in rows:
        print(f"{k:45s} {v}")
    out_path = args.out or Path(__file__).parent / "results" / "detection-cpu.json"
    text = json.dumps(payload, indent=2) + "\n"
    atomic_write(out_path, lambda tmp: tmp.write_text(text))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
