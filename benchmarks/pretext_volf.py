"""Volume Fusion speed: pairs/s of the VolF input pipeline, medtransfer against a loop transcription of the original.

Workload per pair: two views of 96^3 from one 160^3 float32 volume (random-resized crop with scale U[0.7, 1.5] per
axis, flips, adaptive contrast, gamma, inversion; aug_mode 3) then the block fusion of the pair (5 classes, ratio 0.7,
blocks 8..32).

- ``reference``: the published pipeline as described in spec section 4b, transcribed here (numpy/scipy, one sample at
  a time, as the published code does): ``scipy.ndimage.zoom(order=1)`` per view, ``numpy.percentile`` contrast, gamma,
  inversion, and the triple Python loop over blocks. It is single-threaded (scipy's zoom and numpy's elementwise ops
  do not spawn threads; BLAS is not used).
- ``medtransfer``: :func:`crop_two_views` per volume, then :func:`fuse` on a batch of B pairs, B = 2 and 8; with
  ``torch.set_num_threads(1)`` (the fair "same CPU" comparison) and with all threads.

Target: medtransfer (1 thread) >= 20x the reference. ``run(quick=True)`` takes well under a minute on 2 cores.

    python benchmarks/pretext_volf.py            # full
    python benchmarks/pretext_volf.py --quick

Prints a table and writes JSON to ``benchmarks/results/pretext_volf-cpu.json`` (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

VOLUME, VIEW = (160, 160, 160), (96, 96, 96)
TARGET = 20.0


# --- reference: loop transcription of the published algorithm (spec 4b) -----------------------------------------

def _ref_crop(volume: np.ndarray, out, rng: np.random.Generator, scale=(0.7, 1.5)) -> np.ndarray:
    from scipy import ndimage

    s = [rng.uniform(*scale) for _ in range(3)]
    crop = [min(int(o * si), n) for o, si, n in zip(out, s, volume.shape)]
    start = [int(rng.integers(0, n - c + 1)) for n, c in zip(volume.shape, crop)]
    patch = volume[tuple(slice(a, a + c) for a, c in zip(start, crop))]
    return ndimage.zoom(patch, [o / c for o, c in zip(out, crop)], order=1)


def _ref_contrast(x: np.ndarray, rng: np.random.Generator, eps: float = 1e-6) -> np.ndarray:
    p0, p1 = rng.uniform(0.1, 2.0), rng.uniform(98.0, 99.9)
    v0, v1 = np.percentile(x, p0), np.percentile(x, p1)
    lo, hi = x.min(), x.max()
    y = np.empty_like(x)
    below, above = x < v0, x > v1
    middle = ~below & ~above
    y[below] = 0.1 * (x[below] - lo) / (v0 - lo + eps)
    y[middle] = 0.1 + 0.8 * (x[middle] - v0) / (v1 - v0 + eps)
    y[above] = 0.9 + 0.1 * (x[above] - v1) / (hi - v1 + eps)
    return y


def _ref_gamma(x: np.ndarray, rng: np.random.Generator, eps: float = 1e-6) -> np.ndarray:
    g = rng.uniform(0.7, 1.5)
    lo, hi = x.min(), x.max()
    return np.power((x - lo) / (hi - lo + eps), g) * (hi - lo) + lo


def reference_two_views(volume: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    views = []
    for _ in range(2):
        v = _ref_crop(volume, VIEW, rng)
        for axis in range(3):
            if rng.random() < 0.5:
                v = np.flip(v, axis)
        views.append(_ref_gamma(_ref_contrast(np.ascontiguousarray(v), rng), rng))
    if rng.random() < 0.25:
        views = [1.0 - v for v in views]
    return views[0], views[1]


def reference_fuse(p1: np.ndarray, p2: np.ndarray, rng: np.random.Generator, num_classes: int = 5,
                   ratio: float = 0.7, bmin=(8, 8, 8), bmax=(32, 32, 32)) -> tuple[np.ndarray, np.ndarray]:
    k_max = num_classes - 1
    size = [int(rng.integers(a, b + 1)) for a, b in zip(bmin, bmax)]
    count = [n // b for n, b in zip(p1.shape, size)]
    offset = [int(rng.integers(0, n - c * b + 1)) for n, c, b in zip(p1.shape, count, size)]
    total = count[0] * count[1] * count[2]
    foreground = set(rng.permutation(total)[: int(total * ratio)].tolist())
    label = np.zeros(p1.shape, np.int64)
    block = 0
    for i in range(count[0]):
        for j in range(count[1]):
            for k in range(count[2]):
                if block in foreground:
                    label[offset[0] + i * size[0]: offset[0] + (i + 1) * size[0],
                          offset[1] + j * size[1]: offset[1] + (j + 1) * size[1],
                          offset[2] + k * size[2]: offset[2] + (k + 1) * size[2]] = rng.integers(1, k_max + 1)
                block += 1
    w = label.astype(p1.dtype) / k_max
    return w * p1 + (1 - w) * p2, label


def reference_pairs_per_s(volume: np.ndarray, pairs: int) -> float:
    rng = np.random.default_rng(0)
    reference_fuse(*reference_two_views(volume, rng), rng)  # warm-up
    t0 = time.perf_counter()
    for _ in range(pairs):
        reference_fuse(*reference_two_views(volume, rng), rng)
    return pairs / (time.perf_counter() - t0)


# --- medtransfer -----------------------------------------------------------------------------------------------

def ours_pairs_per_s(volume: torch.Tensor, batch: int, repeats: int) -> float:
    from medtransfer.pretext.volume_fusion import crop_two_views, fuse

    g = torch.Generator().manual_seed(0)

    def one_batch() -> None:
        views = [crop_two_views(volume, VIEW, g) for _ in range(batch)]
        fuse(torch.stack([a for a, _ in views]), torch.stack([b for _, b in views]), g)

    one_batch()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        one_batch()
        times.append(time.perf_counter() - t0)
    return batch / sorted(times)[len(times) // 2]


def make_volume(seed: int = 0) -> np.ndarray:
    """CT-like float32: smooth structures in [-1000, 1000] HU plus noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in VOLUME), indexing="ij")
    body = np.where(y * y + x * x < 0.8, 40.0, -1000.0).astype(np.float32)
    body += 300 * np.sin(6 * z) * np.cos(5 * x) + rng.normal(0, 30, VOLUME).astype(np.float32)
    return np.clip(body, -1000, 1000).astype(np.float32)


def run(quick: bool = False) -> dict:
    from medtransfer.provenance import cpu_name

    all_threads = torch.get_num_threads()
    volume_np = make_volume()
    volume = torch.from_numpy(volume_np)[None]
    ref_pairs = 3 if quick else 12
    repeats = 2 if quick else 5
    result: dict = {"workload": {"volume": VOLUME, "view": VIEW, "aug_mode": 3, "num_classes": 5,
                                 "foreground_ratio": 0.7, "block_min": (8, 8, 8), "block_max": (32, 32, 32)},
                    "quick": quick, "target_ratio": TARGET, "device": "cpu", "device_name": cpu_name(),
                    "all_threads": all_threads, "cpu_count": os.cpu_count(),
                    # other processes on a shared machine distort the all-threads numbers most: keep the load
                    "load_average_before": os.getloadavg()}
    try:
        torch.set_num_threads(1)
        result["reference_pairs_per_s"] = reference_pairs_per_s(volume_np, ref_pairs)
        ours = {}
        for batch in (2, 8):
            ours[f"batch{batch}_1thread"] = ours_pairs_per_s(volume, batch, repeats)
        torch.set_num_threads(all_threads)
        for batch in (2, 8):
            ours[f"batch{batch}_{all_threads}threads"] = ours_pairs_per_s(volume, batch, repeats)
    finally:
        torch.set_num_threads(all_threads)
    result["medtransfer_pairs_per_s"] = ours
    result["load_average_after"] = os.getloadavg()
    best_1 = max(ours["batch2_1thread"], ours["batch8_1thread"])
    result["ratio_1thread"] = best_1 / result["reference_pairs_per_s"]
    result["ratio_all_threads"] = max(ours.values()) / result["reference_pairs_per_s"]
    result["meets_target"] = result["ratio_1thread"] >= TARGET
    return result


def print_table(r: dict) -> None:
    print(f"VolF pipeline, {VOLUME} -> 2 x {VIEW} + fuse; {r['device_name']}, {r['cpu_count']} CPUs")
    print(f"{'pipeline':32s} {'pairs/s':>9s} {'vs reference':>13s}")
    ref = r["reference_pairs_per_s"]
    print(f"{'reference (numpy/scipy, 1 thr)':32s} {ref:9.2f} {1.0:12.1f}x")
    for name, v in r["medtransfer_pairs_per_s"].items():
        print(f"{'medtransfer ' + name:32s} {v:9.2f} {v / ref:12.1f}x")
    print(f"load average before/after: {r['load_average_before'][0]:.2f} / {r['load_average_after'][0]:.2f}")
    print(f"ratio (1 thread) {r['ratio_1thread']:.1f}x, all threads {r['ratio_all_threads']:.1f}x; "
          f"target {r['target_ratio']:.0f}x: {'met' if r['meets_target'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few pairs (< 60 s)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "pretext_volf-cpu.json"))
    args = parser.parse_args(argv)
    from medtransfer.provenance import versions
    from medtransfer.weights.io import atomic_write

    result = run(quick=args.quick)
    result["versions"] = versions()
    result["command"] = " ".join(["python", "benchmarks/pretext_volf.py", *sys.argv[1:]])
    print_table(result)
    text = json.dumps(result, indent=2, default=float) + "\n"
    atomic_write(args.out, lambda tmp: tmp.write_text(text))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
