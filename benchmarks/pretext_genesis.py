"""Models Genesis corruption speed: ``medtransfer.pretext.genesis.corrupt`` against a per-sample loop transcription.

The reference below is written from the algorithm description (spec 3b), in the published style: per sample, a flip
loop, a 10,000-iteration block-shuffling loop (numpy slicing and ``shuffle``), a Bezier curve of 1e5 samples applied
with ``np.interp``, and painting box loops, with Python ``random`` for the scalar draws. Both run on 64x64x32 cubes
in the published (X, Y, Z) layout with the published rates. The reference runs single-threaded; ``corrupt`` is timed
with torch on 1 thread (the fair comparison) and on all threads. Target: ``corrupt`` >= 100x the reference's cubes/s
at batch 6 and larger.

    python benchmarks/pretext_genesis.py           # full run
    python benchmarks/pretext_genesis.py --quick   # < 60 s

Prints a table and writes ``benchmarks/results/pretext_genesis-cpu.json`` atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

CUBE = (64, 64, 32)
TARGET_RATIO = 100.0


# --- reference: loop transcription of the published algorithm (spec 3b) ---------------------------------------

class LoopReference:
    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)

    def flip(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        for _ in range(3):  # axis drawn from the (C, X, Y, Z) array: 0 is the channel (published off-by-one)
            if self.rng.random() >= 0.4:
                break
            axis = self.rng.choice([0, 1, 2])
            x, y = np.flip(x, axis), np.flip(y, axis)
        return x, y

    def shuffle(self, x: np.ndarray) -> np.ndarray:
        if self.rng.random() >= 0.5:
            return x
        source, out = x.copy(), x.copy()
        _, nx, ny, nz = x.shape
        for _ in range(10_000):
            bx, by, bz = (self.rng.randint(1, d // 10) for d in (nx, ny, nz))
            cx, cy, cz = self.rng.randint(0, nx - bx), self.rng.randint(0, ny - by), self.rng.randint(0, nz - bz)
            block = source[0, cx:cx + bx, cy:cy + by, cz:cz + bz].flatten()
            self.np_rng.shuffle(block)
            out[0, cx:cx + bx, cy:cy + by, cz:cz + bz] = block.reshape(bx, by, bz)
        return out

    def nonlinear(self, x: np.ndarray) -> np.ndarray:
        if self.rng.random() >= 0.9:
            return x
        a, b, c, d = (self.rng.random() for _ in range(4))
        t = np.linspace(0.0, 1.0, 100_000)  # runs from (1, 1) at t = 0 to (0, 0) at t = 1
        w1, w2, w3 = 3 * t**2 * (1 - t), 3 * t * (1 - t) ** 2, (1 - t) ** 3
        xs, ys = a * w1 + c * w2 + w3, b * w1 + d * w2 + w3
        if self.rng.random() < 0.5:
            xs = np.sort(xs)  # y left in t order: a decreasing map
        else:
            xs, ys = np.sort(xs), np.sort(ys)
        return np.interp(x, xs, ys)

    def _box(self, dims: tuple[int, ...], outer: bool) -> tuple[slice, ...]:
        if outer:
            sides = [d - self.rng.randint(3 * d // 7, 4 * d // 7) for d in dims]
        else:
            sides = [self.rng.randint(d // 6, d // 3) for d in dims]
        return tuple(slice(c, c + s) for c, s in ((self.rng.randint(3, d - s - 3), s) for d, s in zip(dims, sides)))

    def paint(self, x: np.ndarray) -> np.ndarray:
        if self.rng.random() >= 0.9:
            return x
        dims = x.shape[1:]
        if self.rng.random() < 0.2:
            x = x.copy()
            for _ in range(5):
                if self.rng.random() >= 0.95:
                    break
                box = self._box(dims, outer=False)
                x[(slice(None),) + box] = self.np_rng.random(tuple(s.stop - s.start for s in box))
            return x
        out = self.np_rng.random(x.shape)
        for k in range(5):
            if k and self.rng.random() >= 0.95:
                break
            box = (slice(None),) + self._box(dims, outer=True)
            out[box] = x[box]
        return out

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        targets, inputs = batch.copy(), batch.copy()
        for n in range(batch.shape[0]):
            x, y = self.flip(inputs[n], targets[n])
            targets[n] = y
            x = self.paint(self.nonlinear(self.shuffle(x)))
            inputs[n] = x
        return inputs, targets


# --- timing ----------------------------------------------------------------------------------------------------

def _single_thread_blas() -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")  # numpy's BLAS is not used by the reference, but keep it single-threaded


def time_reference(cubes: int, seed: int = 0) -> float:
    """Cubes per second of the loop reference, one cube at a time (it is per sample anyway)."""
    data = np.random.default_rng(seed).random((cubes, 1, *CUBE))
    ref = LoopReference(seed)
    ref(data[:1])  # warm-up
    start = time.perf_counter()
    ref(data)
    return cubes / (time.perf_counter() - start)


def time_corrupt(batch: int, batches: int, threads: int, seed: int = 0) -> float:
    from medtransfer.pretext.genesis import corrupt

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(seed)
        data = torch.rand((batch, 1, *CUBE), generator=generator)
        corrupt(data, generator)  # warm-up
        start = time.perf_counter()
        for _ in range(batches):
            corrupt(data, generator)
        return batch * batches / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)


STEPS = {  # each corruption step alone, always applied, the others off (all_off: validation and copies only)
    "all_off": dict(flip_rate=0.0, local_rate=0.0, nonlinear_rate=0.0, paint_rate=0.0),
    "flip": dict(flip_rate=1.0, local_rate=0.0, nonlinear_rate=0.0, paint_rate=0.0),
    "shuffle": dict(flip_rate=0.0, local_rate=1.0, nonlinear_rate=0.0, paint_rate=0.0),
    "nonlinear": dict(flip_rate=0.0, local_rate=0.0, nonlinear_rate=1.0, paint_rate=0.0),
    "paint": dict(flip_rate=0.0, local_rate=0.0, nonlinear_rate=0.0, paint_rate=1.0),
    "default": {},
}


def time_steps(batch: int, repeats: int, seed: int = 0) -> dict[str, float]:
    """Milliseconds per cube of each step alone (1 thread, best of ``repeats`` calls: a profile, not a rate)."""
    from medtransfer.pretext.genesis import corrupt

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(seed)
        data = torch.rand((batch, 1, *CUBE), generator=generator)
        out = {}
        for name, rates in STEPS.items():
            corrupt(data, generator, **rates)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                corrupt(data, generator, **rates)
                best = min(best, time.perf_counter() - start)
            out[name] = best * 1e3 / batch
        return out
    finally:
        torch.set_num_threads(previous)


def run(quick: bool = False) -> dict[str, Any]:
    from medtransfer.provenance import cpu_name

    _single_thread_blas()
    all_threads = torch.get_num_threads()
    ref_cubes = 6 if quick else 32
    reference = time_reference(ref_cubes)
    rows = []
    for batch in (6, 32):
        batches = (3 if batch == 6 else 1) if quick else (10 if batch == 6 else 3)
        one = time_corrupt(batch, batches, 1)
        many = time_corrupt(batch, batches, all_threads)
        rows.append({"batch": batch, "batches": batches, "corrupt_1thread_cubes_per_s": one,
                     "corrupt_all_threads_cubes_per_s": many, "ratio_1thread": one / reference,
                     "ratio_all_threads": many / reference, "meets_target": one / reference >= TARGET_RATIO})
    steps = time_steps(32, 2 if quick else 8)
    return {
        "benchmark": "pretext_genesis", "quick": quick, "cube": list(CUBE), "reference_cubes": ref_cubes,
        "steps_ms_per_cube_1thread_batch32": steps,
        "reference_cubes_per_s": reference, "reference_threads": 1, "target_ratio": TARGET_RATIO, "rows": rows,
        "machine": {"device": "cpu", "cpu": cpu_name(), "torch_threads_all": all_threads,
                    "cpu_count": os.cpu_count(), "torch": torch.__version__, "numpy": np.__version__},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few cubes, < 60 s")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pretext_genesis-cpu.json")
    args = parser.parse_args(argv)
    result = run(quick=args.quick)
    print(f"Models Genesis corruption, {CUBE[0]}x{CUBE[1]}x{CUBE[2]} cubes, {result['machine']['cpu']}")
    print(f"reference loop (1 thread): {result['reference_cubes_per_s']:8.1f} cubes/s")
    print(f"{'batch':>5} {'corrupt 1 thr':>14} {'ratio':>8} {'corrupt all thr':>16} {'ratio':>8}  target {TARGET_RATIO:.0f}x")
    for row in result["rows"]:
        print(f"{row['batch']:>5} {row['corrupt_1thread_cubes_per_s']:>14.1f} {row['ratio_1thread']:>7.1f}x "
              f"{row['corrupt_all_threads_cubes_per_s']:>16.1f} {row['ratio_all_threads']:>7.1f}x  "
              f"{'met' if row['meets_target'] else 'not met'}")
    print("per step, 1 thread, batch 32, ms/cube (step always on, others off; best of repeats): " +
          ", ".join(f"{k} {v:.2f}" for k, v in result["steps_ms_per_cube_1thread_batch32"].items()))
    from medtransfer.weights.io import atomic_write

    text = json.dumps(result, indent=2, default=float)
    atomic_write(args.out, lambda tmp: tmp.write_text(text))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
