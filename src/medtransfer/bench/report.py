"""Benchmark report: the results table, its figures, ``report.md`` and a self-contained ``report.html``.

Everything is rebuilt from the store's rows (plus each finished run's ``metrics.jsonl`` for the learning curves),
so ``medtransfer report DIR`` can regenerate the report at any time, for instance after more shards merge in.
The statistics come from :mod:`medtransfer.bench.stats`; this module only groups rows into cells
(task x initialisation x label fraction, one value per seed), calls it and lays the numbers out.
Markdown and HTML are rendered from one list of blocks so that the two files always say the same thing, and the
HTML embeds its figures as data URIs so that it can be mailed or archived as a single file.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from . import stats
from .curves import (  # noqa: F401  (re-exported: the report's public names)
    CONVERGENCE_NOTE,
    _collect_curves,
    _finite,
    _read_validation,
    _run_label,
    convergence,
    learning_curves,
)

MARKER_NOTE = (
    "Markers: * p<0.05, ** p<0.01, *** p<0.0001 after Holm correction across the initialisations compared with the "
    "baseline at the same task and label fraction; paired t-test when trials share seeds and splits, else Welch's "
    "t-test (the Wilcoxon signed-rank p is shown beside the paired test). Effect size: Cohen's d_z (paired) or "
    "Hedges' g (Welch). Label efficiency: the smallest label fraction "
    "at which an initialisation matches the baseline trained on 100% of the labels (linear between measured "
    "fractions; ≤ when already matched at the smallest fraction measured). Detectable Δ: the smallest true "
    "difference the paired t-test detects with 80% power at p<0.05 after Holm, (t(1-0.05/(2m), n-1) + t(0.8, n-1)) "
    "· sd/√n from the observed SD of the paired differences (level 0.05/m, Holm's first step)."
)
Block = tuple  # ("h", level, text) | ("p", text) | ("ul", items) | ("table", headers, rows) | ("img", rel, alt, png)
#              | ("pre", label, text)


# ---------------------------------------------------------------------------------------------------- numbers
def results_table(rows: list[dict], *, baseline: str = "scratch") -> list[dict]:
    """One entry per (task, init, fraction) over the rows with status "done" and a finite metric.

    Entries come sorted by task, then fraction, then init (baseline first). Keys: task, metric_name,
    higher_is_better, init, fraction, n, mean, std (ddof=1), ci_low, ci_high (95% t interval); against the baseline
    at the same (task, fraction), Holm-corrected across every init there: test, p, p_holm, marker, effect_size,
    effect (its name), mean_diff, wilcoxon_p, diff_sd (SD of the paired differences), n_pairs, detectable (the
    smallest true difference its paired test detects with 80% power at p < 0.05 after Holm,
    :func:`~medtransfer.bench.stats.detectable_difference`) (all None for the baseline itself and where it has no
    runs; diff_sd and detectable are None for unpaired comparisons too, n_pairs 0); baseline;
    label_efficiency of the (task, init), the same on each of its entries (None when never reached, or when the
    baseline has no runs at fraction 1.0); preset: the intensity preset(s) of the cell's runs, comma-separated (None
    when no run recorded one: stores written before schema 2).
    """
    if not rows:
        raise ValueError("rows is empty: there are no benchmark runs to report; run `medtransfer benchmark CONFIG` "
                         "first, or point the report at the folder that holds its store")
    cells: dict[tuple[str, str, float], dict[int, float]] = defaultdict(dict)
    presets: dict[tuple[str, str, float], set[str]] = defaultdict(set)
    task_metric: dict[str, tuple[str, bool]] = {}
    for row in rows:
        if not _has_metric(row):
            continue
        task, init, fraction, seed = row["task"], row["init"], float(row["fraction"]), int(row["seed"])
        metric = (row["metric_name"], bool(row["higher_is_better"]))
        if task_metric.setdefault(task, metric) != metric:
            raise ValueError(f"task {task!r} mixes primary metrics {task_metric[task]} and {metric} (run "
                             f"{row.get('run_id')!r}); give each task one metric, or rename one of the tasks")
        if seed in cells[(task, init, fraction)]:
            raise ValueError(f"rows hold two finished runs of task={task!r} init={init!r} fraction={fraction:g} "
                             f"seed={seed}; pass each run once (merge the stores instead of concatenating rows)")
        cells[(task, init, fraction)][seed] = float(row["metric"])
        if row.get("preset"):
            presets[(task, init, fraction)].add(str(row["preset"]))

    entries: list[dict] = []
    for task in sorted(task_metric):
        metric_name, higher_is_better = task_metric[task]
        keys = [k for k in cells if k[0] == task]
        fractions = sorted({k[2] for k in keys})
        inits = _ordered_inits({k[1] for k in keys}, baseline)
        summaries = {(k[1], k[2]): stats.summarize(list(cells[k].values())) for k in keys}
        full = next((f for f in fractions if math.isclose(f, 1.0)), None)
        target = summaries[(baseline, full)].mean if (baseline, full) in summaries else None
        efficiency = {
            init: None if target is None else stats.label_efficiency(
                {f: summaries[(init, f)].mean for f in fractions if (init, f) in summaries}, target,
                higher_is_better=higher_is_better)
            for init in inits
        }
        for fraction in fractions:
            groups = {init: cells[(task, init, fraction)] for init in inits if (task, init, fraction) in cells}
            compared = {}
            if baseline in groups and len(groups) > 1:
                compared = {c.name: c for c in stats.compare_all(groups, baseline)}
            for init in groups:
                summary, comparison = summaries[(init, fraction)], compared.get(init)
                entries.append({
                    "task": task, "metric_name": metric_name, "higher_is_better": higher_is_better,
                    "init": init, "fraction": fraction, "n": summary.n, "mean": summary.mean, "std": summary.std,
                    "ci_low": summary.ci_low, "ci_high": summary.ci_high,
                    **{name: getattr(comparison, name, None)
                       for name in ("test", "p", "p_holm", "marker", "effect_size", "mean_diff", "effect",
                                    "wilcoxon_p", "diff_sd", "n_pairs", "detectable")},
                    "baseline": baseline, "label_efficiency": efficiency[init],
                    "preset": ", ".join(sorted(presets[(task, init, fraction)])) or None,
                })
    return entries


def detectable_effects(entries: list[dict]) -> list[dict]:
    """Per (task, fraction): the smallest Dice (metric) difference the grid detects there with 80% power at p < 0.05
    after Holm over its m paired comparisons with the baseline, from the pooled SD of their paired differences
    (root mean square of the per-comparison SDs, all on the same n seeds). Keys: task, fraction, n, m, sd,
    detectable; None where no paired comparison has an SD."""
    out = []
    for (task, fraction), group in _by_cell(entries).items():
        paired = [e for e in group if e.get("diff_sd") is not None]
        compared = [e for e in group if e.get("p") is not None]
        if not paired:
            continue
        n = min(e["n_pairs"] for e in paired)
        sd = math.sqrt(float(np.mean([e["diff_sd"] ** 2 for e in paired])))
        m = max(1, len(compared))
        out.append({"task": task, "fraction": fraction, "n": n, "m": m, "sd": sd,
                    "detectable": stats.detectable_difference(sd, n, m=m)})
    return out


def _by_cell(entries: list[dict]) -> dict[tuple[str, float], list[dict]]:
    cells: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for e in entries:
        cells[(e["task"], e["fraction"])].append(e)
    return dict(cells)


def format_detectable(effects: list[dict]) -> str:
    """One line per (task, fraction) of :func:`detectable_effects`."""
    return "".join(f"{_detectable_text(e)}\n" for e in effects)


def _detectable_text(e: dict) -> str:
    return (f"{e['task']} at {_pct(e['fraction'])} labels: with n={e['n']} paired trials and m={e['m']} comparison(s) "
            f"against the baseline, the smallest difference detectable at p < 0.05 after Holm with 80% power is "
            f"{_num(e['detectable'])} (pooled SD of the paired differences {_num(e['sd'])}; level 0.05/m, Holm's "
            "first step, so an upper bound for the other steps)")


def format_convergence(entries: list[dict], *, baseline: str = "scratch") -> str:
    """The :func:`convergence` entries as one markdown table ("" when there are none)."""
    return _render_md([_convergence_table(entries, baseline)]) if entries else ""


def _convergence_table(entries: list[dict], baseline: str) -> Block:
    return ("table", ["task", "fraction", "init", f"{baseline}'s final val (target)", "reached",
                      "steps to target", "seconds to target", "steps run"],
            [[e["task"], _pct(e["fraction"]), e["init"], _num(e["target"]), f"{e['reached']}/{e['n']}",
              "never" if e["steps_mean"] is None else f"{e['steps_mean']:.0f}",
              "never" if e["steps_mean"] is None else "n/a" if e["seconds_mean"] is None
              else f"{e['seconds_mean']:.0f}", f"{e['final_step_mean']:.0f}"] for e in entries])


def _has_metric(row: dict) -> bool:
    value = row.get("metric")
    return row.get("status") == "done" and isinstance(value, (int, float)) and math.isfinite(value)


def _ordered_inits(inits, baseline: str) -> list[str]:
    return sorted(inits, key=lambda name: (name != baseline, name))


# ---------------------------------------------------------------------------------------------------- tables
def format_table(entries: list[dict]) -> str:
    """The results as markdown: per task a table of mean ± std per init and fraction, then the comparisons."""
    if not entries:
        return "No finished runs yet: nothing to tabulate.\n"
    blocks: list[Block] = []
    for task, task_entries in _by_task(entries).items():
        blocks += [("h", 3, task), *_task_tables(task_entries)]
    return _render_md(blocks)


def _by_task(entries: list[dict]) -> dict[str, list[dict]]:
    return {task: [e for e in entries if e["task"] == task] for task in dict.fromkeys(e["task"] for e in entries)}


def _task_tables(entries: list[dict]) -> list[Block]:
    first = entries[0]
    baseline = first.get("baseline", "scratch")
    fractions = sorted({e["fraction"] for e in entries})
    inits = _ordered_inits({e["init"] for e in entries}, baseline)
    cell = {(e["init"], e["fraction"]): e for e in entries}
    has_full_baseline = any(e["init"] == baseline and math.isclose(e["fraction"], 1.0) for e in entries)
    direction = "higher is better" if first["higher_is_better"] else "lower is better"
    blocks: list[Block] = [("p", f"Test {first['metric_name']} ({direction}), mean ± std over seeds with the "
                                 f"number of seeds n; markers compare with {baseline} at the same fraction.")]
    rows = []
    for init in inits:
        row = [init, *("—" if (init, f) not in cell else _cell_text(cell[(init, f)]) for f in fractions)]
        efficiency = next(e["label_efficiency"] for e in entries if e["init"] == init)
        bound = "≤ " if efficiency == min(f for i, f in cell if i == init) else ""  # matched at the first point
        row.append(bound + _pct(efficiency, 3) if efficiency is not None
                   else ("not reached" if has_full_baseline else "—"))
        row.append(_init_presets(entries, init) or "not recorded")
        rows.append(row)
    blocks.append(("table", ["init", *[_pct(f) for f in fractions], "label efficiency", "preset"], rows))
    known = {init: _init_presets(entries, init) for init in inits if _init_presets(entries, init)}
    if len(set(known.values())) > 1:
        blocks.append(("p", "Note: the initialisations of this task were not preprocessed alike (intensity preset: "
                            + "; ".join(f"{init} {p}" for init, p in known.items()) + "), so their differences "
                            "include the input normalisation, not only the initial weights. Set data.preset in the "
                            "grid's finetune section to compare them on one preprocessing."))

    tests = [e for e in sorted(entries, key=lambda e: (e["fraction"], inits.index(e["init"])))
             if e["init"] != baseline and e.get("test") is not None]
    if tests:
        blocks.append(("table", ["init", "fraction", "n", f"Δ mean vs {baseline}", "test", "p", "p (Holm)",
                                 "Wilcoxon p", "effect size", "marker", "detectable Δ (80%)"],
                       [[e["init"], _pct(e["fraction"]), str(e["n"]), _num(e["mean_diff"], signed=True), e["test"],
                         _p(e["p"]), _p(e["p_holm"]), _p(e.get("wilcoxon_p")),
                         f"{_effect(e['effect_size'])} ({e.get('effect')})",
                         "n/a" if e["p_holm"] is None else e["marker"] or "ns", _num(e.get("detectable"))]
                        for e in tests]))
        effects = detectable_effects(entries)
        if effects:
            blocks.append(("ul", [_detectable_text(e) for e in effects]))
    missing = [f for f in fractions if (baseline, f) not in cell]
    if missing:
        blocks.append(("p", f"No {baseline} (baseline) runs at fraction(s) {', '.join(_pct(f) for f in missing)}: "
                            "no tests there."))
    return blocks


def _init_presets(entries: list[dict], init: str) -> str:
    """The intensity preset(s) an init's runs used, over all fractions ('' when none was recorded)."""
    found = {p.strip() for e in entries if e["init"] == init and e.get("preset") for p in e["preset"].split(",")}
    return ", ".join(sorted(found))


def _cell_text(e: dict) -> str:
    spread = f" ± {_num(e['std'])}" if e["n"] > 1 else ""
    return f"{_num(e['mean'])}{spread}{' ' + e['marker'] if e.get('marker') else ''} (n={e['n']})"


def _num(x: Any, signed: bool = False) -> str:
    if not _finite(x):
        return "n/a"
    sign = "+" if signed else ""
    return f"{x:{sign}.3f}" if x == 0 or 0.001 <= abs(x) < 1e4 else f"{x:{sign}.3g}"


def _effect(size: Any) -> str:
    return f"{size:+.2f}" if _finite(size) else "n/a"


def _p(p: Any) -> str:
    return "n/a" if not _finite(p) else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _pct(fraction: float, digits: int = 4) -> str:
    return f"{100 * fraction:.{digits}g}%"


# ---------------------------------------------------------------------------------------------------- figures
def _new_axes(width: float = 6.0, height: float = 3.6):
    # A bare Figure saves through the Agg canvas without pyplot: no switch of the caller's backend (which would
    # break plotting in a notebook that writes a report), no figure registry to leak from, no display needed.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained").add_subplot()


def _finish(ax, xlabel: str, ylabel: str, title: str) -> bytes:
    """Label the axes and return the figure as PNG bytes."""
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize="small")
    buffer = io.BytesIO()
    # No "Software" text chunk: the embedded PNG then holds no URL and the same figure gives the same bytes.
    ax.figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    return buffer.getvalue()


def _bar_chart(task: str, entries: list[dict], inits: list[str], fractions: list[float]) -> bytes:
    ax = _new_axes(max(5.0, 1.1 * len(fractions) * max(1, len(inits)) ** 0.5 + 2.5))
    width = 0.8 / len(inits)
    for i, init in enumerate(inits):
        own = {e["fraction"]: e for e in entries if e["init"] == init}
        xs = [j - 0.4 + width * (i + 0.5) for j, f in enumerate(fractions) if f in own]
        points = [own[f] for f in fractions if f in own]
        error = [[e["mean"] - e["ci_low"] for e in points], [e["ci_high"] - e["mean"] for e in points]]
        ax.bar(xs, [e["mean"] for e in points], width, yerr=error, capsize=3, color=f"C{i}", label=init)
    ax.set_xticks(range(len(fractions)), [_pct(f) for f in fractions])
    return _finish(ax, "label fraction", entries[0]["metric_name"], f"{task}: test {entries[0]['metric_name']} "
                   "(mean, 95% CI)")


def _efficiency_chart(task: str, entries: list[dict], inits: list[str], baseline: str) -> bytes:
    ax = _new_axes()
    fractions = sorted({e["fraction"] for e in entries})
    for i, init in enumerate(inits):
        points = sorted((e for e in entries if e["init"] == init), key=lambda e: e["fraction"])
        xs = [e["fraction"] for e in points]
        ax.plot(xs, [e["mean"] for e in points], marker="o", color=f"C{i}", label=init)
        ax.fill_between(xs, [e["ci_low"] for e in points], [e["ci_high"] for e in points], color=f"C{i}",
                        alpha=0.2, linewidth=0)
    full = [e for e in entries if e["init"] == baseline and math.isclose(e["fraction"], 1.0)]
    if full:
        ax.axhline(full[0]["mean"], linestyle="--", color="0.35", label=f"{baseline} at 100%")
    if fractions[-1] / fractions[0] >= 10:  # a log axis only pays off when the fractions span a decade
        ax.set_xscale("log")
    ax.set_xticks(fractions, [_pct(f) for f in fractions])
    ax.minorticks_off()
    return _finish(ax, "label fraction", entries[0]["metric_name"], f"{task}: label efficiency (mean, 95% CI)")


def _learning_chart(task: str, fraction: float, curves: dict, inits: list[str], metric_name: str,
                    target: float | None = None, baseline: str = "scratch") -> bytes:
    ax = _new_axes()
    if target is not None:
        ax.axhline(target, linestyle="--", color="0.35", label=f"{baseline}'s final (target)")
    for i, init in enumerate(inits):
        if not curves.get(init):
            continue
        steps, means, stds = (np.asarray(column, dtype=float) for column in zip(*curves[init]))
        ax.plot(steps, means, color=f"C{i}", label=init, marker="o" if len(steps) == 1 else None)
        ax.fill_between(steps, means - stds, means + stds, color=f"C{i}", alpha=0.2, linewidth=0)
    return _finish(ax, "optimiser step", f"validation {metric_name}",
                   f"{task}, {_pct(fraction)} labels: validation {metric_name} (mean ± std)")


def _target(speed: list[dict], fraction: float, baseline: str) -> float | None:
    return next((e["target"] for e in speed if e["init"] == baseline and e["fraction"] == fraction), None)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "task"


# ---------------------------------------------------------------------------------------------------- report
def write_report(out_dir: Path, rows: list[dict], *, baseline: str = "scratch", title: str = "medtransfer benchmark",
                 meta: dict | None = None) -> tuple[Path, Path]:
    """Write ``out_dir/report.md``, ``out_dir/report.html`` and ``out_dir/figures/*.png``; return (md, html)."""
    from ..weights.io import atomic_write

    out_dir = Path(out_dir)
    entries = results_table(rows, baseline=baseline)
    curves, notes = _collect_curves(rows)
    speeds = convergence(rows, baseline=baseline)
    blocks: list[Block] = [("h", 1, title)]
    if meta:
        blocks.append(("ul", [f"{key}: {_meta_value(value)}" for key, value in meta.items()]))
    statuses = Counter(row.get("status", "unknown") for row in rows)
    blocks.append(("p", f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) + "."))
    blocks.append(("p", MARKER_NOTE))
    if not entries:
        blocks.append(("p", "No run has finished with a test metric yet: there is no table to show."))
    figures: dict[str, bytes] = {}

    def figure(name: str, alt: str, png: bytes) -> Block:
        figures[name] = png
        return ("img", f"figures/{name}", alt, png)

    for task, task_entries in _by_task(entries).items():
        inits = _ordered_inits({e["init"] for e in task_entries}, baseline)
        fractions = sorted({e["fraction"] for e in task_entries})
        blocks += [("h", 2, task), *_task_tables(task_entries)]
        speed = [e for e in speeds if e["task"] == task]
        if speed:
            blocks += [("h", 3, "Convergence speed"), ("p", CONVERGENCE_NOTE.format(baseline=baseline)),
                       _convergence_table(speed, baseline)]
        blocks.append(("h", 3, "Figures"))
        blocks.append(figure(f"bars_{_slug(task)}.png", f"{task}: test metric per label fraction",
                             _bar_chart(task, task_entries, inits, fractions)))
        blocks.append(figure(f"efficiency_{_slug(task)}.png", f"{task}: label efficiency",
                             _efficiency_chart(task, task_entries, inits, baseline)))
        for (curve_task, fraction), per_init in curves.items():
            if curve_task == task:
                curve_inits = _ordered_inits(set(inits) | set(per_init), baseline)
                blocks.append(figure(f"curves_{_slug(task)}_{fraction:g}.png",
                                     f"{task}: learning curves at {_pct(fraction)} labels",
                                     _learning_chart(task, fraction, per_init, curve_inits,
                                                     task_entries[0]["metric_name"],
                                                     _target(speed, fraction, baseline), baseline)))
    blocks += _unfinished_section(rows, statuses)
    if notes:
        blocks += [("h", 2, "Notes"), ("ul", notes)]

    def write(path: Path, data: bytes) -> Path:
        def fill(tmp: Path) -> None:
            tmp.write_bytes(data)
            tmp.chmod(0o644)  # a report is for sharing; the temporary file would otherwise stay owner-only

        return atomic_write(path, fill)

    for name, png in figures.items():
        write(out_dir / "figures" / name, png)
    return (write(out_dir / "report.md", _render_md(blocks).encode("utf-8")),
            write(out_dir / "report.html", _render_html(blocks, title).encode("utf-8")))


def _meta_value(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_meta_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_meta_value(v) for v in value)
    return str(value)


def _unfinished_section(rows: list[dict], statuses: Counter) -> list[Block]:
    """Runs that are not in the table: their counts, and every failure with its error."""
    unfinished = {s: n for s, n in statuses.items() if s != "done"}
    no_metric = [row for row in rows if row.get("status") == "done" and not _has_metric(row)]
    if not unfinished and not no_metric:
        return []
    blocks: list[Block] = [("h", 2, "Runs not in the table")]
    counts = [[s, str(n)] for s, n in sorted(unfinished.items())]
    if no_metric:
        counts.append(["done without a finite test metric", str(len(no_metric))])
    blocks.append(("table", ["status", "runs"], counts))
    failed = sorted((row for row in rows if row.get("status") == "failed"), key=_run_label)
    if failed:
        blocks.append(("h", 3, "Failed runs"))
        blocks.append(("table", ["run", "task", "init", "fraction", "seed", "attempts", "error"],
                       [[str(row.get("run_id")), str(row.get("task")), str(row.get("init")),
                         _pct(float(row["fraction"])), str(row.get("seed")), str(row.get("attempts")),
                         _error_summary(row.get("error"))] for row in failed]))
        for row in failed:  # tracebacks are long: the table has their last line, the full text follows
            if row.get("error") and "\n" in row["error"].strip():
                blocks.append(("pre", f"{row.get('run_id')} ({_run_label(row)})", row["error"].strip()))
    return blocks


def _error_summary(error: str | None, limit: int = 300) -> str:
    lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
    text = lines[-1] if lines else "(no error recorded)"
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------------- rendering
def _render_md(blocks: list[Block]) -> str:
    def row(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    render = {
        "h": lambda level, text: "#" * level + " " + text,
        "p": lambda text: text,
        "ul": lambda items: "\n".join(f"- {item}" for item in items),
        "table": lambda head, rows: "\n".join([row(head), "|" + "---|" * len(head), *map(row, rows)]),
        "img": lambda rel, alt, png: f"![{alt}]({rel})",
        "pre": lambda label, text: f"{label}:\n\n```\n{text}\n```",
    }
    return "\n\n".join(render[block[0]](*block[1:]) for block in blocks) + "\n"


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:.92em}th{background:#f2f2f2}"
        "th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}"
        "figure img{max-width:100%}figcaption{color:#555;font-size:.9em}pre{background:#f7f7f7;padding:.6em}")


def _render_html(blocks: list[Block], title: str) -> str:
    def esc(text) -> str:
        return html.escape(str(text))

    def cells(tag: str, values) -> str:
        return "<tr>" + "".join(f"<{tag}>{esc(v)}</{tag}>" for v in values) + "</tr>"

    render = {
        "h": lambda level, text: f"<h{level}>{esc(text)}</h{level}>",
        "p": lambda text: f"<p>{esc(text)}</p>",
        "ul": lambda items: "<ul>" + "".join(f"<li>{esc(item)}</li>" for item in items) + "</ul>",
        "table": lambda head, rows: f"<table><thead>{cells('th', head)}</thead>"
                                    f"<tbody>{''.join(cells('td', r) for r in rows)}</tbody></table>",
        "img": lambda rel, alt, png: f'<figure><img src="data:image/png;base64,{base64.b64encode(png).decode()}" '
                                     f'alt="{esc(alt)}"><figcaption>{esc(alt)}</figcaption></figure>',
        "pre": lambda label, text: f"<details><summary>{esc(label)}</summary><pre>{esc(text)}</pre></details>",
    }
    body = "\n".join(render[block[0]](*block[1:]) for block in blocks)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")
