"""What the runs' ``metrics.jsonl`` say about convergence: learning curves (validation metric per step, mean and
std over seeds) and how fast each start reaches the baseline's final validation value (steps and wall seconds), as
the seed papers claim it. Read from the logs of the store's done rows; the report (:mod:`.report`) lays them out.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

CONVERGENCE_NOTE = (
    "Steps (and wall seconds of the training loop) until a run's validation metric first reaches the final "
    "validation value of {baseline}'s run with the same seed and label fraction; mean over the seeds that reached "
    "it (reached = how many did), \"never\" when none did. Validation is logged every few steps, so the steps are "
    "rounded up to the next validation."
)


def learning_curves(rows: list[dict]) -> dict[tuple[str, float], dict[str, list[tuple[int, float, float]]]]:
    """(task, fraction) -> init -> [(step, mean, std over seeds)] of each done run's validation metric.

    Reads ``run_dir/metrics.jsonl`` of every row with status "done" and takes ``val[row["metric_name"]]`` from each
    record (records without it are skipped; a step logged twice by a resumed run counts once, the last time). The
    std is the sample std over the seeds that logged that step (0.0 for one). Missing logs are skipped: write_report
    lists them as notes.
    """
    return _collect_curves(rows)[0]


def convergence(rows: list[dict], *, baseline: str = "scratch") -> list[dict]:
    """How fast each start reaches the baseline's final validation metric, as the seed papers measure it.

    For every done run, the target is the last validation value logged by the baseline's run of the same task,
    fraction and seed (its final value, not its best); the run's first logged step whose validation metric reaches
    it (>= when higher is better, else <=) gives ``steps`` and ``seconds`` (the log's ``time``: seconds since the
    training loop started, validation included; a resumed run counts from its restart). One entry per (task,
    fraction, init) with seeds that have both logs, sorted like :func:`results_table`: task, fraction, init,
    metric_name, n (seeds compared), reached (seeds that reached the target), target (mean of the targets),
    steps_mean / seconds_mean (over the seeds that reached it; None when none did: "never"), final_step_mean (the
    runs' last logged step), trials (per seed: seed, target, steps, seconds; None for never).
    """
    logs: dict[tuple[str, float, str, int], dict[int, tuple[float, float | None]]] = {}
    meta: dict[str, tuple[str, bool]] = {}
    for row in rows:
        if row.get("status") != "done" or not row.get("run_dir"):
            continue
        log = Path(row["run_dir"]) / "metrics.jsonl"
        if not log.is_file():
            continue
        by_step = _read_validation(log, row["metric_name"], [])
        if by_step:
            logs[(row["task"], float(row["fraction"]), row["init"], int(row["seed"]))] = by_step
            meta[row["task"]] = (row["metric_name"], bool(row["higher_is_better"]))
    grouped: dict[tuple[str, float, str], list[dict]] = defaultdict(list)
    for (task, fraction, init, seed), by_step in sorted(logs.items()):
        reference = logs.get((task, fraction, baseline, seed))
        if reference is None:
            continue
        target = reference[max(reference)][0]
        better = meta[task][1]
        hit = next((step for step in sorted(by_step)
                    if (by_step[step][0] >= target if better else by_step[step][0] <= target)), None)
        grouped[(task, fraction, init)].append({
            "seed": seed, "target": target, "steps": hit, "seconds": None if hit is None else by_step[hit][1],
            "final_step": max(by_step)})
    entries = []
    for (task, fraction, init), trials in grouped.items():
        reached = [t for t in trials if t["steps"] is not None]
        seconds = [t["seconds"] for t in reached if t["seconds"] is not None]
        entries.append({
            "task": task, "fraction": fraction, "init": init, "metric_name": meta[task][0], "n": len(trials),
            "reached": len(reached), "target": float(np.mean([t["target"] for t in trials])),
            "steps_mean": float(np.mean([t["steps"] for t in reached])) if reached else None,
            "seconds_mean": float(np.mean(seconds)) if seconds else None,
            "final_step_mean": float(np.mean([t["final_step"] for t in trials])),
            "trials": [{k: t[k] for k in ("seed", "target", "steps", "seconds")} for t in trials]})
    return sorted(entries, key=lambda e: (e["task"], e["fraction"], e["init"] != baseline, e["init"]))


def _collect_curves(rows: list[dict]) -> tuple[dict, list[str]]:
    """The curves plus notes on logs that could not be used (missing file, unreadable lines): notes, not errors,
    because a report of the test metrics is still worth having when a run folder was moved or pruned."""
    values: dict[tuple[str, float], dict[str, dict[int, list[float]]]] = defaultdict(dict)
    notes: list[str] = []
    for row in rows:
        if row.get("status") != "done":
            continue
        log = Path(row["run_dir"]) / "metrics.jsonl" if row.get("run_dir") else None
        if log is None or not log.is_file():
            notes.append(f"{_run_label(row)}: no metrics.jsonl in run folder {row.get('run_dir')!r}")
            continue
        by_step = _read_validation(log, row["metric_name"], notes)
        if not by_step:
            notes.append(f"{_run_label(row)}: no validation {row['metric_name']!r} in {log}")
        for step, (value, _) in by_step.items():
            per_step = values[(row["task"], float(row["fraction"]))].setdefault(row["init"], defaultdict(list))
            per_step[step].append(value)
    return {key: {init: [(step, float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
                         for step, v in sorted(values[key][init].items())]
                  for init in sorted(values[key])}
            for key in sorted(values)}, notes


def _read_validation(log: Path, metric_name: str, notes: list[str]) -> dict[int, tuple[float, float | None]]:
    """step -> (validation metric, seconds since the loop started) of one run's log."""
    by_step: dict[int, tuple[float, float | None]] = {}
    bad = 0
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        notes.append(f"{log}: cannot be read ({exc})")
        return by_step
    for line in filter(str.strip, lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill; the rest of the log is still good
            record, bad = None, bad + 1
        val = record.get("val") if isinstance(record, dict) else None
        value = val.get(metric_name) if isinstance(val, dict) else None
        if isinstance(value, (int, float)) and math.isfinite(value) and "step" in record:
            seconds = record.get("time")
            # a resumed run re-logs steps: the last record wins
            by_step[int(record["step"])] = (float(value), float(seconds) if _finite(seconds) else None)
    if bad:
        notes.append(f"{log}: skipped {bad} unreadable line(s)")
    return by_step


def _run_label(row: dict) -> str:
    return f"{row.get('task')}/{row.get('init')}/fraction {row.get('fraction')}/seed {row.get('seed')}"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
