"""Training-loop overhead, data-wait share with the prepared cache, and peak memory.

Sections:

- ``overhead``: time per optimiser step of ``medtransfer.train.loop.fit`` against a bare PyTorch loop (zero_grad,
  forward, loss, backward, step) on the same model, the same initial weights, the same in-memory batches, the same
  loss (``dice_ce``) and optimiser (Adam 1e-3 from ``train.optim.build_optimizer``). Per-step times come from an
  optimizer step post-hook (timestamps of consecutive ``optimizer.step()`` calls), medians over the measured steps
  after the warm-up; the mean from total wall time (setup and the final checkpoint included) is reported too.
  The two loops alternate for ``--rounds`` rounds so that CPU noise hits both. Target: fit overhead < 5 %.
- ``data_wait``: phantom cases prepared into a ``PreparedCache`` (temporary folder), the fine-tuning data path
  (``PatchDataset`` + ``torchdata.make_loader`` with the epoch-seeded sampler), ``fit`` for ``--wait-steps`` steps
  with 0 and 2 loader workers; the share is the loop's own ``data_wait`` from ``metrics.jsonl``, averaged over its
  records weighted by each record's window length. Target: < 10 % of step time.
- peak memory: process max RSS (``getrusage``, as ``benchmarks/zoo.py``) after each section; it only grows.

    python benchmarks/train.py                       # ~2-3 min on 2 cores
    python benchmarks/train.py --model genesis_unet3d --steps 10
    python benchmarks/train.py --profile             # also cProfile fit's steps and print the top costs

Prints a table and writes JSON (default ``benchmarks/results/train-cpu.json``, atomically).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


class _StepClock:
    """Timestamps of every ``optimizer.step()`` (post-hook); per-step times are the differences."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.stamps: list[float] = []
        self.handle = optimizer.register_step_post_hook(lambda *_: self.stamps.append(time.perf_counter()))

    def step_times(self, warmup: int) -> list[float]:
        self.handle.remove()
        diffs = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        return diffs[max(warmup - 1, 0):]  # diffs[i] is step i+1; keep steps >= warmup


def _parts(model_name: str, num_classes: int, lr: float):
    from medtransfer.train.config import OptimConfig, ScheduleConfig
    from medtransfer.train.losses import build_loss
    from medtransfer.train.optim import build_optimizer, build_scheduler

    def make(model: torch.nn.Module):
        optimizer = build_optimizer(model, OptimConfig(name="adam", lr=lr))
        schedule = build_scheduler(optimizer, ScheduleConfig(), steps_per_epoch=None, total_steps=None)
        return optimizer, schedule

    return build_loss("dice_ce", task="segmentation", num_classes=num_classes), make


def bare_loop(model, batches, loss_fn, optimizer, warmup: int) -> dict[str, Any]:
    clock = _StepClock(optimizer)
    model.train()
    t0 = time.perf_counter()
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        logits = model(batch["image"])
        loss = loss_fn(logits, batch["label"])
        loss.backward()
        optimizer.step()
    wall = time.perf_counter() - t0
    times = clock.step_times(warmup)
    return {"median_s": statistics.median(times), "mean_total_s": wall / len(batches), "times": times}


def fit_loop(model, batches, loss_fn, optimizer, schedule, warmup: int, run_dir: Path, seed: int,
             profile: bool = False) -> dict[str, Any]:
    from medtransfer.train.config import TrainConfig
    from medtransfer.train.loop import fit
    from medtransfer.train.metrics import build_metrics

    cfg = TrainConfig(max_epochs=1, max_steps=len(batches), seed=seed)
    metrics = build_metrics("segmentation", num_classes=2)
    clock = _StepClock(optimizer)
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t0 = time.perf_counter()
    fit(model, batches, None, loss_fn=loss_fn, metrics=metrics, optimizer=optimizer, schedule=schedule, cfg=cfg,
        run_dir=run_dir, monitor=("loss", "min"), device="cpu", progress=False)
    wall = time.perf_counter() - t0
    if prof is not None:
        prof.disable()
    times = clock.step_times(warmup)
    return {"median_s": statistics.median(times), "mean_total_s": wall / len(batches), "times": times,
            "profile": prof}


def overhead(args, tmp: Path) -> dict[str, Any]:
    import medtransfer as mt

    torch.manual_seed(args.seed)
    model = mt.create_model(args.model, task="segmentation", num_classes=2)
    init = copy.deepcopy(model.state_dict())
    shape = (args.batch, 1, *args.size)
    g = torch.Generator().manual_seed(args.seed)
    n = args.warmup + args.steps
    batches = [{"image": torch.randn(*shape, generator=g),
                "label": torch.randint(0, 2, (args.batch, *args.size), generator=g),
                "case_id": [f"b{i}_{j}" for j in range(args.batch)]} for i in range(n)]
    loss_fn, make = _parts(args.model, 2, args.lr)
    bare_times, fit_times, bare_wall, fit_wall = [], [], [], []
    for r in range(args.rounds):
        model.load_state_dict(init)
        optimizer, _ = make(model)
        torch.manual_seed(args.seed)
        b = bare_loop(model, batches, loss_fn, optimizer, args.warmup)
        bare_times += b["times"]
        bare_wall.append(b["mean_total_s"])
        model.load_state_dict(init)
        optimizer, schedule = make(model)
        f = fit_loop(model, batches, loss_fn, optimizer, schedule, args.warmup, tmp / f"fit{r}", args.seed)
        fit_times += f["times"]
        fit_wall.append(f["mean_total_s"])
    bare_med, fit_med = statistics.median(bare_times), statistics.median(fit_times)
    bare_mean, fit_mean = statistics.median(bare_wall), statistics.median(fit_wall)
    return {
        "model": args.model,
        "batch": list(shape),
        "loss": "dice_ce",
        "optimizer": f"adam lr={args.lr}",
        "warmup_steps": args.warmup,
        "measured_steps": args.steps,
        "rounds": args.rounds,
        "bare_step_median_s": round(bare_med, 4),
        "fit_step_median_s": round(fit_med, 4),
        "overhead_pct": round(100 * (fit_med - bare_med) / bare_med, 2),
        "bare_step_mean_total_s": round(bare_mean, 4),
        "fit_step_mean_total_s": round(fit_mean, 4),
        "overhead_total_pct": round(100 * (fit_mean - bare_mean) / bare_mean, 2),
        "target_pct": 5.0,
        "peak_rss_mb_after": _rss_mb(),
    }


def profile_fit(args, tmp: Path, top: int = 15) -> list[dict[str, Any]]:
    """cProfile one fit run (same setup as ``overhead``); the top functions by own time, the loop's Python first."""
    import pstats

    import medtransfer as mt

    torch.manual_seed(args.seed)
    model = mt.create_model(args.model, task="segmentation", num_classes=2)
    g = torch.Generator().manual_seed(args.seed)
    batches = [{"image": torch.randn(args.batch, 1, *args.size, generator=g),
                "label": torch.randint(0, 2, (args.batch, *args.size), generator=g), "case_id": ["x"]}
               for _ in range(args.warmup + args.steps)]
    loss_fn, make = _parts(args.model, 2, args.lr)
    optimizer, schedule = make(model)
    f = fit_loop(model, batches, loss_fn, optimizer, schedule, args.warmup, tmp / "profile", args.seed, profile=True)
    stats = pstats.Stats(f["profile"])
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(file).name}:{line}({func})", "calls": nc, "tottime_s": round(tt, 4),
                     "cumtime_s": round(ct, 4)})
    rows.sort(key=lambda r: -r["tottime_s"])
    return rows[:top]


class _TimedLoader:
    """Forwards everything to a loader; adds up the time of ``iter()`` (worker start-up, which the loop's
    ``data_wait`` does not count: it times only ``next()``) and of ``next()``."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader
        self.iter_s = 0.0
        self.next_s = 0.0

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def __iter__(self):
        t0 = time.perf_counter()
        it = iter(self._loader)
        self.iter_s += time.perf_counter() - t0
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                self.next_s += time.perf_counter() - t0
                return
            self.next_s += time.perf_counter() - t0
            yield batch


def data_wait(args, tmp: Path, workers: int) -> dict[str, Any]:
    import medtransfer as mt
    from medtransfer.data.cache import PreparedCache
    from medtransfer.data.datasets import load_dataset
    from medtransfer.data.phantoms import LABELS, write_phantom_dataset
    from medtransfer.data.preprocess import build_pipeline
    from medtransfer.train.config import TrainConfig
    from medtransfer.train.distributed import EpochShuffleSampler
    from medtransfer.train.loop import fit
    from medtransfer.train.metrics import build_metrics
    from medtransfer.train.torchdata import PatchDataset, make_loader

    root = tmp / "phantoms"
    if not (root / "dataset.json").is_file():
        write_phantom_dataset(root, args.cases, args.seed, shape=(32, 32, 32), spacing=(5.0, 5.0, 5.0), with_2d=False)
    cache = PreparedCache(tmp / "cache")
    t0 = time.perf_counter()
    cache.prepare(load_dataset(root), build_pipeline(preset="medicalnet_mri"), workers=1, progress=False)
    prepare_s = time.perf_counter() - t0
    ids = cache.case_ids()
    ds = PatchDataset(cache, ids, args.size, seed=args.seed)
    loader = _TimedLoader(make_loader(ds, batch_size=args.batch, sampler=EpochShuffleSampler(len(ds), seed=args.seed),
                                      workers=workers))
    k = len(LABELS)  # the phantoms' label map classes, as finetune's _num_classes finds them
    torch.manual_seed(args.seed)
    model = mt.create_model(args.model, task="segmentation", num_classes=k)
    loss_fn, make = _parts(args.model, k, args.lr)
    optimizer, schedule = make(model)
    run_dir = tmp / f"wait{workers}"
    cfg = TrainConfig(max_epochs=None, max_steps=args.wait_steps, seed=args.seed)
    t0 = time.perf_counter()
    fit(model, loader, None, loss_fn=loss_fn, metrics=build_metrics("segmentation", num_classes=k),
        optimizer=optimizer, schedule=schedule, cfg=cfg, run_dir=run_dir, monitor=("loss", "min"), device="cpu",
        progress=False)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    prev, weighted, total = 0.0, 0.0, 0.0
    shares = []
    for rec in records:
        span = rec["time"] - prev
        prev = rec["time"]
        weighted += rec["data_wait"] * span
        total += span
        shares.append(round(rec["data_wait"], 4))
    share = weighted / total if total > 0 else 0.0
    return {
        "workers": workers,
        "cases": len(ids),
        "patch": list(args.size),
        "batch_size": args.batch,
        "steps": args.wait_steps,
        "steps_per_epoch": len(loader),
        "prepare_s": round(prepare_s, 3),
        "fit_wall_s": round(wall, 3),
        "step_mean_s": round(wall / args.wait_steps, 4),
        "data_wait_share": round(share, 4),
        "data_wait_per_record": shares,
        "iter_s": round(loader.iter_s, 3),
        "next_s": round(loader.next_s, 3),
        "wait_incl_iter_share": round((loader.iter_s + loader.next_s) / wall, 4),
        "target_share": 0.10,
        "peak_rss_mb_after": _rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="medicalnet_resnet10")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", default="32x32x32", help="D x H x W of a patch")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per loop and round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="bare/fit alternations")
    parser.add_argument("--wait-steps", type=int, default=12, help="fit steps per data-wait run")
    parser.add_argument("--cases", type=int, default=8, help="phantom cases in the cache")
    parser.add_argument("--workers", default="0,2", help="loader workers to try, comma-separated")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="cProfile one fit run and print the top costs")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.size = tuple(int(s) for s in args.size.split("x"))

    from medtransfer.provenance import cpu_name, versions
    from medtransfer.weights.io import atomic_write

    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mt-bench-train-") as tmpdir:
        tmp = Path(tmpdir)
        ov = overhead(args, tmp)
        results["overhead"] = ov
        print(f"{'loop':10s} {'step median s':>14s} {'step mean (wall) s':>19s}")
        print(f"{'bare':10s} {ov['bare_step_median_s']:14.4f} {ov['bare_step_mean_total_s']:19.4f}")
        print(f"{'fit':10s} {ov['fit_step_median_s']:14.4f} {ov['fit_step_mean_total_s']:19.4f}")
        met = "met" if ov["overhead_pct"] < 5 else "MISSED"
        print(f"overhead: {ov['overhead_pct']:+.2f} % (median), {ov['overhead_total_pct']:+.2f} % (wall, incl. "
              f"setup + final checkpoint); target < 5 %: {met}")
        print(f"model {ov['model']}, batch {'x'.join(map(str, ov['batch']))}, {args.warmup}+{args.steps} steps x "
              f"{args.rounds} rounds, peak RSS {ov['peak_rss_mb_after']:.0f} MB")

        waits = []
        print(f"\n{'workers':>7s} {'cases':>5s} {'steps':>5s} {'step mean s':>12s} {'data wait':>10s} {'+iter()':>8s} {'per record':>24s}")
        for w in (int(x) for x in args.workers.split(",") if x.strip()):
            r = data_wait(args, tmp, w)
            waits.append(r)
            per = ",".join(f"{s:.1%}" for s in r["data_wait_per_record"])
            print(f"{w:7d} {r['cases']:5d} {r['steps']:5d} {r['step_mean_s']:12.4f} {r['data_wait_share']:10.1%} "
                  f"{r['wait_incl_iter_share']:8.1%} "
                  f"{per:>24s}")
        results["data_wait"] = waits
        print("data wait: the loop's metrics.jsonl value (time in next()); +iter(): with iterator/worker start-up, "
              "measured outside the loop over the fit wall time")
        print("data-wait target < 10 %: " + ", ".join(
            f"{r['workers']} workers {'met' if r['data_wait_share'] < 0.10 else 'MISSED'}" for r in waits))

        if args.profile:
            top = profile_fit(args, tmp)
            results["profile_fit_top_tottime"] = top
            print(f"\ncProfile of one fit run ({args.warmup + args.steps} steps), top by own time:")
            print(f"{'tottime s':>10s} {'cumtime s':>10s} {'calls':>7s}  function")
            for row in top:
                print(f"{row['tottime_s']:10.4f} {row['cumtime_s']:10.4f} {row['calls']:7d}  {row['function']}")

    results["peak_rss_mb"] = _rss_mb()
    print(f"\npeak memory (process max RSS): {results['peak_rss_mb']:.0f} MB")
    payload = {
        "benchmark": "training loop: fit vs bare PyTorch step time, data-wait share with the cache, peak memory",
        "device": "cpu",
        "device_name": cpu_name(),
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "versions": versions(),
        "command": " ".join(["python", "benchmarks/train.py"] + sys.argv[1:]),
        "results": results,
    }
    out = args.out or Path(__file__).parent / "results" / "train-cpu.json"
    text = json.dumps(payload, indent=2) + "\n"
    atomic_write(out, lambda tmp_path: tmp_path.write_text(text))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
