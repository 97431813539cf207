"""``medtransfer demo``: the whole job on the embedded phantoms, in minutes on a laptop CPU.

1. Write two phantom datasets: an unlabelled-use *pool* (12 cases, its labels ignored by the self-supervised methods)
   and a small labelled *task* (12 cases, 7 classes: lung, heart, liver, spine, vessel, lesion and background).
2. Pretrain one small network (FMUNet with 8..128 channels) three ways on the pool: Models Genesis restoration,
   Volume Fusion pseudo-segmentation, and Med3D-style supervised segmentation with its own decoder.
3. Benchmark scratch vs the three initialisations on the task at two label fractions with three trials each (the
   same splits for every initialisation of a trial), scoring Dice on held-out test cases after a fixed, small number
   of fine-tuning steps — at this budget the question is which start learns fastest, which the learning curves show.
4. Print the table (mean ± std, Holm-corrected p-values against scratch) and write ``report.md`` / ``report.html``.

``--quick`` (what the tests run): fewer steps, two initialisations and two trials; it checks the machinery, not the
science. The numbers are whatever the runs give: the report never edits them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

NETWORK = {"name": "fmunet", "arch": {"feature_chns": [8, 16, 32, 64, 128]}}
PHANTOMS = {"shape": (32, 32, 32), "spacing": (5.0, 5.0, 5.0)}


def demo_config(root: Path, *, quick: bool = False) -> dict[str, Any]:
    """The demo's benchmark config, its datasets under ``root / "data"``."""
    pool, task = root / "data" / "pool", root / "data" / "task"
    steps = {"pretrain": 4 if quick else 60, "finetune": 6 if quick else 30, "val_every": 3 if quick else 5}
    pretrain_common = {
        "data": {"paths": [str(pool)], "patch_size": [32, 32, 32], "batch_size": 4, "val_batches": 2,
                 "val_fraction": 0.2},
        "recipe": "none",
        "optim": {"name": "adam", "lr": 1e-3},
        "train": {"max_steps": steps["pretrain"], "max_epochs": None, "val_interval": "step",
                  "val_every": max(1, steps["pretrain"] // 2), "seed": 0},
    }
    inits: list[dict[str, Any]] = [
        {"name": "scratch"},
        {"name": "genesis", "pretrain": {**pretrain_common, "method": "genesis"}},
        {"name": "volf", "pretrain": {**pretrain_common, "method": "volf",
                                      "options": {"block_min": [4, 4, 4], "block_max": [16, 16, 16]}}},
        {"name": "med3d", "pretrain": {**pretrain_common, "method": "med3d"}},
    ]
    if quick:
        inits = inits[:2]
    return {
        "name": "demo-quick" if quick else "demo",
        "model": NETWORK,
        "inits": inits,
        "tasks": [{"name": "phantom_seg", "data": str(task), "task": "segmentation", "metric": "dice_mean"}],
        "fractions": [1.0] if quick else [0.3, 1.0],
        "trials": 2 if quick else 3,
        "baseline": "scratch",
        "test_fraction": 0.25,
        "finetune": {
            "data": {"patch_size": [32, 32, 32], "batch_size": 2, "val_fraction": 0.2},
            "optim": {"name": "adam", "lr": 3e-3},
            "train": {"max_steps": steps["finetune"], "max_epochs": None, "val_interval": "step",
                      "val_every": steps["val_every"]},
        },
        "out": str(root),
    }


def write_demo_data(root: Path) -> None:
    """The two phantom datasets (skipped when already complete)."""
    from ..data.phantoms import write_phantom_dataset

    for name, seed in (("pool", 100), ("task", 0)):
        folder = root / "data" / name
        if not (folder / "dataset.json").is_file():
            write_phantom_dataset(folder, 12, seed, with_2d=False, **PHANTOMS)


def run_demo(out: Path = Path("runs/demo"), *, quick: bool = False, progress: bool = True,
             echo=print) -> tuple[Path, str]:
    """Run the demo into ``out``; returns (grid folder, printed table). Resumes a partial demo in the same folder."""
    import platform
    import time

    from .. import provenance
    from .grid import load_benchmark_config, run_benchmark
    from .report import format_table, results_table, write_report
    from .store import ResultStore

    out = Path(out)
    t0 = time.perf_counter()
    echo(f"medtransfer demo{' --quick' if quick else ''}: writing phantom datasets into {out / 'data'}")
    write_demo_data(out)
    cfg = load_benchmark_config(demo_config(out, quick=quick))
    n = len(cfg.inits) * len(cfg.fractions) * cfg.trials
    echo(f"pretraining {len(cfg.inits) - 1} initialisation(s) on the pool, then {n} fine-tunes "
         f"({len(cfg.inits)} inits x {len(cfg.fractions)} label fractions x {cfg.trials} trials)")
    run_benchmark(cfg, progress=progress, echo=None if progress else echo)
    with ResultStore(out / "store.sqlite") as store:
        rows = store.rows()
    meta = {"command": f"medtransfer demo{' --quick' if quick else ''}", "machine": provenance.cpu_name(),
            "platform": platform.platform(), "minutes": round((time.perf_counter() - t0) / 60, 2),
            **provenance.versions()}
    md, html = write_report(out, rows, baseline=cfg.baseline, title=f"medtransfer {cfg.name}", meta=meta)
    table = format_table(results_table(rows, baseline=cfg.baseline))
    echo(table)
    echo(f"report: {md}\n        {html}\n(took {meta['minutes']} min)")
    return out, table
