"""Forward+backward time and peak memory of every zoo model at a fixed input.

Each model runs in its own subprocess so that its peak resident memory (CPU) is its own; on CUDA the peak is
``torch.cuda.max_memory_allocated``. Prints a table and writes JSON (default ``benchmarks/results/zoo-<device>.json``).

    python benchmarks/zoo.py                       # all models, CPU
    python benchmarks/zoo.py --models 'medicalnet_resnet1*' --repeats 5
    python benchmarks/zoo.py --device cuda --amp   # GPU, bf16 autocast
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SIZE_3D = (32, 64, 64)
SIZE_2D = (224, 224)


def _nnunet_small_plans() -> dict:
    """Plans of a 5-stage PlainConvUNet (32-320 features, four stride-2 poolings) instead of nnunet's 6-stage,
    31M-parameter default, whose deepest stage would be 1x2x2 voxels at SIZE_3D."""
    import copy

    from medtransfer.zoo.nnunet import DEFAULT_ARCHITECTURE

    arch = copy.deepcopy(DEFAULT_ARCHITECTURE)
    arch["arch_kwargs"].update(n_stages=5, features_per_stage=[32, 64, 128, 256, 320], kernel_sizes=[[3, 3, 3]] * 5,
                               strides=[[1, 1, 1]] + [[2, 2, 2]] * 4, n_conv_per_stage=[2] * 5,
                               n_conv_per_stage_decoder=[2] * 4)
    return {"plans_name": "benchmark", "configurations": {"3d_fullres": {"architecture": arch}}}


# architecture options of models that need them at the benchmark size
BENCH_ARCH = {"nnunet": lambda: {"plans": _nnunet_small_plans(), "configuration": "3d_fullres"}}


def run_one(name: str, size: tuple[int, ...], repeats: int, device: str, amp: bool, threads: int) -> dict:
    import resource

    import torch

    import medtransfer as mt

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    entry = mt.get_entry(name)
    arch = BENCH_ARCH[name]() if name in BENCH_ARCH else {}
    model = mt.create_model(name, task="segmentation", num_classes=2, **arch).to(device).train()
    x = torch.randn(1, entry.default_in_channels, *size, device=device)
    params = sum(p.numel() for p in model.parameters())

    def step() -> None:
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        out.float().mean().backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, kernels
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    if device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
        peak_kind = "cuda_max_memory_allocated"
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        peak_kind = "process_max_rss"
    return {
        "model": name,
        "input": [1, entry.default_in_channels, *size],
        "parameters": params,
        **({"arch": "small plans (benchmarks/zoo.py _nnunet_small_plans)"} if arch else {}),
        "fwd_bwd_median_s": times[len(times) // 2],
        "fwd_bwd_min_s": times[0],
        "repeats": repeats,
        "peak_memory_mb": round(peak_mb, 1),
        "peak_memory_kind": peak_kind,
    }




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="*", help="shell pattern of model names")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--size3d", default="x".join(map(str, SIZE_3D)), help="D x H x W of the 3D input")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one model, print JSON
    args = parser.parse_args()
    size3d = tuple(int(s) for s in args.size3d.split("x"))

    if args.one:
        import medtransfer as mt

        entry = mt.get_entry(args.one)
        size = SIZE_2D if entry.spatial_dims == 2 else size3d
        print(json.dumps(run_one(args.one, size, args.repeats, args.device, args.amp, args.threads)))
        return

    import torch

    import medtransfer as mt
    from medtransfer.provenance import cpu_name, versions

    names = [n for n in mt.list_models() if fnmatch.fnmatchcase(n, args.models)]
    results = []
    print(f"{'model':24s} {'input':>22s} {'params':>9s} {'fwd+bwd s':>10s} {'peak MB':>9s}")
    for name in names:
        cmd = [sys.executable, __file__, "--one", name, "--repeats", str(args.repeats), "--device", args.device,
               "--threads", str(args.threads), "--size3d", args.size3d] + (["--amp"] if args.amp else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name:24s} FAILED: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
            results.append({"model": name, "error": proc.stderr[-2000:]})
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        shape = "x".join(map(str, r["input"]))
        print(f"{name:24s} {shape:>22s} {r['parameters'] / 1e6:8.2f}M {r['fwd_bwd_median_s']:10.3f} {r['peak_memory_mb']:9.0f}")

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    payload = {
        "benchmark": "zoo forward+backward, batch 1, task segmentation, 2 classes, train mode",
        "device": args.device,
        "device_name": device_name,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "amp_bf16": args.amp,
        "versions": versions(),
        "command": " ".join(["python", "benchmarks/zoo.py"] + sys.argv[1:]),
        "results": results,
    }
    out = args.out or Path(__file__).parent / "results" / f"zoo-{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
