"""Benchmark report: table values against hand computations, test choice, label efficiency, learning curves, and the
report files (relative figure links that exist, a self-contained HTML page, failures listed with their error)."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from medtransfer.bench.report import _collect_curves, format_table, learning_curves, results_table, write_report

T_975_DF2 = 4.302652729911275  # Student t, 97.5th percentile, 2 degrees of freedom (textbook 4.303)


def row(init: str, fraction: float, seed: int, metric: float | None, *, task: str = "phantom_seg",
        status: str = "done", run_dir: Path | None = None, **extra) -> dict:
    return {
        "run_id": f"{task}-{init}-{fraction:g}-{seed}", "init": init, "task": task, "fraction": fraction,
        "seed": seed, "status": status, "metric_name": extra.pop("metric_name", "dice"),
        "higher_is_better": extra.pop("higher_is_better", True), "metric": metric,
        "metrics": {} if metric is None else {"dice": metric}, "steps": 20, "duration": 1.0,
        "run_dir": None if run_dir is None else str(run_dir), "error": None, "attempts": 1, "shard": None,
        "host": None, "updated": 0.0, **extra,
    }


def write_log(run_dir: Path, lines: list) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


def entry(entries: list[dict], init: str, fraction: float, task: str = "phantom_seg") -> dict:
    (found,) = [e for e in entries if (e["task"], e["init"], e["fraction"]) == (task, init, fraction)]
    return found


# ------------------------------------------------------------------------------------------------ results_table
def test_table_means_stds_and_paired_t_match_hand_values():
    rows = [row("scratch", 1.0, s, v) for s, v in enumerate([0.5, 0.6, 0.7])]
    rows += [row("genesis", 1.0, s, v) for s, v in enumerate([0.6, 0.7, 0.9])]
    entries = results_table(rows)
    assert [(e["init"], e["fraction"]) for e in entries] == [("scratch", 1.0), ("genesis", 1.0)]

    base = entry(entries, "scratch", 1.0)
    assert (base["n"], base["mean"], base["std"]) == (3, pytest.approx(0.6), pytest.approx(0.1))
    half = T_975_DF2 * 0.1 / math.sqrt(3)
    assert (base["ci_low"], base["ci_high"]) == (pytest.approx(0.6 - half), pytest.approx(0.6 + half))
    assert all(base[k] is None for k in ("test", "p", "p_holm", "marker", "effect_size", "mean_diff"))

    pre = entry(entries, "genesis", 1.0)
    assert pre["mean"] == pytest.approx(2.2 / 3)
    assert pre["std"] == pytest.approx(math.sqrt(0.07 / 3))  # squared deviations sum to 0.14/3, over n-1 = 2
    # Same seeds -> paired t on the differences (0.1, 0.1, 0.2): t = 4 with 2 df, p = 1 - t / sqrt(t^2 + 2).
    assert pre["test"] == "paired t"
    assert pre["p"] == pytest.approx(1 - 4 / math.sqrt(18))
    assert pre["p_holm"] == pytest.approx(pre["p"])  # one comparison: nothing to correct
    assert pre["mean_diff"] == pytest.approx(0.4 / 3)
    assert pre["effect_size"] == pytest.approx((0.4 / 3) / math.sqrt(1 / 300))  # Cohen's d_z = mean / sd of diffs
    assert pre["marker"] == ""  # p = 0.057


def test_welch_when_seeds_differ_and_runs_not_done_are_ignored():
    rows = [row("scratch", 1.0, s, v) for s, v in enumerate([0.5, 0.6, 0.7])]
    rows += [row("genesis", 1.0, s, v) for s, v in zip([10, 11, 12], [0.6, 0.7, 0.9])]
    rows += [row("genesis", 1.0, 13, None, status="failed"), row("genesis", 1.0, 14, None, status="pending")]
    pre = entry(results_table(rows), "genesis", 1.0)
    assert (pre["test"], pre["n"]) == ("welch t", 3)
    # Welch: se^2 = 0.01/3 + 0.07/9, t = (0.4/3) / se, df by Welch-Satterthwaite.
    va, vb = 0.07 / 9, 0.01 / 3
    t = (0.4 / 3) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    from scipy.stats import t as student_t

    assert pre["p"] == pytest.approx(2 * student_t.sf(t, df))


def test_clearly_better_init_gets_markers_and_holm_adjusts_across_inits():
    noise = [0.001, -0.002, 0.003, 0.0, -0.001]
    rows = [row("scratch", 0.5, s, 0.6 + 0.01 * s) for s in range(5)]
    rows += [row("genesis", 0.5, s, 0.8 + 0.01 * s + noise[s]) for s in range(5)]
    rows += [row("volf", 0.5, s, 0.6 + 0.01 * s + noise[::-1][s] * 5) for s in range(5)]
    entries = results_table(rows)
    better, same = entry(entries, "genesis", 0.5), entry(entries, "volf", 0.5)
    assert better["test"] == same["test"] == "paired t"
    assert better["marker"] == "***" and better["p_holm"] < 1e-4
    assert same["marker"] == "" and same["p_holm"] > 0.05
    assert better["p_holm"] == pytest.approx(2 * better["p"])  # the smaller of m = 2 p-values, times 2
    assert same["p_holm"] == pytest.approx(max(same["p"], 2 * better["p"]))
    assert better["mean_diff"] == pytest.approx(0.2 + sum(noise) / 5)
    table = format_table(entries)
    assert "| genesis | 0.820 ± 0.016 *** (n=5) |" in table
    assert "| scratch | 0.620 ± 0.016 (n=5) |" in table


def test_label_efficiency_interpolates_to_the_baseline_at_full_labels():
    means = {"scratch": [0.5, 0.6, 0.7], "genesis": [0.6, 0.8, 0.9], "random": [0.1, 0.2, 0.3]}
    rows = [row(init, f, s, m + d) for init, ms in means.items() for f, m in zip([0.25, 0.5, 1.0], ms)
            for s, d in [(0, -0.01), (1, 0.01)]]
    rows += [row("scratch", 0.5, s, 0.4, task="no_full") for s in range(2)]  # no baseline at 100% on this task
    rows += [row(init, f, s, m + d, task="loss_task", metric_name="loss", higher_is_better=False)
             for init, f, m in [("scratch", 0.5, 0.5), ("scratch", 1.0, 0.3), ("genesis", 0.5, 0.2)]
             for s, d in [(0, -0.01), (1, 0.01)]]
    entries = results_table(rows)
    # genesis crosses 0.7 between 25% (0.6) and 50% (0.8): 0.25 + 0.1 / 0.2 * 0.25
    genesis = [e["label_efficiency"] for e in entries if (e["task"], e["init"]) == ("phantom_seg", "genesis")]
    assert genesis == [pytest.approx(0.375)] * 3
    assert entry(entries, "scratch", 0.25)["label_efficiency"] == pytest.approx(1.0)
    assert entry(entries, "random", 1.0)["label_efficiency"] is None
    assert entry(entries, "scratch", 0.5, task="no_full")["label_efficiency"] is None
    table = format_table(entries)
    assert re.search(r"\| genesis \|.*\| 37.5% \|", table)
    assert re.search(r"\| random \|.*\| not reached \|", table)
    assert "| scratch | 0.400 ± 0.000 (n=2) | — |" in table
    # lower is better: genesis already beats scratch's 100% loss at its smallest fraction, an upper bound
    assert entry(entries, "genesis", 0.5, task="loss_task")["label_efficiency"] == 0.5
    assert "Test loss (lower is better)" in table and "| genesis | 0.200 ± 0.014 (n=2) | — | ≤ 50% |" in table


def test_bad_rows_raise_clear_errors():
    with pytest.raises(ValueError, match="rows is empty"):
        results_table([])
    with pytest.raises(ValueError, match="two finished runs of task='phantom_seg' init='scratch' fraction=1 seed=0"):
        results_table([row("scratch", 1.0, 0, 0.5), row("scratch", 1.0, 0, 0.6)])
    with pytest.raises(ValueError, match="mixes primary metrics"):
        results_table([row("scratch", 1.0, 0, 0.5), row("genesis", 1.0, 0, 0.5, metric_name="auc")])
    assert results_table([row("scratch", 1.0, 0, None, status="failed")]) == []
    assert "No finished runs" in format_table([])


# ------------------------------------------------------------------------------------------------ learning curves
def test_learning_curves_average_over_seeds_per_step(tmp_path):
    first = write_log(tmp_path / "a", [
        {"step": 10, "val": {"loss": 1.0, "dice": 0.2}}, {"step": 15, "val": None},
        {"step": 20, "val": {"loss": 0.5, "dice": 0.4}},
    ])
    second = write_log(tmp_path / "b", [
        {"step": 10, "val": {"loss": 0.9, "dice": 0.1}}, {"step": 20, "val": {"loss": 0.5}},
        {"step": 10, "val": {"loss": 0.9, "dice": 0.4}},  # a resumed run re-logs step 10: the last record counts
        {"step": 20, "val": {"dice": 0.6}}, '{"step": 30, "val": {"di',  # cut short by a kill
    ])
    rows = [row("scratch", 0.5, 0, 0.5, run_dir=first), row("scratch", 0.5, 1, 0.5, run_dir=second),
            row("scratch", 0.5, 2, 0.5, run_dir=tmp_path / "gone"), row("scratch", 0.5, 3, 0.5),
            row("genesis", 0.5, 0, None, status="failed", run_dir=first),
            row("genesis", 0.5, 1, 0.5, run_dir=write_log(tmp_path / "c", [{"step": 10, "val": {"loss": 0.3}}]))]
    curves = learning_curves(rows)
    assert list(curves) == [("phantom_seg", 0.5)] and list(curves[("phantom_seg", 0.5)]) == ["scratch"]
    points = curves[("phantom_seg", 0.5)]["scratch"]
    assert [p[0] for p in points] == [10, 20]
    assert [p[1] for p in points] == [pytest.approx(0.3), pytest.approx(0.5)]
    assert [p[2] for p in points] == [pytest.approx(math.sqrt(0.02))] * 2  # sd of two values 0.1 apart from mean
    notes = _collect_curves(rows)[1]  # what write_report lists under "Notes"
    assert len(notes) == 4 and "skipped 1 unreadable line" in notes[0] and "no validation 'dice'" in notes[3]
    assert "phantom_seg/scratch/fraction 0.5/seed 2: no metrics.jsonl in run folder" in notes[1]


# ------------------------------------------------------------------------------------------------ report files
@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    rows = []
    for init, shift in [("scratch", 0.0), ("genesis", 0.2)]:
        for fraction in (0.1, 1.0):
            for seed in range(3):
                run_dir = write_log(root / "runs" / f"{init}-{fraction}-{seed}", [
                    {"step": step, "val": {"dice": 0.3 + shift + step / 100 + 0.01 * seed}} for step in (5, 10)])
                noise = 0.002 * (seed - 1) * (init == "genesis")  # paired differences must vary for a t-test
                rows.append(row(init, fraction, seed, 0.5 + shift + 0.2 * fraction + 0.01 * seed + noise,
                                run_dir=run_dir))
    rows.append(row("genesis", 1.0, 7, None, status="failed",
                    error='Traceback (most recent call last):\n  File "loop.py"\nRuntimeError: out of memory | 2 GiB'))
    rows.append(row("genesis", 0.1, 8, None, status="pending"))
    out = root / "report"
    md, page = write_report(out, rows, meta={"config": "grid.yaml", "git commit": "abc1234"})
    return out, md, page, rows


def test_report_md_holds_the_table_and_relative_figure_links_that_exist(report):
    out, md, page, rows = report
    assert (md, page) == (out / "report.md", out / "report.html")
    text = md.read_text()
    assert text.startswith("# medtransfer benchmark\n") and "- config: grid.yaml" in text
    assert format_table(results_table(rows)).split("\n", 2)[2] in text  # the same tables, under the task heading
    assert "* p<0.05, ** p<0.01, *** p<0.0001 after Holm correction" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == sorted(f"figures/{name}.png" for name in [
        "bars_phantom_seg", "efficiency_phantom_seg", "curves_phantom_seg_0.1", "curves_phantom_seg_1"])
    for link in links:
        assert (out / link).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporary files behind


def test_report_html_is_self_contained(report):
    out, md, page, rows = report
    text = page.read_text()
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert {base64.b64decode(s.split(",", 1)[1]) for s in sources} == {p.read_bytes() for p in out.glob("figures/*")}
    without_images = re.sub(r'src="data:[^"]*"', "", text)
    assert "http" not in without_images and "<link" not in without_images and "<script" not in without_images
    assert "<table>" in text and "<th>init</th>" in text and "<td>0.730 ± 0.012 *** (n=3)</td>" in text


def test_report_lists_failed_and_pending_runs_with_their_error(report):
    out, md, page, rows = report
    text = md.read_text()
    section = text.split("## Runs not in the table", 1)[1]
    assert "| failed | 1 |" in section and "| pending | 1 |" in section
    failure = "| phantom_seg-genesis-1-7 | phantom_seg | genesis | 100% | 7 | 1 | RuntimeError: out of memory \\| 2 GiB"
    assert failure in section
    assert 'File "loop.py"' in section  # the full traceback follows the table
    assert "RuntimeError: out of memory | 2 GiB" in page.read_text()


def test_report_of_no_rows_is_an_error_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="rows is empty.*medtransfer benchmark CONFIG"):
        write_report(tmp_path / "out", [])
    assert not (tmp_path / "out").exists()
    # Only failures so far: still a report, listing them, without a table or figures.
    md, _ = write_report(tmp_path / "out", [row("scratch", 1.0, 0, None, status="failed", error="ValueError: bad")])
    text = md.read_text()
    assert "No run has finished" in text and "| failed | 1 |" in text and "ValueError: bad |" in text
    assert not (tmp_path / "out" / "figures").exists()


# ------------------------------------------------------------------------------------------------ speed and power
def test_convergence_steps_and_seconds_to_the_baselines_final_validation(tmp_path):
    from medtransfer.bench.report import convergence, format_convergence

    def log(name, points):
        return write_log(tmp_path / name, [{"step": s, "time": t, "val": {"dice": v}} for s, t, v in points])

    rows = [
        # scratch ends at 0.6 (seed 0; its best 0.65 at step 20 does not count) and 0.5 (seed 1)
        row("scratch", 1.0, 0, 0.6, run_dir=log("s0", [(10, 5.0, 0.3), (20, 10.0, 0.65), (30, 15.0, 0.6)])),
        row("scratch", 1.0, 1, 0.5, run_dir=log("s1", [(10, 5.5, 0.2), (20, 11.0, 0.4), (30, 16.0, 0.5)])),
        row("genesis", 1.0, 0, 0.7, run_dir=log("g0", [(10, 6.0, 0.61), (20, 12.0, 0.7), (30, 18.0, 0.7)])),
        row("genesis", 1.0, 1, 0.6, run_dir=log("g1", [(10, 6.5, 0.3), (20, 13.0, 0.55), (30, 19.0, 0.6)])),
        row("volf", 1.0, 0, 0.4, run_dir=log("v0", [(10, 6.0, 0.3), (20, 12.0, 0.4), (30, 18.0, 0.45)])),
        row("volf", 1.0, 1, 0.4, run_dir=log("v1", [(10, 6.0, 0.3), (20, 12.0, 0.4), (30, 18.0, 0.45)])),
        row("med3d", 1.0, 5, 0.4, run_dir=log("m5", [(10, 6.0, 0.9)])),  # no scratch run with seed 5: left out
    ]
    speed = {e["init"]: e for e in convergence(rows)}
    assert list(speed) == ["scratch", "genesis", "volf"]
    scratch, genesis, volf = speed["scratch"], speed["genesis"], speed["volf"]
    assert scratch["target"] == pytest.approx(0.55) and (scratch["n"], scratch["reached"]) == (2, 2)
    assert scratch["steps_mean"] == 25.0 and scratch["seconds_mean"] == pytest.approx(13.0)  # 20 (seed 0), 30
    assert genesis["steps_mean"] == 15.0 and genesis["seconds_mean"] == pytest.approx(9.5)  # 10 and 20 (0.55 >= 0.5)
    assert [t["steps"] for t in genesis["trials"]] == [10, 20]
    assert volf["reached"] == 0 and volf["steps_mean"] is None and volf["seconds_mean"] is None
    text = format_convergence(convergence(rows))
    assert "| phantom_seg | 100% | volf | 0.550 | 0/2 | never | never | 30 |" in text
    assert "| phantom_seg | 100% | genesis | 0.550 | 2/2 | 15 | 10 | 30 |" in text


def test_detectable_effect_per_comparison_and_per_fraction():
    from scipy import stats as sps

    from medtransfer.bench.report import detectable_effects, format_detectable

    base = [0.50, 0.60, 0.55, 0.58]
    plus = {"genesis": [0.10, 0.02, 0.15, 0.03], "volf": [0.01, -0.02, 0.03, 0.00]}
    rows = [row("scratch", 1.0, s, v) for s, v in enumerate(base)]
    rows += [row(init, 1.0, s, v + d) for init, ds in plus.items() for s, (v, d) in enumerate(zip(base, ds))]
    entries = results_table(rows)
    t = sps.t.ppf(1 - 0.05 / 4, 3) + sps.t.ppf(0.8, 3)  # m = 2 comparisons, n = 4 pairs
    sds = {init: float(np.std(ds, ddof=1)) for init, ds in plus.items()}
    for init, sd in sds.items():
        assert entry(entries, init, 1.0)["detectable"] == pytest.approx(t * sd / 2)
    (effect,) = detectable_effects(entries)
    pooled = math.sqrt((sds["genesis"] ** 2 + sds["volf"] ** 2) / 2)
    assert (effect["n"], effect["m"]) == (4, 2) and effect["sd"] == pytest.approx(pooled)
    assert effect["detectable"] == pytest.approx(t * pooled / 2)
    line = format_detectable([effect])
    assert f"is {effect['detectable']:.3f}" in line and "n=4 paired trials and m=2" in line
    table = format_table(entries)
    assert "detectable Δ (80%)" in table and f"{t * sds['genesis'] / 2:.3f}" in table and "n=4 paired" in table


def test_report_has_the_convergence_section_and_the_detectable_effect(report):
    out, md, page, rows = report
    text = md.read_text()
    # genesis logs 0.2 above scratch from step 5 on, so it reaches scratch's final value at the first validation
    assert "### Convergence speed" in text
    assert "| phantom_seg | 10% | genesis | 0.410 | 3/3 | 5 | n/a | 10 |" in text  # the logs hold no time
    assert "| phantom_seg | 10% | scratch | 0.410 | 3/3 | 10 | n/a | 10 |" in text
    assert "phantom_seg at 10% labels: with n=3 paired trials and m=1 comparison(s)" in text
    assert "Convergence speed" in page.read_text()
