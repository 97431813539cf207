"""Data-layer speed: cube extraction, cached vs decoded cases, preparing, phantom generation.

Sections (each runs only when the modules it needs exist, else it prints "skipped: module missing"):

- ``cubes``: Models Genesis cube extraction in cubes/s, ``medtransfer.data.cubes`` against a direct loop
  transcription of the published dense-tissue test written below (the official script's per-voxel loop), on the
  same CT-like volume (a 100x512x512 phantom at 2.5x0.7x0.7 mm, LUNA16-like) and the same candidate windows; both
  must accept and reject the same windows. The loop runs over every window a sequential run needs, up to
  ``--loop-candidates``; past that its time is extrapolated from the time per window. Target: vectorised >= 50x.
- ``cache``: preparing cases/s with ``PreparedCache`` (CT window preset), then loading one cached case (np.load
  memmap + copy into a torch tensor) against decoding its source ``.nii.gz`` (target: cached >= 10x faster). The
  cached files sit in the page cache right after preparing, as they do during training.
- ``phantoms``: time to generate one phantom case.

    python benchmarks/data.py                             # all sections, ~1-2 min on 2 cores
    python benchmarks/data.py --sections cubes --loop-candidates 0   # loop over every needed window (slow)

Prints a table and writes JSON (default ``benchmarks/results/data-cpu.json``, atomically).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

CUBE_VOLUME = (100, 512, 512)  # z, y, x: a LUNA16-like grid (the published borders need >= 265 in-plane, >= 96 z)
CUBE_SPACING = (2.5, 0.7, 0.7)
CACHE_VOLUME = (96, 192, 192)


def _have(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


# --- volumes ---------------------------------------------------------------------------------------------------

def synthetic_chest(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """int16 HU: air, an elliptic body, two rounded lungs, a heart low in the mediastinum, vessels and noise; about
    one candidate window in five passes the dense-tissue test with the published config."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    z, y, x = np.ogrid[:nz, :ny, :nx]
    vol = np.full(shape, -1000.0, np.float32)
    vol[np.broadcast_to(((y - ny / 2) / (0.42 * ny)) ** 2 + ((x - nx / 2) / (0.47 * nx)) ** 2 < 1, shape)] = 40
    for cx in (0.28 * nx, 0.72 * nx):
        vol[((y - ny / 2) / (0.34 * ny)) ** 4 + ((x - cx) / (0.21 * nx)) ** 4 + ((z - nz / 2) / (0.7 * nz)) ** 4
            < 1] = -850
    vol[((z - 0.7 * nz) / (0.25 * nz)) ** 2 + ((y - 0.6 * ny) / (0.15 * ny)) ** 2 + ((x - nx / 2) / (0.17 * nx)) ** 2
        < 1] = 40
    for cz, cy, cx in rng.uniform((0, 0, 0), shape, (300, 3)):
        r = rng.uniform(2, 5)
        box = tuple(slice(max(int(c - r), 0), min(int(c + r) + 1, n)) for c, n in zip((cz, cy, cx), shape))
        bz, by, bx = np.ogrid[box]
        sub = vol[box]
        sub[((bz - cz) ** 2 + (by - cy) ** 2 + (bx - cx) ** 2 < r * r) & (sub < -500)] = 30
    return (vol + rng.normal(0, 30, shape)).astype(np.int16)


def ct_volume(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, str]:
    """A phantom when ``medtransfer.data.phantoms`` can make one at this size, else the synthetic chest."""
    if _have("medtransfer.data.phantoms"):
        try:
            from medtransfer.data.phantoms import make_ct_phantom

            return make_ct_phantom(seed, shape=shape, spacing=CUBE_SPACING).image, "medtransfer.data.phantoms"
        except Exception as err:  # a phantom generator still being written must not stop the benchmark
            print(f"  (phantom volume unavailable: {err!r}; using the synthetic chest)")
    return synthetic_chest(shape, seed).astype(np.float32), "synthetic_chest (benchmarks/data.py)"


# --- the published dense-tissue test, one voxel at a time --------------------------------------------------------

def loop_transcription(volume_hu: np.ndarray, corners: np.ndarray, cfg, scale: int) -> tuple[list[bool], float]:
    """The official flow on our [z, y, x] arrays: window the whole volume, then for each candidate crop a window and
    walk every voxel of its first ``cube_depth`` slices through offsets 0..len_depth-1; keep the window unless the
    weight sum is too large. Stops after ``scale`` accepted. Returns the decisions and the normalisation time."""
    t0 = time.perf_counter()
    vol = np.clip(volume_hu.astype(np.float64), cfg.hu_min, cfg.hu_max)
    vol = (vol - cfg.hu_min) / (cfg.hu_max - cfg.hu_min)
    t_norm = time.perf_counter() - t0
    depth, rows, cols, extra = cfg.cube_depth, cfg.cube_height, cfg.cube_width, cfg.len_depth
    limit = cfg.lung_max * cols * rows * depth
    decisions, kept = [], []
    for z0, y0, x0 in corners:
        window = vol[z0 : z0 + depth + extra, y0 : y0 + rows, x0 : x0 + cols]
        offset = np.zeros((depth, rows, cols), dtype=float)
        for d in range(depth):
            for i in range(rows):
                for j in range(cols):
                    for k in range(extra):
                        if window[d + k, i, j] >= cfg.threshold:
                            offset[d, i, j] = k
                            break
                    else:
                        offset[d, i, j] = extra - 1
        weight = 1.0 - offset.astype(np.float32) / (extra - 1)
        accepted = not np.sum(weight) > limit
        decisions.append(accepted)
        if accepted:
            kept.append(window[:depth].astype(np.float32))
            if len(kept) == scale:
                break
    return decisions, t_norm


def bench_cubes(args) -> dict[str, Any]:
    from medtransfer.data.cubes import CubeConfig, candidate_corners, dense_tissue_weight, gather_windows, \
        normalise_hu, sample_cubes

    cfg = CubeConfig()
    t0 = time.perf_counter()
    volume, source = ct_volume(CUBE_VOLUME, seed=0)
    print(f"  volume {volume.shape} {volume.dtype} from {source} ({time.perf_counter() - t0:.1f} s)")
    seed = 1
    t_vec, sample = _median_time(lambda: sample_cubes(volume, np.random.default_rng(seed), config=cfg), args.repeats)

    corners = candidate_corners(volume.shape, np.random.default_rng(seed), cfg)  # the same draws as sample_cubes
    accept = np.concatenate([  # every window's decision, 64 at a time to bound memory
        dense_tissue_weight(normalise_hu(gather_windows(volume, corners[i : i + 64], cfg), cfg), cfg)
        <= cfg.max_dense_weight for i in range(0, len(corners), 64)])
    hits = np.flatnonzero(accept)
    needed = int(hits[cfg.scale - 1]) + 1 if len(hits) >= cfg.scale else len(corners)  # windows a sequential run reads
    timed = needed if args.loop_candidates <= 0 else min(args.loop_candidates, needed)
    t0 = time.perf_counter()
    decisions, t_norm = loop_transcription(volume, corners[:timed], cfg, cfg.scale)
    t_loop_timed = time.perf_counter() - t0 - t_norm
    same = decisions == accept[: len(decisions)].tolist() and np.array_equal(sample.corners, corners[hits[: cfg.scale]])
    per_window_loop = t_loop_timed / len(decisions)
    t_loop = t_norm + per_window_loop * needed
    n = len(sample.cubes)
    result = {
        "volume": list(volume.shape), "spacing_mm": list(CUBE_SPACING), "volume_source": source,
        "config": "published defaults (CubeConfig())",
        "cubes": n, "candidates_needed": needed, "candidates_evaluated_vectorised": sample.evaluated,
        "accept_rate": round(float(accept.mean()), 4),
        "vectorised_s": t_vec, "vectorised_ms_per_window": 1e3 * t_vec / sample.evaluated,
        "loop_windows_timed": len(decisions), "loop_s_per_window": per_window_loop, "loop_normalise_s": t_norm,
        "loop_s": t_loop, "loop_extrapolated": len(decisions) < needed,
        "same_decisions": bool(same),
        "vectorised_cubes_per_s": n / t_vec if n else 0.0, "loop_cubes_per_s": n / t_loop if n else 0.0,
        "speedup": t_loop / t_vec, "target_speedup": 50.0,
    }
    if not same:
        print("  WARNING: the vectorised and loop decisions differ")
    return result


# --- cache -----------------------------------------------------------------------------------------------------

def bench_cache(args) -> dict[str, Any]:
    import torch

    from medtransfer.data.cache import PreparedCache
    from medtransfer.data.io import read_image, write_image
    from medtransfer.data.preprocess import CTWindow, Pipeline
    from medtransfer.data.types import Case, Dataset, Image

    with tempfile.TemporaryDirectory(prefix="medtransfer-bench-") as tmp:
        root = Path(tmp)
        cases = []
        for i in range(args.cases):
            hu = synthetic_chest(CACHE_VOLUME, seed=100 + i)  # int16, as scanners store CT
            path = write_image(Image(hu, (2.5, 1.5, 1.5), (0.0, 0.0, 0.0), np.eye(3)), root / "src" / f"c{i}.nii.gz")
            cases.append(Case(f"c{i}", (path,)))
        dataset = Dataset("bench", root / "src", "folder", "unlabelled", cases)
        cache = PreparedCache(root / "cache")
        pipeline = Pipeline((CTWindow(),))
        t0 = time.perf_counter()
        cache.prepare(dataset, pipeline, workers=args.threads, progress=False)
        t_prepare = time.perf_counter() - t0
        t0 = time.perf_counter()
        cache.prepare(dataset, pipeline, workers=args.threads, progress=False)
        t_again = time.perf_counter() - t0

        def cached() -> torch.Tensor:
            image, _, _ = cache.load("c0")
            return torch.from_numpy(np.array(image))

        def decoded() -> torch.Tensor:
            return torch.from_numpy(np.asarray(read_image(cases[0].images[0]).array, dtype=np.float32))

        def decoded_prepared() -> torch.Tensor:
            return torch.from_numpy(np.asarray(pipeline(read_image(cases[0].images[0])).array, dtype=np.float32))

        t_cached, tensor = _median_time(cached, max(args.repeats, 5))
        t_decoded, _ = _median_time(decoded, args.repeats)
        t_decoded_prepared, _ = _median_time(decoded_prepared, args.repeats)
    return {
        "cases": args.cases, "volume": list(CACHE_VOLUME), "source": "int16 .nii.gz", "pipeline": "CTWindow()",
        "workers": args.threads, "prepare_s": t_prepare, "prepare_cases_per_s": args.cases / t_prepare,
        "prepare_again_s": t_again, "cached_tensor": list(tensor.shape),
        "load_cached_s": t_cached, "decode_nii_gz_s": t_decoded, "decode_and_preprocess_s": t_decoded_prepared,
        "cached_speedup_vs_decode": t_decoded / t_cached, "target_speedup": 10.0,
    }


# --- phantoms --------------------------------------------------------------------------------------------------

def bench_phantoms(args) -> dict[str, Any]:
    from medtransfer.data.phantoms import make_ct_phantom

    out: dict[str, Any] = {"sizes": {}}
    for shape in ((64, 64, 64), (128, 128, 128)):
        times = []
        for seed in range(args.phantoms):
            t0 = time.perf_counter()
            make_ct_phantom(seed, shape=shape)
            times.append(time.perf_counter() - t0)
        out["sizes"]["x".join(map(str, shape))] = {
            "cases": len(times), "s_per_case_median": sorted(times)[len(times) // 2], "s_per_case_min": min(times)}
    return out


# --- driver ----------------------------------------------------------------------------------------------------

SECTIONS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "cubes": (("medtransfer.data.cubes",), bench_cubes),
    "cache": (("medtransfer.data.cache", "medtransfer.data.io", "medtransfer.data.preprocess"), bench_cache),
    "phantoms": (("medtransfer.data.phantoms",), bench_phantoms),
}




def _rows(name: str, result: dict[str, Any]) -> list[tuple[str, str]]:
    if name == "cubes":
        return [("cubes vectorised", f"{result['vectorised_cubes_per_s']:.1f} cubes/s "
                                     f"({result['vectorised_ms_per_window']:.2f} ms/window)"),
                ("cubes loop", f"{result['loop_cubes_per_s']:.3f} cubes/s ({result['loop_s_per_window']:.3f} s/window"
                               f"{', extrapolated' if result['loop_extrapolated'] else ''})"),
                ("cubes speed-up", f"{result['speedup']:.0f}x (target 50x), same decisions: "
                                   f"{result['same_decisions']}")]
    if name == "cache":
        return [("prepare", f"{result['prepare_cases_per_s']:.2f} cases/s ({result['workers']} workers); "
                            f"again {result['prepare_again_s']:.2f} s"),
                ("load cached", f"{1e3 * result['load_cached_s']:.1f} ms"),
                ("decode .nii.gz", f"{1e3 * result['decode_nii_gz_s']:.1f} ms "
                                   f"(+ preprocess {1e3 * result['decode_and_preprocess_s']:.1f} ms)"),
                ("cached speed-up", f"{result['cached_speedup_vs_decode']:.0f}x (target 10x)")]
    return [(f"phantom {shape}", f"{r['s_per_case_median']:.2f} s/case") for shape, r in result["sizes"].items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    parser.add_argument("--loop-candidates", type=int, default=200,
                        help="most windows the loop transcription is timed on (0: every window the run needs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", type=int, default=6, help="cases for the cache section")
    parser.add_argument("--phantoms", type=int, default=3, help="phantoms generated per size")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from medtransfer.provenance import cpu_name, versions
    from medtransfer.weights.io import atomic_write

    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    rows: list[tuple[str, str]] = []
    for name in [s.strip() for s in args.sections.split(",") if s.strip()]:
        if name not in SECTIONS:
            parser.error(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
        modules, fn = SECTIONS[name]
        if not _have(*modules):
            print(f"{name}: skipped: module missing ({', '.join(m for m in modules if not _have(m))})")
            results[name] = {"skipped": "module missing"}
            continue
        print(f"{name} ...")
        t0 = time.perf_counter()
        try:
            results[name] = fn(args)
        except Exception as err:  # record it and go on: the other sections still measure something
            print(f"{name}: FAILED: {err!r}")
            results[name] = {"error": repr(err)}
            continue
        results[name]["section_s"] = round(time.perf_counter() - t0, 2)
        rows += _rows(name, results[name])

    width = max((len(k) for k, _ in rows), default=10)
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    payload = {
        "benchmark": "data layer: cube extraction, cached vs decoded cases, preparing, phantoms",
        "device": "cpu", "device_name": cpu_name(), "threads": args.threads, "cpu_count": os.cpu_count(),
        "versions": versions(), "command": " ".join(["python", "benchmarks/data.py", *sys.argv[1:]]),
        "results": results,
    }
    out = args.out or Path(__file__).parent / "results" / "data-cpu.json"
    atomic_write(out, lambda tmp: tmp.write_text(json_dumps(payload)))
    print(f"wrote {out}")


def json_dumps(payload: dict[str, Any]) -> str:
    import json

    return json.dumps(payload, indent=2, default=float)


if __name__ == "__main__":
    main()
