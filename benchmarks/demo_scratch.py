"""Scratch's convergence on the demo task, the measurement the demo's design is chosen from (docs/performance.md).

    python benchmarks/demo_scratch.py --steps 120 --lr 3e-3 --fraction 1.0 --seed 0

One fine-tune from scratch with the demo's fine-tune config (``medtransfer.bench.demo.demo_config``) and the given
steps, learning rate, batch size, label fraction and trial seed; prints validation Dice against step (with the
loop's seconds) and the test Dice of the best checkpoint per class. The folder is kept (``--root``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None, help="default: the demo's")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--fraction", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=None, help="folder for the data and the run (default: a new one)")
    args = parser.parse_args(argv)

    from medtransfer.bench.demo import demo_config, write_demo_data
    from medtransfer.bench.grid import finetune_config, load_benchmark_config
    from medtransfer.train.finetune import evaluate, run_finetune
    from medtransfer.train.recipes import merge

    root = args.root or Path(tempfile.mkdtemp(prefix="demo-scratch-"))
    write_demo_data(root)
    cfg = load_benchmark_config(demo_config(root))
    task = cfg.tasks[0]
    cell = {"task": task.name, "init": "scratch", "fraction": args.fraction, "seed": args.seed}
    ft = finetune_config(cfg, cell, False, root)
    name = f"scratch_s{args.steps}_b{args.batch_size}_lr{args.lr}_f{args.fraction:g}_seed{args.seed}"
    ft = merge(ft, {"data": {"batch_size": args.batch_size},
                    "train": {"max_steps": args.steps, "val_every": max(1, args.steps // 10)},
                    "out": str(root / name), **({"optim": {"lr": args.lr}} if args.lr else {})})
    t0 = time.perf_counter()
    run = run_finetune(ft, progress=False, overwrite=True)
    seconds = time.perf_counter() - t0
    metrics = json.loads((evaluate(run, split="test") / "summary.json").read_text())["metrics"]
    curve = []
    for line in (Path(run) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("val") and task.metric in record["val"]:
            curve.append((record["step"], round(record["time"], 1), round(record["val"][task.metric], 3)))
    print("step, seconds, validation " + str(task.metric))
    for point in curve:
        print(*point, sep=", ")
    test = {k: round(v, 3) for k, v in metrics.items() if k.startswith("dice") and isinstance(v, float)}
    print(f"test (best checkpoint): {test}; {seconds:.0f} s for {args.steps} steps ({seconds / args.steps:.2f} s/step "
          f"with setup and validation); run folder {run}")
    return {"curve": curve, "test": test, "seconds": seconds}


if __name__ == "__main__":
    main()
