"""The one significance rule (sweeps.stats): the Student-t quantile against table values, the pooled
seed std, and `compare`'s three verdicts with their evidence, checked by hand and by simulation."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from sweeps import stats

# two-sided 95% (p = 0.975) and other one-sided quantiles from standard t tables (3 decimals)
TABLE = [(0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 3, 3.182), (0.975, 5, 2.571), (0.975, 10, 2.228),
         (0.975, 30, 2.042), (0.95, 1, 6.314), (0.95, 4, 2.132), (0.95, 20, 1.725), (0.995, 2, 9.925),
         (0.995, 8, 3.355), (0.999, 1, 318.309), (0.999, 5, 5.893), (0.9995, 10, 4.587), (0.9, 1, 3.078)]


@pytest.mark.parametrize(("p", "dof", "expected"), TABLE)
def test_t_quantile_matches_the_tables(p: float, dof: int, expected: float) -> None:
    assert stats.t_quantile(p, dof) == pytest.approx(expected, abs=0.0005)
    assert stats.t_quantile(1 - p, dof) == pytest.approx(-expected, abs=0.0005)  # symmetric


def test_t_quantile_closed_forms_and_its_cdf() -> None:
    for p in (0.6, 0.9, 0.975, 0.999, 0.99999):
        # 1 dof (Cauchy): tan(pi (p - 1/2)); 2 dof: (2p - 1) / sqrt(2 p (1 - p))
        assert stats.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
        assert stats.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
        for dof in (3, 7, 50):
            assert stats.t_cdf(stats.t_quantile(p, dof), dof) == pytest.approx(p, abs=1e-12)
    assert stats.t_quantile(0.975, 100_000) == pytest.approx(1.959964, abs=1e-4)  # the normal limit
    assert stats.t_quantile(0.5, 3) == 0.0
    with pytest.raises(ValueError):
        stats.t_quantile(1.0, 3)


def test_pooled_std_weights_by_degrees_of_freedom() -> None:
    groups = [[1.0, 3.0], [10.0, 11.0, 12.0], [7.0]]  # the single value adds nothing
    pooled, dof = stats.pooled_std(groups)
    assert dof == 3
    assert pooled == pytest.approx(math.sqrt((1 * 2.0 + 2 * 1.0) / 3), rel=1e-12)
    assert stats.pooled_std([[1.0], []]) == (None, 0)
    assert stats.std([1.0, 2.0, 4.0]) == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]), rel=1e-14)


def test_compare_uses_the_se_of_a_difference_and_a_split_t_quantile() -> None:
    cand, inc = [0.80, 0.82, 0.81], [0.70, 0.72]
    pooled, dof = stats.pooled_std([cand, inc])
    c = stats.compare(cand, inc, pooled, dof, comparisons=3, looks=2)
    se = pooled * math.sqrt(1 / 3 + 1 / 2)
    t = stats.t_quantile(1 - 0.05 / 6, dof)
    assert dof == 3 and c.se == pytest.approx(se, rel=1e-12) and c.t == pytest.approx(t, rel=1e-12)
    assert c.gain == pytest.approx(0.10, abs=1e-12) and c.threshold == pytest.approx(t * se, rel=1e-12)
    assert c.verdict == stats.GAIN and c.lower == pytest.approx(0.10 - t * se, rel=1e-9) and c.lower > 0
    ev = json.loads(json.dumps(c.evidence))  # plain JSON
    assert ev["level"] == pytest.approx(0.05 / 6) and ev["candidate_n"] == 3 and ev["incumbent_n"] == 2
    assert ev["dof"] == 3 and ev["verdict"] == "gain" and "-> gain" in c.text and "3 dof" in c.text


def test_compare_no_gain_undecided_and_the_direction() -> None:
    pooled, dof = 0.01, 6
    worse = stats.compare([0.60, 0.61], [0.70, 0.71], pooled, dof)
    assert worse.verdict == stats.NO_GAIN and worse.upper is not None and worse.upper <= 0
    assert worse.upper == pytest.approx(-0.10 + stats.t_quantile(0.95, 6) * 0.01, rel=1e-9)
    close = stats.compare([0.705, 0.715], [0.70, 0.71], pooled, dof)
    assert close.verdict == stats.UNDECIDED and close.lower < 0 < close.upper  # type: ignore[operator]
    # a minimised metric (a loss): lower is better, the gain is the incumbent minus the candidate
    loss = stats.compare([1.0, 1.01], [1.2, 1.21], pooled, dof, maximize=False)
    assert loss.verdict == stats.GAIN and loss.gain == pytest.approx(0.2, abs=1e-12)
    # no seed noise measured yet: undecided, whatever the gap
    assert stats.compare([5.0], [1.0], None, 0).verdict == stats.UNDECIDED
    # the candidate has no result at all: no gain
    assert stats.compare([], [1.0, 1.1], pooled, dof).verdict == stats.NO_GAIN


def test_the_margin_is_what_a_gain_must_clear() -> None:
    pooled, dof = 0.001, 10
    small = stats.compare([0.705, 0.706], [0.70, 0.701], pooled, dof, margin=0.01)
    assert small.verdict == stats.NO_GAIN  # clearly a gain, but clearly below 0.01
    assert stats.compare([0.705, 0.706], [0.70, 0.701], pooled, dof).verdict == stats.GAIN  # without the floor
    big = stats.compare([0.75, 0.751], [0.70, 0.701], pooled, dof, margin=0.01)
    assert big.verdict == stats.GAIN and big.threshold == pytest.approx(0.01 + big.t * big.se, rel=1e-12)  # type: ignore[operator]
    # zero noise: the threshold is the margin itself
    flat = stats.compare([0.605, 0.605], [0.6, 0.6], 0.0, 2, margin=0.01)
    assert flat.threshold == 0.01 and flat.verdict == stats.NO_GAIN


def test_one_look_calls_a_gain_on_equal_means_at_its_level() -> None:
    """Two configurations of 2 seeds from N(0, 1), the std pooled over both (2 dof): one look of the
    test at level 0.05 calls a gain 5% of the time (the old rule: 14.6%)."""
    rng = random.Random(7)
    n, gains = 40_000, 0
    for _ in range(n):
        a, b = [rng.gauss(0, 1) for _ in range(2)], [rng.gauss(0, 1) for _ in range(2)]
        pooled, dof = stats.pooled_std([a, b])
        gains += stats.compare(a, b, pooled, dof).verdict == stats.GAIN
    rate = gains / n
    assert abs(rate - 0.05) <= 3 * math.sqrt(0.05 * 0.95 / n)  # 3 binomial standard errors: 0.0033


# --------------------------------------------------------------------------- the margin's three verdicts


def test_gain_equivalence_and_undecided_against_the_margin() -> None:
    pooled, dof, m = 0.005, 20, 0.01
    # +0.03 with SE 0.005: the lower bound is above the margin -> gain
    gain = stats.compare([0.73, 0.73], [0.70, 0.70], pooled, dof, margin=m)
    assert gain.verdict == stats.GAIN and gain.lower > m  # type: ignore[operator]
    # +0.001: the upper bound (one-sided 95%, unsplit) is below the margin -> no gain, shown (a plateau)
    flat = stats.compare([0.701, 0.701], [0.70, 0.70], pooled, dof, margin=m)
    t_no = stats.t_quantile(0.95, dof)
    assert flat.verdict == stats.NO_GAIN and flat.upper == pytest.approx(0.001 + t_no * pooled, rel=1e-9)
    assert flat.upper <= m and "shown below it" in flat.text  # type: ignore[operator]
    # +0.01 exactly: neither bound clears the margin -> undecided
    mid = stats.compare([0.71, 0.71], [0.70, 0.70], pooled, dof, margin=m)
    assert mid.verdict == stats.UNDECIDED and mid.lower <= m < mid.upper  # type: ignore[operator]
    # the same flat difference is undecided with a margin of 0: "not shown different" is not "equal"
    assert stats.compare([0.701, 0.701], [0.70, 0.70], pooled, dof, margin=0.0).verdict == stats.UNDECIDED


def test_non_inferiority_needs_the_lower_bound_above_minus_the_margin() -> None:
    pooled, dof, m = 0.002, 20, 0.01
    t = stats.t_quantile(1 - 0.05 / 3, dof)  # split over 3 cheaper configurations tested
    se = pooled * math.sqrt(1 / 2 + 1 / 2)
    close = stats.noninferior([0.698, 0.698], [0.70, 0.70], pooled, dof, margin=m, comparisons=3)
    assert close.verdict == stats.NON_INFERIOR and close.lower == pytest.approx(-0.002 - t * se, rel=1e-9)
    assert close.lower > -m  # type: ignore[operator]
    far = stats.noninferior([0.66, 0.66], [0.70, 0.70], pooled, dof, margin=m, comparisons=3)
    assert far.verdict == stats.INFERIOR and far.upper <= -m  # type: ignore[operator]
    unsure = stats.noninferior([0.692, 0.692], [0.70, 0.70], pooled, dof, margin=m, comparisons=3)
    assert unsure.verdict == stats.UNDECIDED and unsure.lower <= -m < unsure.upper  # type: ignore[operator]
    # minimised metrics: lower is better, the same rule on the sign-flipped difference
    loss = stats.noninferior([1.001, 1.001], [1.0, 1.0], pooled, dof, maximize=False, margin=m)
    assert loss.verdict == stats.NON_INFERIOR and loss.gain == pytest.approx(-0.001)


def test_recommend_the_cheapest_shown_within_the_margin_else_the_best() -> None:
    groups = [[0.700, 0.706], [0.690, 0.694], [0.740, 0.744], [0.742, 0.748]]
    costs = [(100.0, 1.0), (50.0, 1.0), (400.0, 1.0), (800.0, 1.0)]   # index 1 is the cheapest, 3 the best
    far = stats.recommend(groups, costs, 3, margin=0.01)
    assert far is not None and far.index == 3 and "the best itself" in far.text
    assert set(far.verdicts) == {0, 1, 2}  # every cheaper configuration was tested
    assert far.verdicts[2].verdict != stats.INFERIOR and far.verdicts[1].verdict == stats.INFERIOR
    near = stats.recommend(groups, costs, 3, margin=0.1)  # a user to whom 0.1 is what matters
    assert near is not None and near.index == 1 and near.verdicts[1].verdict == stats.NON_INFERIOR
    # excluded (a decided gain put it outside the margin): never recommended, not tested
    skip = stats.recommend(groups, costs, 3, margin=0.1, exclude=[1])
    assert skip is not None and skip.index == 0 and 1 not in skip.verdicts
    assert stats.recommend([[0.7], [0.8]], costs[:2], 1, margin=0.01) is None  # no noise measured


def test_the_demos_case_cannot_recommend_what_the_evidence_puts_outside_the_margin() -> None:
    # the built-in demo of issue 22: all-linear at r=1 (0.6662) is a decided gain over q,v at r=1 (0.6213);
    # r=2 q,v (0.6327) is cheaper; the seed std about 0.006. The old band rule recommended r=2 q,v;
    # by non-inferiority its difference to the best, -0.0335, is far outside a margin of 0.01
    groups = [[0.618, 0.6246], [0.6297, 0.6357], [0.6632, 0.6692]]
    costs = [(5_000.0, 1.0), (6_000.0, 1.0), (30_000.0, 1.0)]
    rec = stats.recommend(groups, costs, 2, margin=0.01)
    assert rec is not None and rec.index == 2
    assert rec.verdicts[1].verdict == stats.INFERIOR and rec.verdicts[1].upper < -0.01  # type: ignore[operator]
