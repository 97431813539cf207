"""Pretext transform speed: Models Genesis corruption and Volume Fusion crop+fuse against loop transcriptions of the
published algorithms, and (with CUDA) the corruption's share of a UNet3D training step.

Sections:

- ``genesis`` (benchmarks/pretext_genesis.py): cubes/s of ``medtransfer.pretext.genesis.corrupt`` against a
  per-cube numpy loop transcription of the published transformations, 64x64x32 cubes, batch 6 and 32.
  Target: >= 100x on the same CPU.
- ``volf`` (benchmarks/pretext_volf.py): pairs/s of ``crop_two_views`` + ``fuse`` (96^3 views from a 160^3 volume)
  against the per-sample scipy-zoom pipeline with Python block loops. Target: >= 20x.
- ``gpu`` (CUDA only): time of ``corrupt`` on a (6, 1, 64, 64, 32) batch on the GPU against one genesis_unet3d
  training step (forward, MSE, backward, SGD) on the same batch. Target: < 5%.

    python benchmarks/pretext.py            # all sections, a few minutes on 2 cores
    python benchmarks/pretext.py --quick    # fewer repetitions (what CI could afford)

Prints a table and writes JSON (default ``benchmarks/results/pretext-cpu.json``, or ``pretext-gpu.json`` with CUDA),
atomically.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent


def _section(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", HERE / f"pretext_{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _gpu(quick: bool) -> dict[str, Any]:
    import medtransfer as mt
    from medtransfer.pretext.genesis import RestorationLoss, corrupt

    device = torch.device("cuda")
    batch = torch.rand(6, 1, 64, 64, 32, device=device)
    model = mt.create_model("genesis_unet3d", task="segmentation", num_classes=1).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = RestorationLoss()
    reps = 10 if quick else 50

    def step() -> None:
        x, y = corrupt(batch)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps

    t_corrupt = timed(lambda: corrupt(batch))
    t_step = timed(step)
    return {"device": torch.cuda.get_device_name(0), "batch": [6, 1, 64, 64, 32], "corrupt_ms": t_corrupt * 1e3,
            "train_step_ms": t_step * 1e3, "share": t_corrupt / t_step, "target_share": 0.05,
            "meets_target": t_corrupt / t_step < 0.05}


def _print_section(name: str, r: dict[str, Any]) -> None:
    if name == "genesis":
        print(f"reference (published loop, 1 thread): {r['reference_cubes_per_s']:.1f} cubes/s "
              f"({'x'.join(map(str, r['cube']))} cubes)")
        print(f"{'batch':>6} {'1 thread':>12} {'ratio':>7} {'all threads':>12} {'ratio':>7}  (target {r['target_ratio']:.0f}x)")
        for row in r["rows"]:
            print(f"{row['batch']:>6} {row['corrupt_1thread_cubes_per_s']:>12.1f} {row['ratio_1thread']:>6.1f}x "
                  f"{row['corrupt_all_threads_cubes_per_s']:>12.1f} {row['ratio_all_threads']:>6.1f}x")
    else:
        print(f"reference (scipy zoom + loops, 1 thread): {r['reference_pairs_per_s']:.2f} pairs/s")
        for key, value in r["medtransfer_pairs_per_s"].items():
            print(f"  {key:<16} {value:8.2f} pairs/s  {value / r['reference_pairs_per_s']:5.1f}x")
        print(f"  ratio 1 thread {r['ratio_1thread']:.1f}x, all threads {r['ratio_all_threads']:.1f}x "
              f"(target {r['target_ratio']:.0f}x)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--sections", default="genesis,volf,gpu", help="comma-separated sections")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    results: dict[str, Any] = {"command": " ".join(["python", "benchmarks/pretext.py", *(argv or sys.argv[1:])])}
    from medtransfer.provenance import cpu_name, versions

    results["machine"] = {"cpu": cpu_name(), "threads": torch.get_num_threads(), **versions()}
    for name in ("genesis", "volf"):
        if name in sections:
            print(f"== {name}", flush=True)
            results[name] = _section(name).run(quick=args.quick)
            _print_section(name, results[name])
    if "gpu" in sections:
        if torch.cuda.is_available():
            results["gpu"] = _gpu(args.quick)
            g = results["gpu"]
            print(f"== gpu: corrupt {g['corrupt_ms']:.2f} ms, train step {g['train_step_ms']:.2f} ms, "
                  f"share {g['share']:.1%} (target < 5%)")
        else:
            results["gpu"] = "skipped: no CUDA device"
            print("== gpu: skipped (no CUDA device)")
    out = args.out or HERE / "results" / ("pretext-gpu.json" if torch.cuda.is_available() else "pretext-cpu.json")
    from medtransfer.weights.io import atomic_write

    text = json.dumps(results, indent=2, default=str) + "\n"
    atomic_write(out, lambda tmp: tmp.write_text(text))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
