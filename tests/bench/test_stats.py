"""Benchmark statistics against textbook values computed by hand in the test, plus the edge cases that give None."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.special import betainc

from medtransfer.bench.stats import (
    MARKERS,
    Comparison,
    Summary,
    cohens_dz,
    compare,
    compare_all,
    hedges_g,
    holm,
    label_efficiency,
    marker,
    paired_t,
    summarize,
    welch,
    wilcoxon,
)

# Two classic worked examples of Welch's test (equal sizes; then unequal sizes and variances).
EX1_A = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
EX1_B = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
EX3_A = [19.8, 20.4, 19.6, 17.8, 18.5, 18.9, 18.3, 18.9, 19.5, 22.0]
EX3_B = [28.2, 26.6, 20.1, 23.3, 25.2, 22.1, 17.7, 27.6, 20.6, 13.7,
         23.2, 17.5, 20.6, 18.0, 23.9, 21.6, 24.3, 20.4, 23.9, 13.3]

# Paired hand example: differences a - b = [1, 2, 3, 2, 2], mean 2, sd sqrt(0.5).
PAIR_A = [5.0, 7.0, 9.0, 8.0, 6.0]
PAIR_B = [4.0, 5.0, 6.0, 6.0, 4.0]


def _mean(x):
    return sum(x) / len(x)


def _var(x):
    m = _mean(x)
    return sum((v - m) ** 2 for v in x) / (len(x) - 1)


def _two_sided_t_p(t, df):
    # P(|T| > t) = I_{df/(df+t^2)}(df/2, 1/2): the regularised incomplete beta, not scipy.stats' t distribution.
    return float(betainc(df / 2, 0.5, df / (df + t * t)))


# ---------------------------------------------------------------- markers


@pytest.mark.parametrize(
    ("p", "expected"),
    [(0.0, "***"), (0.99e-4, "***"), (1e-4, "**"), (0.0099, "**"), (0.01, "*"), (0.0499, "*"), (0.05, ""),
     (0.5, ""), (1.0, ""), (None, "")],
)
def test_marker_boundaries(p, expected):
    assert marker(p) == expected


def test_marker_rejects_non_probabilities():
    assert MARKERS == ((1e-4, "***"), (1e-2, "**"), (5e-2, "*"))
    for bad in (float("nan"), -0.1, 1.5):
        with pytest.raises(ValueError, match="probability"):
            marker(bad)


# ---------------------------------------------------------------- summaries


def test_summarize_textbook_ci():
    s = summarize([1, 2, 3, 4, 5])
    # 3 ± t(0.975, 4) * sqrt(2.5) / sqrt(5), t(0.975, 4) = 2.776445
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)
    assert (s.n, s.mean) == (5, 3.0)
    assert s.std == pytest.approx(math.sqrt(2.5))
    assert s.sem == pytest.approx(math.sqrt(0.5))
    assert (s.ci_low, s.ci_high) == pytest.approx((3 - half, 3 + half), abs=1e-6)
    assert (round(s.ci_low, 4), round(s.ci_high, 4)) == (1.0368, 4.9632)


def test_summarize_other_confidence_and_single_value():
    s = summarize([1, 2, 3, 4, 5], confidence=0.99)  # t(0.995, 4) = 4.604095
    assert s.ci_high - 3 == pytest.approx(4.604095 * math.sqrt(0.5), abs=1e-5)
    assert summarize([0.7]) == Summary(n=1, mean=0.7, std=0.0, sem=0.0, ci_low=0.7, ci_high=0.7)
    assert summarize(np.array([2.0, 2.0, 2.0])) == Summary(3, 2.0, 0.0, 0.0, 2.0, 2.0)


def test_summarize_errors():
    with pytest.raises(ValueError, match="empty"):
        summarize([])
    with pytest.raises(ValueError, match=r"positions \[1, 3\] are NaN or infinite"):
        summarize([1.0, float("nan"), 2.0, float("inf")])
    with pytest.raises(ValueError, match="confidence must lie strictly between 0 and 1"):
        summarize([1, 2], confidence=95)
    with pytest.raises(ValueError, match="flat sequence"):
        summarize([[1, 2], [3, 4]])


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize(
    ("a", "b", "published"),
    [(EX1_A, EX1_B, (-2.46, 24.99, 0.021)), (EX3_A, EX3_B, (-2.22, 24.52, 0.036))],
)
def test_welch_against_hand_computation(a, b, published):
    va, vb = _var(a) / len(a), _var(b) / len(b)
    t_hand = (_mean(a) - _mean(b)) / math.sqrt(va + vb)
    df_hand = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))  # Welch-Satterthwaite
    p_hand = _two_sided_t_p(t_hand, df_hand)
    t, p = welch(a, b)
    assert t == pytest.approx(t_hand, rel=1e-9)
    assert p == pytest.approx(p_hand, rel=1e-7)
    t_pub, df_pub, p_pub = published
    assert t == pytest.approx(t_pub, abs=0.01)
    assert df_hand == pytest.approx(df_pub, abs=0.01)
    assert p == pytest.approx(p_pub, abs=0.001)
    t_swapped, p_swapped = welch(b, a)
    assert (t_swapped, p_swapped) == pytest.approx((-t, p))


def test_welch_undefined_cases():
    with pytest.raises(ValueError, match="at least 2 values, got 1 and 3"):
        welch([1.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="both groups are constant"):
        welch([1.0, 1.0, 1.0], [2.0, 2.0])
    t, p = welch([1.0, 1.0, 1.0], [2.0, 3.0, 4.0])  # one constant group is fine: se comes from the other
    assert t == pytest.approx(-2.0 / math.sqrt(1.0 / 3.0))
    with pytest.raises(ValueError, match=r"welch: b: values at positions \[0\]"):
        welch([1.0, 2.0], [float("nan"), 2.0])


def test_paired_t_hand_example():
    t, p = paired_t(PAIR_A, PAIR_B)
    t_hand = 2.0 / (math.sqrt(0.5) / math.sqrt(5))  # = 2 sqrt(10)
    # Student t CDF in closed form for 4 degrees of freedom: F(t) = 1/2 + 3/8 u (1 - u^2/12), u = t / sqrt(1 + t^2/4)
    u = t_hand / math.sqrt(1 + t_hand**2 / 4)
    p_hand = 2 * (1 - (0.5 + 3 / 8 * u * (1 - u * u / 12)))
    assert t == pytest.approx(2 * math.sqrt(10))
    assert p == pytest.approx(p_hand, rel=1e-9)
    assert round(p, 5) == 0.0032


def test_paired_t_errors():
    with pytest.raises(ValueError, match="equal length, got 3 and 2"):
        paired_t([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 2 pairs, got 1"):
        paired_t([1], [2])
    with pytest.raises(ValueError, match="differences a - b are constant"):
        paired_t([2, 3, 4], [1, 2, 3])


def _exact_wilcoxon_p(diffs):
    # Enumerate all 2^n sign patterns of the ranks (no ties, no zeros): two-sided p = 2 P(W <= w_observed).
    ranks = np.argsort(np.argsort(np.abs(diffs))) + 1
    w_plus = int(sum(r for r, d in zip(ranks, diffs) if d > 0))
    w = min(w_plus, int(ranks.sum()) - w_plus)
    sums = [sum(c) for k in range(len(ranks) + 1) for c in itertools.combinations(ranks.tolist(), k)]
    return w, min(1.0, 2 * sum(s <= w for s in sums) / len(sums))


def test_wilcoxon_exact_small_samples():
    assert wilcoxon([1, 2, 3, 4, 5, 6], [0] * 6) == (0.0, pytest.approx(2 / 64))
    assert wilcoxon([1, 2, 3, 4, 5, 6], [0] * 6)[1] == 0.03125
    diffs = [1.0, 2.0, 3.0, -4.0, 5.0, 6.0]  # W- = 4; 7 of 64 subsets of ranks sum to <= 4
    w_hand, p_hand = _exact_wilcoxon_p(diffs)
    assert (w_hand, p_hand) == (4, 14 / 64)
    assert wilcoxon(diffs, [0.0] * 6) == (4.0, pytest.approx(14 / 64))


def test_wilcoxon_all_zero_and_errors():
    assert wilcoxon([0.3, 0.5, 0.7], [0.3, 0.5, 0.7]) == (0.0, 1.0)
    with pytest.raises(ValueError, match="empty"):
        wilcoxon([], [])
    with pytest.raises(ValueError, match="equal length"):
        wilcoxon([1, 2], [1])


# ---------------------------------------------------------------- Holm


def test_holm_textbook():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_none_monotone_cap():
    assert holm([None, 0.01, None, 0.04]) == [None, pytest.approx(0.02), None, pytest.approx(0.04)]
    assert holm([0.5, 0.6]) == [1.0, 1.0]
    # 0.021 * 2 = 0.042 would undercut 0.02 * 3 = 0.06: the running maximum keeps the order
    assert holm([0.02, 0.021, 0.5]) == pytest.approx([0.06, 0.06, 0.5])
    assert holm([0.01, 0.01]) == pytest.approx([0.02, 0.02])
    assert holm([]) == [] and holm([None]) == [None]
    with pytest.raises(ValueError, match=r"pvalues\[1\] = nan is not a probability"):
        holm([0.1, float("nan")])


# ---------------------------------------------------------------- effect sizes


def test_hedges_g_hand():
    # a: mean 4, var 4; b: mean 2, var 1; pooled var (2*4 + 2*1) / 4 = 2.5; J = 1 - 3 / (4*4 - 1) = 0.8
    assert hedges_g([2, 4, 6], [1, 2, 3]) == pytest.approx(0.8 * 2 / math.sqrt(2.5))
    assert hedges_g([1, 2, 3], [2, 4, 6]) == pytest.approx(-1.0119288, abs=1e-7)
    with pytest.raises(ValueError, match="pooled sd 0"):
        hedges_g([1, 1], [2, 2])
    with pytest.raises(ValueError, match="at least 2 values"):
        hedges_g([1], [2, 3])


def test_cohens_dz_hand():
    assert cohens_dz(PAIR_A, PAIR_B) == pytest.approx(2 / math.sqrt(0.5))
    with pytest.raises(ValueError, match="constant"):
        cohens_dz([2, 3], [1, 2])


# ---------------------------------------------------------------- comparisons


def _seeded(values):
    return dict(enumerate(values))


def test_compare_paired_when_seeds_match():
    c = compare(_seeded(PAIR_A), _seeded(PAIR_B), name="genesis", baseline_name="scratch")
    assert isinstance(c, Comparison)
    assert (c.name, c.baseline, c.n, c.n_baseline, c.paired, c.test) == ("genesis", "scratch", 5, 5, True, "paired t")
    assert c.mean_diff == pytest.approx(2.0)
    assert (c.t, c.p) == (paired_t(PAIR_A, PAIR_B)[0], paired_t(PAIR_A, PAIR_B)[1])
    assert c.paired_p == c.p and c.p_holm == c.p and c.marker == "**"
    assert c.welch_p == welch(PAIR_A, PAIR_B)[1]
    assert c.wilcoxon_p == wilcoxon(PAIR_A, PAIR_B)[1]
    assert (c.effect, c.effect_size) == ("cohen dz", pytest.approx(2 * math.sqrt(2)))


def test_compare_welch_when_seeds_differ():
    values, base = {0: 2.0, 1: 4.0, 2: 6.0}, {0: 1.0, 1: 2.0, 3: 3.0}
    c = compare(values, base)
    assert (c.paired, c.test, c.effect) == (False, "welch t", "hedges g")
    assert (c.t, c.p) == welch([2, 4, 6], [1, 2, 3])
    assert c.welch_p == c.p and c.paired_p is None and c.wilcoxon_p is None
    assert c.effect_size == pytest.approx(hedges_g([2, 4, 6], [1, 2, 3]))
    forced = compare(_seeded(PAIR_A), _seeded(PAIR_B), paired=False)
    assert (forced.paired, forced.test, forced.p) == (False, "welch t", welch(PAIR_A, PAIR_B)[1])


def test_compare_forced_pairing_uses_shared_seeds():
    values = {0: 5.0, 1: 7.0, 2: 9.0, 3: 8.0, 4: 6.0, 9: 100.0}
    c = compare(values, _seeded(PAIR_B), paired=True)
    assert (c.paired, c.n, c.n_baseline) == (True, 6, 5)
    assert c.p == pytest.approx(paired_t(PAIR_A, PAIR_B)[1])
    assert c.mean_diff == pytest.approx(np.mean(list(values.values())) - np.mean(PAIR_B))
    with pytest.raises(ValueError, match=r"paired=True needs at least 2 seeds shared.*got \[0\]"):
        compare({0: 1.0, 1: 2.0}, {0: 1.0, 5: 2.0}, paired=True)


def test_compare_undefined_statistics_are_none():
    same = compare({0: 0.8, 1: 0.8, 2: 0.8}, {0: 0.8, 1: 0.8, 2: 0.8})
    assert (same.t, same.p, same.welch_p, same.effect_size, same.marker) == (None, None, None, None, "")
    assert same.wilcoxon_p == 1.0 and same.mean_diff == 0.0
    shifted = compare({0: 0.9, 1: 0.9, 2: 0.9}, {0: 0.8, 1: 0.8, 2: 0.8})  # constant differences
    assert (shifted.p, shifted.paired_p, shifted.p_holm) == (None, None, None)
    assert shifted.wilcoxon_p == pytest.approx(0.25)  # 3 positive signs: 2 / 2^3
    # 0.3 - 0.2, 0.1 - 0.0, 0.7 - 0.6 differ only by rounding (~1e-17): still constant, not t ~ 1e16 with p ~ 0
    rounded = compare({0: 0.3, 1: 0.1, 2: 0.7}, {0: 0.2, 1: 0.0, 2: 0.6})
    assert (rounded.t, rounded.p, rounded.effect_size) == (None, None, None)
    single = compare({0: 0.5}, {0: 0.4})
    assert (single.paired, single.test, single.p, single.effect_size) == (False, "welch t", None, None)
    assert single.mean_diff == pytest.approx(0.1)


def test_compare_errors():
    with pytest.raises(ValueError, match=r"values of 'volf' has NaN or infinite metrics for seeds \[1\]"):
        compare({0: 0.5, 1: float("nan")}, {0: 0.4, 1: 0.3}, name="volf")
    with pytest.raises(ValueError, match="baseline 'scratch' has no values"):
        compare({0: 0.5}, {}, baseline_name="scratch")


def test_compare_all_holm_across_groups():
    groups = {
        "a": _seeded(PAIR_A),
        "scratch": _seeded(PAIR_B),
        "b": _seeded([4.5, 5.5, 6.0, 6.5, 4.0]),
        "c": {0: 4.0, 1: 5.0},  # fewer seeds: Welch
    }
    result = compare_all(groups, "scratch")
    assert [c.name for c in result] == ["a", "b", "c"]
    assert all(c.baseline == "scratch" for c in result)
    assert [c.paired for c in result] == [True, True, False]
    raw = [compare(groups[n], groups["scratch"]).p for n in ("a", "b", "c")]
    assert [c.p for c in result] == raw
    assert [c.p_holm for c in result] == holm(raw)
    assert [c.marker for c in result] == [marker(q) for q in holm(raw)]
    assert result[0].p_holm == pytest.approx(3 * result[0].p)  # the smallest p is multiplied by m = 3
    with pytest.raises(ValueError, match=r"baseline 'scratch' is not among the groups \['a'\]"):
        compare_all({"a": {0: 1.0}}, "scratch")
    assert compare_all({"scratch": {0: 1.0}}, "scratch") == []


# ---------------------------------------------------------------- label efficiency

CURVE = {1.0: 0.9, 0.1: 0.5, 0.5: 0.8, 0.25: 0.6}  # unsorted on purpose


@pytest.mark.parametrize(
    ("target", "expected"),
    [(0.7, 0.25 + 0.25 * (0.7 - 0.6) / (0.8 - 0.6)),  # interpolated between 0.25 and 0.5 -> 0.375
     (0.8, 0.5),  # reached exactly at a measured fraction
     (0.4, 0.1),  # already at the smallest fraction: upper bound
     (0.9, 1.0),
     (0.95, None)],
)
def test_label_efficiency_higher_is_better(target, expected):
    result = label_efficiency(CURVE, target)
    assert result == (None if expected is None else pytest.approx(expected))


def test_label_efficiency_lower_is_better_and_first_crossing():
    # e.g. a distance metric: 10 at 10 % labels, 6 at 50 %; target 8 -> 0.1 + 0.4 * (8 - 10) / (6 - 10) = 0.3
    assert label_efficiency({0.1: 10.0, 0.5: 6.0, 1.0: 4.0}, 8.0, higher_is_better=False) == pytest.approx(0.3)
    assert label_efficiency({0.1: 10.0, 1.0: 9.0}, 8.0, higher_is_better=False) is None
    # a non-monotone curve: the first crossing counts (0.1 + 0.1 * 0.2 / 0.25 = 0.18)
    assert label_efficiency({0.1: 0.5, 0.2: 0.75, 0.5: 0.6, 1.0: 0.9}, 0.7) == pytest.approx(0.18)


def test_label_efficiency_errors():
    with pytest.raises(ValueError, match="curve is empty"):
        label_efficiency({}, 0.5)
    with pytest.raises(ValueError, match=r"label fraction 1.5 is outside \(0, 1\]"):
        label_efficiency({0.5: 0.5, 1.5: 0.9}, 0.5)
    with pytest.raises(ValueError, match="metric at fraction 0.5 is nan"):
        label_efficiency({0.5: float("nan")}, 0.5)
    with pytest.raises(ValueError, match="target must be a finite number"):
        label_efficiency({0.5: 0.5}, float("nan"))


# ---------------------------------------------------------------- detectable difference


def test_detectable_difference_against_t_quantiles_by_hand():
    from scipy import stats as sps

    from medtransfer.bench.stats import detectable_difference

    # n = 5 trials, m = 3 comparisons: Bonferroni level 0.05 / 3, two-sided, so the 1 - 0.05 / 6 quantile of t(4)
    expected = (sps.t.ppf(1 - 0.05 / 6, 4) + sps.t.ppf(0.8, 4)) * 0.04 / math.sqrt(5)
    assert detectable_difference(0.04, 5, m=3) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx((3.9608 + 0.9410) * 0.04 / math.sqrt(5), abs=1e-4)  # printed t tables
    # m = 1, n = 10: the classic (t_.975,9 + t_.8,9) = 2.2622 + 0.8834
    assert detectable_difference(1.0, 10) == pytest.approx((2.2622 + 0.8834) / math.sqrt(10), abs=1e-4)
    # more comparisons or a higher power need a larger effect; more trials a smaller one
    assert detectable_difference(0.04, 5, m=4) > detectable_difference(0.04, 5, m=3)
    assert detectable_difference(0.04, 5, m=3, power=0.9) > detectable_difference(0.04, 5, m=3)
    assert detectable_difference(0.04, 8, m=3) < detectable_difference(0.04, 5, m=3)


def test_detectable_difference_has_about_the_stated_power():
    from scipy import stats as sps

    from medtransfer.bench.stats import detectable_difference

    # the exact power of a paired t-test at that true difference (noncentral t) is close to the stated 80%
    for n, m in ((5, 3), (8, 2), (20, 1)):
        delta = detectable_difference(1.0, n, m=m)
        crit = sps.t.ppf(1 - 0.05 / (2 * m), n - 1)
        power = sps.nct.sf(crit, n - 1, delta * math.sqrt(n)) + sps.nct.cdf(-crit, n - 1, delta * math.sqrt(n))
        assert 0.75 < power < 0.85, (n, m, power)


def test_detectable_difference_undefined_and_errors():
    from medtransfer.bench.stats import detectable_difference

    assert detectable_difference(None, 5) is None
    assert detectable_difference(0.1, 1) is None
    with pytest.raises(ValueError, match="m \\(the number of comparisons\\)"):
        detectable_difference(0.1, 5, m=0)
    with pytest.raises(ValueError, match="alpha and power"):
        detectable_difference(0.1, 5, power=1.0)
    with pytest.raises(ValueError, match="sd must be"):
        detectable_difference(float("nan"), 5)


def test_compare_all_reports_the_sd_of_the_differences_and_the_detectable_effect():
    from scipy import stats as sps

    base = {0: 0.50, 1: 0.60, 2: 0.55, 3: 0.58}
    groups = {"scratch": base, "a": {0: 0.60, 1: 0.62, 2: 0.70, 3: 0.61},
              "b": {0: 0.52, 1: 0.61, 2: 0.50, 3: 0.60}, "c": {0: 0.5, 1: 0.6}}  # c: other seeds -> Welch
    by_name = {c.name: c for c in compare_all(groups, "scratch")}
    diffs = [0.10, 0.02, 0.15, 0.03]
    sd = _var(diffs) ** 0.5
    assert by_name["a"].diff_sd == pytest.approx(sd, rel=1e-9) and by_name["a"].n_pairs == 4
    # three comparisons have a p-value, so Holm's first step is at 0.05 / 3
    assert by_name["a"].detectable == pytest.approx((sps.t.ppf(1 - 0.05 / 6, 3) + sps.t.ppf(0.8, 3)) * sd / 2)
    assert by_name["c"].paired is False and by_name["c"].diff_sd is None and by_name["c"].detectable is None
    # a single comparison: m = 1
    single = compare(groups["a"], base)
    assert single.detectable == pytest.approx((sps.t.ppf(0.975, 3) + sps.t.ppf(0.8, 3)) * sd / 2)
