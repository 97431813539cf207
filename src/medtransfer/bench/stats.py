"""Statistics for benchmark grids: per-cell summaries, tests against a baseline, effect sizes, label efficiency.

A benchmark cell (initialisation x task x label fraction) holds one metric per trial seed. Trials with the same seed
share their data split across initialisations, so two initialisations compared on the same seeds form a paired
design; the paired t-test (and the Wilcoxon signed-rank test, which drops the normality assumption) then removes the
split-to-split variation that Welch's t-test has to treat as noise. When the seed sets differ (a run failed, a shard
is missing) the comparison falls back to Welch's t-test. Several initialisations compared with one baseline make
several tests, so :func:`compare_all` adjusts their p-values with Holm's step-down method, which controls the
family-wise error rate without assuming independence.

Undefined statistics are reported as ``None`` rather than NaN, so that tables and JSON show "not available" and
never a number that poisons later arithmetic. A t statistic is undefined when a group has fewer than two values, or
when the variance it divides by is zero (two constant groups in Welch's test, constant differences in the paired
test): scipy then returns NaN or an infinite t with p = 0, which says more than a handful of identical numbers can.

The functions take plain sequences of floats; NaN or infinite inputs raise ``ValueError`` naming their positions,
because a silently dropped NaN would change n and with it every p-value.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats as sps

MARKERS = ((1e-4, "***"), (1e-2, "**"), (5e-2, "*"))


def marker(p: float | None) -> str:
    """Significance marker: ``"***"`` if p < 1e-4, ``"**"`` if p < 0.01, ``"*"`` if p < 0.05, else ``""``."""
    if p is None:
        return ""
    if not 0.0 <= p <= 1.0:  # also catches NaN
        raise ValueError(f"marker: p must be a probability in [0, 1] or None, got {p!r}")
    for threshold, symbol in MARKERS:
        if p < threshold:
            return symbol
    return ""


def _values(values, name: str) -> np.ndarray:
    """``values`` as a 1D float array, refusing NaN/inf (naming their positions) and other shapes."""
    try:
        array = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a sequence of numbers, got {values!r}") from exc
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a flat sequence of numbers, got shape {array.shape}")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(
            f"{name}: values at positions {bad.tolist()} are NaN or infinite ({array[bad].tolist()}); "
            "drop the failed runs before computing statistics"
        )
    return array


def _quiet(test, *args):
    """Run a scipy test without its "precision loss" warning for a constant group: the callers check constancy."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Precision loss", category=RuntimeWarning)
        return test(*args)


def _pair(a, b, caller: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _values(a, f"{caller}: a"), _values(b, f"{caller}: b")
    if x.size != y.size:
        raise ValueError(f"{caller}: a and b must be aligned pairs of equal length, got {x.size} and {y.size}")
    if x.size == 0:
        raise ValueError(f"{caller}: a and b are empty; pass at least one pair")
    return x, y


def _std(x: np.ndarray) -> float:
    # Identical values give exactly 0, not the 1e-16 that numpy's two-pass formula leaves.
    return float(np.std(x, ddof=1)) if x.size > 1 and x.max() != x.min() else 0.0


def _constant(x: np.ndarray, *sources: np.ndarray) -> bool:
    """True when the spread of ``x`` is within floating-point rounding of the numbers it was computed from.

    Differences such as 0.3 - 0.2 and 0.1 - 0.0 differ by ~1e-17; treating them as distinct would give a t of ~1e16
    and p ~ 0 for what are constant differences.
    """
    scale = max(float(np.max(np.abs(s))) for s in (x, *sources))
    return float(np.ptp(x)) <= 1e-12 * scale


@dataclass(frozen=True)
class Summary:
    """Mean with sample standard deviation (ddof=1, 0 for n=1), standard error and a t-based confidence interval."""

    n: int
    mean: float
    std: float
    sem: float
    ci_low: float
    ci_high: float


def summarize(values, confidence: float = 0.95) -> Summary:
    """Summary of one cell. The interval is mean ± t(1-alpha/2, n-1)·sem; for n=1 it collapses to (mean, mean)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"summarize: confidence must lie strictly between 0 and 1 (e.g. 0.95), got {confidence!r}")
    x = _values(values, "summarize: values")
    if x.size == 0:
        raise ValueError("summarize: values is empty; a cell needs at least one finished run")
    mean, std = float(np.mean(x)), _std(x)
    sem = std / math.sqrt(x.size)
    half = float(sps.t.ppf((1.0 + confidence) / 2.0, x.size - 1)) * sem if x.size > 1 else 0.0
    return Summary(n=int(x.size), mean=mean, std=std, sem=sem, ci_low=mean - half, ci_high=mean + half)


def welch(a, b) -> tuple[float, float]:
    """Welch's t-test (unequal variances) of mean(a) = mean(b): ``(t, two-sided p)``.

    Raises ``ValueError`` when a group has fewer than two values or both groups are constant (t undefined).
    """
    x, y = _values(a, "welch: a"), _values(b, "welch: b")
    if x.size < 2 or y.size < 2:
        raise ValueError(f"welch: each group needs at least 2 values, got {x.size} and {y.size}")
    if _constant(x) and _constant(y):
        raise ValueError("welch: both groups are constant (zero variance), so the t statistic is undefined")
    result = _quiet(lambda: sps.ttest_ind(x, y, equal_var=False))
    return float(result.statistic), float(result.pvalue)


def paired_t(a, b) -> tuple[float, float]:
    """Paired t-test on the differences a[i] - b[i]: ``(t, two-sided p)``.

    Raises ``ValueError`` for fewer than two pairs or constant differences (t undefined).
    """
    x, y = _pair(a, b, "paired_t")
    if x.size < 2:
        raise ValueError(f"paired_t: needs at least 2 pairs, got {x.size}")
    if _constant(x - y, x, y):
        raise ValueError("paired_t: the differences a - b are constant (zero variance), so t is undefined")
    result = _quiet(sps.ttest_rel, x, y)
    return float(result.statistic), float(result.pvalue)


def wilcoxon(a, b) -> tuple[float, float]:
    """Wilcoxon signed-rank test on a[i] - b[i]: ``(statistic, two-sided p)``; all differences zero -> ``(0.0, 1.0)``.

    Zero differences are dropped (Wilcoxon's convention); scipy's default method picks the exact null distribution
    for small samples (p = 2/64 for six differences of one sign) and a normal approximation for large ones.
    The statistic is the smaller of the two signed rank sums.
    """
    x, y = _pair(a, b, "wilcoxon")
    if np.all(x == y):
        return 0.0, 1.0  # no evidence of any difference; scipy would raise or warn here
    result = sps.wilcoxon(x, y)
    return float(result.statistic), float(result.pvalue)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values, in input order: monotone in the raw p, capped at 1.

    The k-th smallest of m p-values is multiplied by (m - k + 1), then a running maximum keeps the order. ``None``
    entries (tests that could not be run) stay ``None`` and do not count towards m.
    """
    for index, p in enumerate(pvalues):
        if p is not None and not 0.0 <= p <= 1.0:
            raise ValueError(f"holm: pvalues[{index}] = {p!r} is not a probability in [0, 1] (use None for missing)")
    present = [(p, i) for i, p in enumerate(pvalues) if p is not None]
    m = len(present)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, index) in enumerate(sorted(present)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[index] = running
    return adjusted


def hedges_g(a, b) -> float:
    """Hedges' g of a - b: Cohen's d with the pooled sd, times the small-sample correction 1 - 3 / (4·df - 1).

    df = n_a + n_b - 2; the correction is Hedges & Olkin's (1985) approximation of the exact gamma-function factor.
    Raises ``ValueError`` when a group has fewer than two values or the pooled sd is zero.
    """
    x, y = _values(a, "hedges_g: a"), _values(b, "hedges_g: b")
    if x.size < 2 or y.size < 2:
        raise ValueError(f"hedges_g: each group needs at least 2 values, got {x.size} and {y.size}")
    df = x.size + y.size - 2
    if _constant(x) and _constant(y):
        raise ValueError("hedges_g: both groups are constant (pooled sd 0), so the effect size is undefined")
    pooled = math.sqrt(((x.size - 1) * _std(x) ** 2 + (y.size - 1) * _std(y) ** 2) / df)
    return (1.0 - 3.0 / (4.0 * df - 1.0)) * float(np.mean(x) - np.mean(y)) / pooled


def cohens_dz(a, b) -> float:
    """Cohen's d_z for paired data: mean(a - b) / sd(a - b), sd with ddof=1.

    Raises ``ValueError`` for fewer than two pairs or constant differences.
    """
    x, y = _pair(a, b, "cohens_dz")
    if x.size < 2:
        raise ValueError(f"cohens_dz: needs at least 2 pairs, got {x.size}")
    diff = x - y
    if _constant(diff, x, y):
        raise ValueError("cohens_dz: the differences a - b are constant (sd 0), so d_z is undefined")
    return float(np.mean(diff)) / _std(diff)


@dataclass(frozen=True)
class Comparison:
    """One initialisation against the baseline in one cell. ``None`` marks a statistic that is undefined."""

    name: str
    baseline: str
    n: int
    n_baseline: int
    mean_diff: float  # mean(values) - mean(baseline): positive = better when higher_is_better
    paired: bool
    test: str  # "paired t" | "welch t": the test behind t and p
    t: float | None
    p: float | None
    welch_p: float | None
    paired_p: float | None
    wilcoxon_p: float | None
    effect_size: float | None
    effect: str  # "cohen dz" when paired, else "hedges g"
    p_holm: float | None
    marker: str
    diff_sd: float | None = None  # sample SD of the paired differences (None when unpaired)
    n_pairs: int = 0  # seeds in the paired tests (0 when unpaired)
    detectable: float | None = None  # detectable_difference(diff_sd, n_pairs, m=comparisons made together)


def _or_none(function, *args):
    """Run a test; an undefined result (the ValueErrors raised above for n < 2 or zero variance) becomes None."""
    try:
        return function(*args)
    except ValueError:
        return None


def _group(values: Mapping[int, float], label: str) -> dict[int, float]:
    if not isinstance(values, Mapping):
        raise ValueError(f"compare: {label} must map seed -> metric, got {type(values).__name__}")
    if not values:
        raise ValueError(f"compare: {label} has no values; it needs at least one finished run")
    bad = {seed: v for seed, v in values.items() if not math.isfinite(float(v))}
    if bad:
        raise ValueError(f"compare: {label} has NaN or infinite metrics for seeds {sorted(bad)}; drop those runs")
    return {int(seed): float(v) for seed, v in values.items()}


def compare(
    values: Mapping[int, float],
    baseline: Mapping[int, float],
    *,
    name: str = "",
    baseline_name: str = "",
    paired: bool | None = None,
) -> Comparison:
    """Compare one group of per-seed metrics with the baseline's.

    ``paired=None`` pairs the trials when both groups have exactly the same seeds, at least two of them; ``True``
    forces pairing on the seeds the groups share (seeds in only one group are left out of the paired tests; at
    least two shared seeds are required); ``False`` always uses Welch's t-test. Paired comparisons report the
    paired t-test as the primary test and Cohen's d_z as effect size, unpaired ones Welch's test and Hedges' g; the
    Welch p-value is reported in both cases. ``mean_diff``, ``n`` and ``n_baseline`` always use every value. On a
    single comparison ``p_holm`` equals ``p``; :func:`compare_all` corrects across several.
    """
    a = _group(values, f"values of {name!r}" if name else "values")
    b = _group(baseline, f"baseline {baseline_name!r}" if baseline_name else "baseline")
    shared = sorted(a.keys() & b.keys())
    if paired is None:
        paired = a.keys() == b.keys() and len(shared) >= 2
    elif paired and len(shared) < 2:
        raise ValueError(
            f"compare: paired=True needs at least 2 seeds shared by both groups, got {shared}; "
            "pass paired=None to fall back to Welch's t-test"
        )
    x, y = np.array(list(a.values())), np.array(list(b.values()))
    welch_result = _or_none(welch, x, y)
    if paired:
        xp, yp = np.array([a[s] for s in shared]), np.array([b[s] for s in shared])
        primary = _or_none(paired_t, xp, yp)
        paired_p = primary[1] if primary else None
        wilcoxon_result = _or_none(wilcoxon, xp, yp)
        wilcoxon_p = wilcoxon_result[1] if wilcoxon_result else None
        effect_size, effect, test = _or_none(cohens_dz, xp, yp), "cohen dz", "paired t"
        diff_sd, n_pairs = (_std(xp - yp) if primary else None), len(shared)  # no SD where t is undefined
    else:
        diff_sd, n_pairs = None, 0
        primary, paired_p, wilcoxon_p = welch_result, None, None
        effect_size, effect, test = _or_none(hedges_g, x, y), "hedges g", "welch t"
    t, p = primary if primary else (None, None)
    return Comparison(
        name=name,
        baseline=baseline_name,
        n=len(a),
        n_baseline=len(b),
        mean_diff=float(np.mean(x) - np.mean(y)),
        paired=bool(paired),
        test=test,
        t=t,
        p=p,
        welch_p=welch_result[1] if welch_result else None,
        paired_p=paired_p,
        wilcoxon_p=wilcoxon_p,
        effect_size=effect_size,
        effect=effect,
        p_holm=p,
        marker=marker(p),
        diff_sd=diff_sd,
        n_pairs=n_pairs,
        detectable=detectable_difference(diff_sd, n_pairs),
    )


def compare_all(
    groups: Mapping[str, Mapping[int, float]], baseline: str, *, paired: bool | None = None
) -> list[Comparison]:
    """Every group except ``baseline`` against it (in the groups' order), Holm-corrected across these comparisons.

    Pass the groups of one cell (one task and label fraction) at a time: the correction covers exactly the
    comparisons made together. ``p_holm`` and ``marker`` come from the corrected p-values, and ``detectable`` is
    :func:`detectable_difference` with m = the number of comparisons that have a p-value.
    """
    if baseline not in groups:
        raise ValueError(
            f"compare_all: baseline {baseline!r} is not among the groups {sorted(groups)}; "
            "pass one of them as baseline (default initialisation: 'scratch')"
        )
    comparisons = [
        compare(values, groups[baseline], name=name, baseline_name=baseline, paired=paired)
        for name, values in groups.items()
        if name != baseline
    ]
    adjusted = holm([c.p for c in comparisons])
    m = max(1, sum(c.p is not None for c in comparisons))
    return [replace(c, p_holm=q, marker=marker(q), detectable=detectable_difference(c.diff_sd, c.n_pairs, m=m))
            for c, q in zip(comparisons, adjusted)]


def detectable_difference(sd: float | None, n: int, *, m: int = 1, alpha: float = 0.05,
                          power: float = 0.8) -> float | None:
    """Smallest true mean paired difference a paired t-test over ``n`` trials detects with probability ``power``
    at two-sided level ``alpha`` after a Holm correction over ``m`` comparisons, given the SD of the differences.

    ``(t(1 - alpha / (2m), n-1) + t(power, n-1)) * sd / sqrt(n)``: the usual normal-shift approximation of the
    noncentral t, with quantiles of Student's t. The level is Bonferroni's ``alpha / m``, which is Holm's first (and
    strictest) step: an effect this large is rejected by Holm whatever the other comparisons do, so for Holm the
    figure is an upper bound (exact for the single best comparison, conservative for the others). ``None`` when it
    is undefined: ``sd`` None (not estimable) or fewer than two trials.
    """
    if not 0.0 < alpha < 1.0 or not 0.0 < power < 1.0:
        raise ValueError(f"detectable_difference: alpha and power must lie in (0, 1), got {alpha!r} and {power!r}")
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"detectable_difference: m (the number of comparisons) must be a positive integer, got {m!r}")
    if sd is None or n < 2:
        return None
    if not math.isfinite(sd) or sd < 0:
        raise ValueError(f"detectable_difference: sd must be a finite number >= 0, got {sd!r}")
    df = n - 1
    return float((sps.t.ppf(1.0 - alpha / (2 * m), df) + sps.t.ppf(power, df)) * sd / math.sqrt(n))


def label_efficiency(curve: Mapping[float, float], target: float, *, higher_is_better: bool = True) -> float | None:
    """Smallest label fraction at which an initialisation reaches ``target`` (the baseline's mean at fraction 1.0).

    ``curve`` maps label fraction -> mean metric. Between two measured fractions the curve is interpolated linearly
    in the fraction, so the answer is where the segment that first crosses the target meets it; a target reached
    exactly at a measured fraction gives that fraction. When the smallest measured fraction already reaches the
    target, that fraction is returned: it is an upper bound, since nothing smaller was measured. ``None`` when the
    curve never reaches the target. "Reaches" means >= target, or <= target when ``higher_is_better`` is False.
    """
    if not curve:
        raise ValueError("label_efficiency: curve is empty; pass label fraction -> mean metric for at least one point")
    if not math.isfinite(target):
        raise ValueError(f"label_efficiency: target must be a finite number, got {target!r}")
    points = sorted((float(f), float(v)) for f, v in curve.items())
    for fraction, value in points:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"label_efficiency: label fraction {fraction!r} is outside (0, 1]")
        if not math.isfinite(value):
            raise ValueError(f"label_efficiency: metric at fraction {fraction!r} is {value!r}; drop that point")

    def reached(value: float) -> bool:
        return value >= target if higher_is_better else value <= target

    if reached(points[0][1]):
        return points[0][0]
    for (f0, v0), (f1, v1) in zip(points, points[1:]):
        if reached(v1):  # v0 did not reach the target (else the loop would have returned), so v1 != v0
            return f1 if v1 == target else f0 + (target - v0) * (f1 - f0) / (v1 - v0)
    return None
