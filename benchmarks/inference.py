"""Whole-scan inference: ``evaluate`` of one CT-sized phantom against one bare forward pass over the same volume.

A run is fine-tuned for one step on small phantoms (``--model``, default genesis_unet3d, patch 16x64x64, spacing
``--spacing``); then ``medtransfer.train.apply.evaluate(run, --data PHANTOM)`` scores one phantom CT of
``--depth`` x 512 x 512 voxels at 2.5 x 0.7 x 0.7 mm (prepared: resampled to the run's spacing, CT window), with
the run's default inference options (whole volume when the activation estimate fits the memory budget). Timed:

- ``forward``: ``model(x)`` under ``torch.no_grad`` on the prepared, divisor-padded volume (the floor);
- ``evaluate_first``: the whole call, including reading and preparing the NIfTI into the evaluation cache;
- ``evaluate_cached``: the same call again (``overwrite=True``), the case now in the cache: network, softmax,
  probabilities back onto the 512x512 grid, metrics on the original label;
- ``windows`` (with ``--windows``): ``evaluate`` with ``memory_gb=0``, i.e. 16x64x64 windows, overlap 0.5, batch 1,
  what evaluate did before it had options.

Target: ``evaluate_cached`` within 2x of ``forward``.

    python benchmarks/inference.py                   # ~2 min on 2 cores (~6 min with --windows)
    python benchmarks/inference.py --depth 32 --windows

Prints a table and writes JSON (default ``benchmarks/results/inference-cpu.json``, atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _timed(fn) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="genesis_unet3d")
    parser.add_argument("--depth", type=int, default=16, help="slices of the 512x512 phantom")
    parser.add_argument("--spacing", default="2.5,1.4,1.4", help="the run's spacing (mm, z,y,x)")
    parser.add_argument("--windows", action="store_true", help="also time 16x64x64 windows, overlap 0.5, batch 1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    spacing = [float(s) for s in args.spacing.split(",")]

    from medtransfer.data.cache import PreparedCache
    from medtransfer.data.phantoms import write_phantom_dataset
    from medtransfer.provenance import cpu_name, versions
    from medtransfer.train.apply import _load_run, evaluate
    from medtransfer.train.config import validate
    from medtransfer.train.finetune import run_finetune
    from medtransfer.train.inference import activation_bytes, memory_budget
    from medtransfer.weights.io import atomic_write

    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"load_average_start": [round(v, 2) for v in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="mt-bench-inference-") as tmpdir:
        tmp = Path(tmpdir)
        small = write_phantom_dataset(tmp / "small", 3, 0, shape=(16, 128, 128), spacing=(2.5, 0.7, 0.7))
        cfg = validate({
            "model": {"name": args.model, "task": "segmentation", "pretrained": False},
            "data": {"path": str(small), "patch_size": [16, 64, 64], "spacing": spacing, "preset": "genesis_ct",
                     "batch_size": 1, "val_fraction": 0.34},
            "train": {"max_epochs": 1, "max_steps": 1, "seed": 0},
            "out": str(tmp / "run"),
        })
        run = run_finetune(cfg, progress=False)
        big, t_write = _timed(lambda: write_phantom_dataset(tmp / "ct", 1, 1, shape=(args.depth, 512, 512),
                                                            spacing=(2.5, 0.7, 0.7)))
        ev, t_first = _timed(lambda: evaluate(run, big))
        _, t_cached = _timed(lambda: evaluate(run, big, overwrite=True))
        summary = json.loads((ev / "summary.json").read_text())

        _, record, model = _load_run(run)
        cache = PreparedCache(ev / "cache")
        image, _, meta = cache.load(cache.case_ids()[0])
        x = torch.from_numpy(np.array(image, dtype=np.float32))[None]
        div = record["divisor"]
        div = list(div) if isinstance(div, (list, tuple)) else [div] * 3
        pad = [p for s, d in zip(reversed(x.shape[2:]), reversed(div)) for p in (0, -(-s // d) * d - s)]
        xp = torch.nn.functional.pad(x, pad)
        with torch.no_grad():
            model(xp[..., :16, :64, :64])  # warm-up
            _, t_forward = _timed(lambda: model(xp))
        need = activation_bytes(model, tuple(x.shape), div)
        budget = memory_budget(None, "cpu")
        results.update({
            "model": args.model, "original_shape": [args.depth, 512, 512], "original_spacing": [2.5, 0.7, 0.7],
            "prepared_shape": list(x.shape[2:]), "prepared_spacing": meta["spacing"],
            "padded_shape": list(xp.shape[2:]),
            "estimated_activation_gb": round(need / 2**30, 2), "memory_budget_gb": round(budget / 2**30, 2),
            "path": "whole" if need <= budget else "windows", "phantom_write_s": round(t_write, 2),
            "forward_s": round(t_forward, 2), "evaluate_first_s": round(t_first, 2),
            "evaluate_cached_s": round(t_cached, 2), "ratio_cached_to_forward": round(t_cached / t_forward, 2),
            "summary_grid": summary["grid"], "dice_mean": summary["metrics"].get("dice_mean"),
        })
        if args.windows:
            _, t_windows = _timed(lambda: evaluate(run, big, overwrite=True, memory_gb=0, batch_size=1))
            results["windows_s"] = round(t_windows, 2)

    results["peak_rss_mb"] = _rss_mb()
    results["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    r = results
    print(f"model {r['model']}: phantom {'x'.join(map(str, r['original_shape']))} at 2.5x0.7x0.7 mm, prepared "
          f"{'x'.join(map(str, r['prepared_shape']))} at {'x'.join(map(str, r['prepared_spacing']))} mm "
          f"(padded {'x'.join(map(str, r['padded_shape']))})")
    print(f"activation estimate {r['estimated_activation_gb']} GiB, budget {r['memory_budget_gb']} GiB -> {r['path']}")
    print(f"{'what':34s} {'seconds':>8s}")
    print(f"{'forward (no_grad, one pass)':34s} {r['forward_s']:8.2f}")
    print(f"{'evaluate, first (prepares cache)':34s} {r['evaluate_first_s']:8.2f}")
    print(f"{'evaluate, cached':34s} {r['evaluate_cached_s']:8.2f}")
    if "windows_s" in r:
        print(f"{'evaluate, 16x64x64 windows, b=1':34s} {r['windows_s']:8.2f}")
    met = "met" if r["ratio_cached_to_forward"] <= 2 else "MISSED"
    print(f"evaluate (cached) / forward: {r['ratio_cached_to_forward']:.2f}x; target <= 2x: {met}")
    print(f"scored on the {r['summary_grid']} grid; peak memory (process max RSS): {r['peak_rss_mb']:.0f} MB")
    print(f"load average (1, 5, 15 min) at start {r['load_average_start']}, at end {r['load_average_end']} on "
          f"{os.cpu_count()} cores")
    payload = {
        "benchmark": "whole-scan inference: evaluate of one 512x512 phantom CT vs one forward pass",
        "device": "cpu",
        "device_name": cpu_name(),
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "versions": versions(),
        "command": " ".join(["python", "benchmarks/inference.py"] + sys.argv[1:]),
        "results": results,
    }
    out = args.out or Path(__file__).parent / "results" / "inference-cpu.json"
    text = json.dumps(payload, indent=2) + "\n"
    atomic_write(out, lambda tmp_path: tmp_path.write_text(text))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
