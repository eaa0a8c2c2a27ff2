"""The one rule for "is this difference real?": the pooled seed noise and the significance test.

The ladder's decisions (`sweeps.engine.ladder`) and the report's recommendation for any sweep
(`dashboards.choices`) both use it, so a sweep's report and its ladder never disagree about noise:

- the seed noise is the pooled sample standard deviation ``s = sqrt(sum (n_i - 1) s_i^2 / sum (n_i - 1))``
  over every configuration run with two or more seeds, with ``dof = sum (n_i - 1)`` degrees of freedom;
- a candidate is compared with an incumbent by its gain ``d`` (candidate mean minus incumbent mean,
  sign-flipped for a minimised metric) and the standard error of that difference of two means,
  ``se = s * sqrt(1/n_cand + 1/n_inc)`` (`compare`);
- it is a **gain** when the lower confidence bound ``d - t * se`` is above ``min_delta``, with ``t`` the
  Student-t quantile at ``1 - alpha / (comparisons * looks)`` for ``dof`` degrees of freedom: a
  Bonferroni split of the false-gain rate ``alpha`` over every comparison a ladder can make and every
  look at one comparison (one per added seed), so on pure noise the chance that a whole ladder calls
  any gain is at most ``alpha``;
- it is **no gain** when the one-sided ``1 - alpha`` upper confidence bound ``d + t' * se`` is at or
  below ``min_delta``: the gain is clearly smaller than the margin that matters (with ``min_delta = 0``:
  the candidate is clearly worse). A wrong "no gain" can only cost a real gain, never make a false
  one, so this bound is not split;
- otherwise it is **undecided**: the ladder adds a seed to both sides and looks again, up to its
  maximum seeds, where an undecided comparison counts as no gain;
- the noise band of the best configuration is every configuration the best is not a gain over, with
  the same split: the ladder's own (choosing a larger rank over a smaller one is a claim of a gain),
  or for the report of any sweep the best's comparisons with every other configuration.

The Student-t quantile is computed here (`t_quantile`: the regularized incomplete beta function by
its continued fraction, inverted by bisection), so nothing beyond the standard library is needed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

DEFAULT_ALPHA = 0.05
DEFAULT_MIN_DELTA = 0.0

Verdict = Literal["gain", "no gain", "undecided"]
GAIN: Verdict = "gain"
NO_GAIN: Verdict = "no gain"
UNDECIDED: Verdict = "undecided"

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_MIN_DELTA",
    "GAIN",
    "NO_GAIN",
    "UNDECIDED",
    "Comparison",
    "Verdict",
    "cheapest_in_band",
    "compare",
    "mean",
    "pooled_std",
    "rule_text",
    "std",
    "sum_of_squares",
    "t_cdf",
    "t_quantile",
]


# --------------------------------------------------------------------------- the seed noise


def mean(values: Sequence[float]) -> float | None:
    """The mean (``math.fsum``: exact to the last bit, and far faster than `statistics`); None when empty."""
    return math.fsum(values) / len(values) if values else None


def sum_of_squares(values: Sequence[float]) -> float:
    """``sum (x - mean)^2`` by two passes (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    m = math.fsum(values) / len(values)
    return math.fsum((x - m) ** 2 for x in values)


def std(values: Sequence[float]) -> float | None:
    """The sample standard deviation (n - 1); None for fewer than two values."""
    return math.sqrt(sum_of_squares(values) / (len(values) - 1)) if len(values) >= 2 else None


def pooled_std(groups: Iterable[Sequence[float]]) -> tuple[float | None, int]:
    """The pooled seed standard deviation over the groups (one per configuration) with two or more
    values, and its degrees of freedom; ``(None, 0)`` when no group has two values."""
    ss, dof = 0.0, 0
    for values in groups:
        if len(values) >= 2:
            ss += sum_of_squares(values)
            dof += len(values) - 1
    return (math.sqrt(ss / dof), dof) if dof else (None, 0)


# --------------------------------------------------------------------------- Student's t


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz evaluation), which
    converges quickly for ``x < (a + 1) / (a + b + 2)``."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    out = d
    for m in range(1, 1000):
        # the even step: m (b - m) x / ((a + 2m - 1)(a + 2m)), then the odd one
        for coef in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                     -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + coef * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + coef / c
            c = c if abs(c) > tiny else tiny
            out *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return out


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)`` for ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, dof: float) -> float:
    """P(T <= t) for Student's t with ``dof`` degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _betainc(dof / 2.0, 0.5, dof / (dof + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


@functools.lru_cache(maxsize=4096)
def t_quantile(p: float, dof: float) -> float:
    """The ``p`` quantile of Student's t with ``dof`` degrees of freedom (``t_quantile(0.975, 10)`` is
    2.228): the root of ``t_cdf(t) = p``, by bisection on ``x = dof / (dof + t^2)`` in (0, 1], where the
    upper tail ``I_x(dof/2, 1/2) / 2`` is monotone; accurate to about 1e-12 relative."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if dof <= 0:
        raise ValueError(f"dof must be positive, got {dof}")
    if p == 0.5:
        return 0.0
    tail = 1.0 - p if p > 0.5 else p  # the wanted P(T > |t|)
    lo, hi = 0.0, 1.0                 # x = 0: t = inf (tail 0); x = 1: t = 0 (tail 1/2)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 0.5 * _betainc(dof / 2.0, 0.5, mid) < tail:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    x = 0.5 * (lo + hi)
    t = math.sqrt(dof * (1.0 - x) / x)
    return t if p > 0.5 else -t


# --------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class Comparison:
    """The verdict on candidate vs incumbent and its evidence (`compare`)."""

    verdict: Verdict
    gain: float | None            # candidate mean - incumbent mean, positive = better (either direction)
    se: float | None              # standard error of that difference
    t: float | None               # the gain quantile (split over comparisons and looks)
    t_no_gain: float | None       # the quantile of the no-gain bound (one-sided 1 - alpha)
    threshold: float | None       # a gain needs gain > threshold = min_delta + t * se
    lower: float | None           # gain - t * se
    upper: float | None           # gain + t_no_gain * se; no gain when <= min_delta
    evidence: dict[str, Any] = field(default_factory=dict)
    text: str = ""


def _level(alpha: float, comparisons: int, looks: int) -> float:
    return alpha / (max(1, comparisons) * max(1, looks))


def compare(candidate: Sequence[float], incumbent: Sequence[float], pooled: float | None, dof: int, *,
            maximize: bool = True, alpha: float = DEFAULT_ALPHA, min_delta: float = DEFAULT_MIN_DELTA,
            comparisons: int = 1, looks: int = 1) -> Comparison:
    """Is ``candidate`` better than ``incumbent`` (their seed values), given the pooled seed std and its
    degrees of freedom (`pooled_std` over every configuration seen)? The rule of the module docstring:
    gain when ``gain - t * se > min_delta`` with ``t`` at ``1 - alpha / (comparisons * looks)``; no gain
    when ``gain + t' * se <= min_delta`` with ``t'`` at ``1 - alpha``; else undecided. ``comparisons``:
    how many comparisons the caller may make in all (a ladder's rungs and wider target sets);
    ``looks``: how many times it may look at this one (once per added seed)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    n_c, n_i = len(candidate), len(incumbent)
    level = _level(alpha, comparisons, looks)
    base: dict[str, Any] = {"candidate_mean": mean(candidate), "incumbent_mean": mean(incumbent),
                            "candidate_n": n_c, "incumbent_n": n_i, "pooled_std": pooled, "dof": dof,
                            "alpha": alpha, "comparisons": comparisons, "looks": looks, "level": level,
                            "min_delta": min_delta, "maximize": maximize}
    if not n_c or not n_i:
        why = "the candidate has no result" if not n_c else "the incumbent has no result"
        verdict: Verdict = NO_GAIN if not n_c else UNDECIDED
        return Comparison(verdict, None, None, None, None, None, None, None,
                          {**base, "verdict": verdict, "gain": None, "se": None, "t": None, "t_no_gain": None,
                           "threshold": None, "lower": None, "upper": None}, f"{why} -> {verdict}")
    diff = base["candidate_mean"] - base["incumbent_mean"]
    gain = diff if maximize else -diff
    if pooled is None or dof < 1:
        evidence = {**base, "verdict": UNDECIDED, "gain": gain, "se": None, "t": None, "t_no_gain": None,
                    "threshold": None, "lower": None, "upper": None}
        return Comparison(UNDECIDED, gain, None, None, None, None, None, None, evidence,
                          f"{_signed(gain)}, but no seed noise is measured yet (no configuration has two "
                          "results) -> undecided")
    se = pooled * math.sqrt(1.0 / n_c + 1.0 / n_i)
    t = t_quantile(1.0 - level, dof)
    t_no = t_quantile(1.0 - alpha, dof)
    lower, upper, threshold = gain - t * se, gain + t_no * se, min_delta + t * se
    verdict = GAIN if lower > min_delta else NO_GAIN if upper <= min_delta else UNDECIDED
    evidence = {**base, "verdict": verdict, "gain": gain, "se": se, "t": t, "t_no_gain": t_no,
                "threshold": threshold, "lower": lower, "upper": upper}
    floor = f"min_delta {min_delta:.4g}" if min_delta else "0"
    if verdict == GAIN:
        why = f"lower bound {lower:.4g} > {floor}"
    elif verdict == NO_GAIN:
        why = f"upper bound {upper:.4g} <= {floor}"
    else:
        why = f"lower bound {lower:.4g} <= {floor} < upper bound {upper:.4g}"
    text = (f"{_signed(gain)} vs threshold {threshold:.4g} (t {t:.3g} x SE {se:.4g}, pooled std {pooled:.4g}, "
            f"{dof} dof, n {n_c} vs {n_i}); {why} -> {verdict}")
    return Comparison(verdict, gain, se, t, t_no, threshold, lower, upper, evidence, text)


def cheapest_in_band(groups: Sequence[Sequence[float]], costs: Sequence[tuple[float | None, float | None]],
                     best: int, *, maximize: bool = True) -> tuple[int, list[int]] | None:
    """The recommendation of a sweep without a ladder, shared by the report (`dashboards.choices`) and
    the end of a sweep (`sweeps.engine.selection.held_out_choices`): among the configurations (``groups``:
    each one's seed values; ``costs``: each one's (trainable parameters, train seconds)) that
    configuration ``best`` is not a significant gain over (`compare`, seed std pooled over every
    group, the false-gain rate split over the best's comparisons with every other group), the one with
    the fewest trainable parameters, then the shortest train time, then the better mean (ties: the
    earlier group). Returns (its index, the band's indices in order), or None when no group has two
    seeds (no noise is measured, so there is no band)."""
    pooled, dof = pooled_std(groups)
    if pooled is None:
        return None
    comparisons = max(1, len(groups) - 1)
    inside = [i for i, values in enumerate(groups)
              if i == best or compare(groups[best], values, pooled, dof, maximize=maximize,
                                      comparisons=comparisons).verdict != GAIN]

    def cost_key(i: int) -> tuple[float, float, float]:
        params, train = costs[i]
        m = mean(groups[i])
        m = 0.0 if m is None else m
        return (math.inf if params is None else params, math.inf if train is None else train, -m if maximize else m)

    return min(inside, key=cost_key), inside


def rule_text(alpha: float = DEFAULT_ALPHA, min_delta: float = DEFAULT_MIN_DELTA) -> str:
    """The rule in words, for reports and decisions."""
    floor = f"min_delta {min_delta:g}" if min_delta else "0"
    return (f"a difference of seed means counts when its one-sided lower confidence bound (Student t on the "
            f"pooled seed std, SE of a difference of two means, false-gain rate {alpha:g}) is above {floor}")


def _signed(x: float) -> str:
    return f"gain {'+' if x >= 0 else ''}{x:.4g}"
