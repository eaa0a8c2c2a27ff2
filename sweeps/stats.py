"""The one rule for "does this difference matter?": the pooled seed noise, one margin, three verdicts.

The ladder's decisions (`sweeps.engine.ladder`) and the recommendation of any sweep (the report,
`dashboards.choices`, and the end of a sweep, `sweeps.engine.selection`) all use it, so a sweep's
report and its ladder never disagree:

- the seed noise is the pooled sample standard deviation ``s = sqrt(sum (n_i - 1) s_i^2 / sum (n_i - 1))``
  over every configuration run with two or more seeds, with ``dof = sum (n_i - 1)`` degrees of freedom;
- a candidate is compared with an incumbent by its gain ``d`` (candidate mean minus incumbent mean,
  sign-flipped for a minimised metric) and the standard error of that difference of two means,
  ``se = s * sqrt(1/n_cand + 1/n_inc)``;
- the **margin** ``m`` is the smallest difference that matters, in the objective's units (one point of
  accuracy: 0.01), stated by the user (``search.margin``) or the metric's default (`default_margin`).
  Every verdict is *shown* by a confidence bound against it, never assumed:
- `compare`: a **gain** when the lower bound ``d - t * se`` is above ``m``, with ``t`` the Student-t
  quantile at ``1 - alpha / (comparisons * looks)`` for ``dof`` degrees of freedom (a Bonferroni split
  of the false-gain rate ``alpha`` over every comparison a ladder can make and every look at one, one
  per added seed, so on pure noise a whole ladder calls any gain at most that often); **no gain**
  (equivalence: a plateau) when the one-sided ``1 - alpha`` upper bound ``d + t' * se`` is at or below
  ``m``: the gain is shown smaller than the margin; otherwise **undecided** (more seeds, where the
  caller can add them);
- `noninferior`: a cheaper configuration is **non-inferior** to the best when the lower bound of its
  difference to the best, ``d - t * se`` (``t`` split over every cheaper configuration tested and every
  look), is above ``-m``: shown within the margin; **inferior** when the one-sided upper bound
  ``d + t' * se`` is at or below ``-m``: shown worse by more than it; else undecided;
- `recommend`: the recommendation is the cheapest configuration shown non-inferior to the best, else
  the best itself. "Not shown different" is never "as good": with two to four seeds almost anything is
  not shown different.

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

# The margin: the smallest difference that matters, in the objective's units, when the sweep does not
# state one (``search.margin``): one point of accuracy, F1 or exact match; 0.01 of a loss (nats);
# 0.1 of perplexity.
DEFAULT_MARGINS = {"accuracy": 0.01, "macro_f1": 0.01, "exact_match": 0.01, "eval_loss": 0.01, "perplexity": 0.1}

Verdict = Literal["gain", "no gain", "undecided", "non-inferior", "inferior"]
GAIN: Verdict = "gain"
NO_GAIN: Verdict = "no gain"
UNDECIDED: Verdict = "undecided"
NON_INFERIOR: Verdict = "non-inferior"
INFERIOR: Verdict = "inferior"

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_MARGINS",
    "GAIN",
    "INFERIOR",
    "NON_INFERIOR",
    "NO_GAIN",
    "UNDECIDED",
    "Comparison",
    "Recommendation",
    "Verdict",
    "compare",
    "cost_order",
    "default_margin",
    "mean",
    "noninferior",
    "pooled_std",
    "recommend",
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
    """A verdict and its evidence (`compare`, `noninferior`)."""

    verdict: Verdict
    gain: float | None            # candidate mean - incumbent mean, positive = better (either direction)
    se: float | None              # standard error of that difference
    t: float | None               # the quantile of the claim's bound (split over comparisons and looks)
    t_no_gain: float | None       # the quantile of the other bound (one-sided 1 - alpha)
    threshold: float | None       # compare: a gain needs gain > threshold = margin + t * se;
                                  # noninferior: it needs gain > threshold = -margin + t * se
    lower: float | None           # gain - t * se
    upper: float | None           # gain + t_no_gain * se
    evidence: dict[str, Any] = field(default_factory=dict)
    text: str = ""


def _level(alpha: float, comparisons: int, looks: int) -> float:
    return alpha / (max(1, comparisons) * max(1, looks))


def default_margin(metric: str) -> float:
    """The margin of a metric when the sweep states none (`DEFAULT_MARGINS`; 0.01 for any other)."""
    return DEFAULT_MARGINS.get(metric, 0.01)


def _bounds(candidate: Sequence[float], incumbent: Sequence[float], pooled: float | None, dof: int, *,
            maximize: bool, alpha: float, margin: float, comparisons: int, looks: int,
            kind: str) -> tuple[dict[str, Any], float | None, float | None, float | None, float | None, str | None]:
    """The shared part of both tests: (evidence so far, gain, se, t, t', why no bound can be drawn)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not margin >= 0.0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    n_c, n_i = len(candidate), len(incumbent)
    level = _level(alpha, comparisons, looks)
    base: dict[str, Any] = {"test": kind, "candidate_mean": mean(candidate), "incumbent_mean": mean(incumbent),
                            "candidate_n": n_c, "incumbent_n": n_i, "pooled_std": pooled, "dof": dof,
                            "alpha": alpha, "comparisons": comparisons, "looks": looks, "level": level,
                            "margin": margin, "maximize": maximize}
    if not n_c or not n_i:
        return base, None, None, None, None, ("the candidate has no result" if not n_c else
                                              "the incumbent has no result")
    diff = base["candidate_mean"] - base["incumbent_mean"]
    gain = diff if maximize else -diff
    if pooled is None or dof < 1:
        return base, gain, None, None, None, (f"{_signed(gain)}, but no seed noise is measured yet (no "
                                              "configuration has two results)")
    se = pooled * math.sqrt(1.0 / n_c + 1.0 / n_i)
    return base, gain, se, t_quantile(1.0 - level, dof), t_quantile(1.0 - alpha, dof), None


def compare(candidate: Sequence[float], incumbent: Sequence[float], pooled: float | None, dof: int, *,
            maximize: bool = True, alpha: float = DEFAULT_ALPHA, margin: float = 0.0,
            comparisons: int = 1, looks: int = 1) -> Comparison:
    """Is ``candidate`` better than ``incumbent`` (their seed values) by more than ``margin``, given the
    pooled seed std and its degrees of freedom (`pooled_std` over every configuration seen)? The rule of
    the module docstring: gain when ``gain - t * se > margin`` with ``t`` at ``1 - alpha / (comparisons
    * looks)``; no gain when ``gain + t' * se <= margin`` with ``t'`` at ``1 - alpha``; else undecided.
    ``comparisons``: how many comparisons the caller may make in all (a ladder's rungs and wider target
    sets); ``looks``: how many times it may look at this one (once per added seed)."""
    base, gain, se, t, t_no, why_not = _bounds(candidate, incumbent, pooled, dof, maximize=maximize, alpha=alpha,
                                               margin=margin, comparisons=comparisons, looks=looks, kind="gain")
    empty = {"gain": gain, "se": None, "t": None, "t_no_gain": None, "threshold": None, "lower": None, "upper": None}
    if why_not is not None:
        verdict: Verdict = NO_GAIN if not base["candidate_n"] else UNDECIDED
        return Comparison(verdict, gain, None, None, None, None, None, None, {**base, **empty, "verdict": verdict},
                          f"{why_not} -> {verdict}")
    assert gain is not None and se is not None and t is not None and t_no is not None
    lower, upper, threshold = gain - t * se, gain + t_no * se, margin + t * se
    verdict = GAIN if lower > margin else NO_GAIN if upper <= margin else UNDECIDED
    evidence = {**base, "verdict": verdict, "gain": gain, "se": se, "t": t, "t_no_gain": t_no,
                "threshold": threshold, "lower": lower, "upper": upper}
    floor = f"the margin {margin:.4g}"
    why = (f"lower bound {lower:.4g} > {floor}" if verdict == GAIN else
           f"upper bound {upper:.4g} <= {floor}: shown below it" if verdict == NO_GAIN else
           f"lower bound {lower:.4g} <= {floor} < upper bound {upper:.4g}")
    text = (f"{_signed(gain)} vs threshold {threshold:.4g} (t {t:.3g} x SE {se:.4g}, pooled std {pooled:.4g}, "
            f"{dof} dof, n {base['candidate_n']} vs {base['incumbent_n']}); {why} -> {verdict}")
    return Comparison(verdict, gain, se, t, t_no, threshold, lower, upper, evidence, text)


def noninferior(candidate: Sequence[float], best: Sequence[float], pooled: float | None, dof: int, *,
                maximize: bool = True, alpha: float = DEFAULT_ALPHA, margin: float = 0.0,
                comparisons: int = 1, looks: int = 1) -> Comparison:
    """Is ``candidate`` (a cheaper configuration) shown within ``margin`` of ``best``? Non-inferior when
    the lower bound of its difference to the best, ``d - t * se`` with ``t`` at ``1 - alpha /
    (comparisons * looks)`` (``comparisons``: every cheaper configuration the caller tests), is above
    ``-margin``; inferior when the one-sided ``1 - alpha`` upper bound ``d + t' * se`` is at or below
    ``-margin``; else undecided. A wrong "non-inferior" recommends a configuration worse than the best
    by more than the margin, so that is the claim whose error rate is bounded by ``alpha``."""
    base, gain, se, t, t_no, why_not = _bounds(candidate, best, pooled, dof, maximize=maximize, alpha=alpha,
                                               margin=margin, comparisons=comparisons, looks=looks,
                                               kind="non-inferiority")
    if why_not is not None:
        verdict: Verdict = INFERIOR if not base["candidate_n"] else UNDECIDED
        return Comparison(verdict, gain, None, None, None, None, None, None,
                          {**base, "verdict": verdict, "gain": gain, "se": None, "t": None, "t_no_gain": None,
                           "threshold": None, "lower": None, "upper": None}, f"{why_not} -> {verdict}")
    assert gain is not None and se is not None and t is not None and t_no is not None
    lower, upper, threshold = gain - t * se, gain + t_no * se, -margin + t * se
    verdict = NON_INFERIOR if lower > -margin else INFERIOR if upper <= -margin else UNDECIDED
    evidence = {**base, "verdict": verdict, "gain": gain, "se": se, "t": t, "t_no_gain": t_no,
                "threshold": threshold, "lower": lower, "upper": upper}
    word = "worse" if gain < 0 else "better"
    why = (f"lower bound {lower:.4g} > -{margin:.4g}: within the margin of the best, shown" if verdict == NON_INFERIOR
           else f"upper bound {upper:.4g} <= -{margin:.4g}: shown worse than the best by more than the margin"
           if verdict == INFERIOR else f"lower bound {lower:.4g} <= -{margin:.4g} < upper bound {upper:.4g}: "
           "not shown either way")
    text = (f"{abs(gain):.4g} {word} than the best (t {t:.3g} x SE {se:.4g}, pooled std {pooled:.4g}, {dof} dof, "
            f"n {base['candidate_n']} vs {base['incumbent_n']}); {why} -> {verdict}")
    return Comparison(verdict, gain, se, t, t_no, threshold, lower, upper, evidence, text)


@dataclass(frozen=True)
class Recommendation:
    """`recommend`'s answer: the index recommended, the best's, and each cheaper one's verdict."""

    index: int
    best: int
    margin: float
    verdicts: dict[int, Comparison]      # every configuration cheaper than the best, by index
    text: str


def cost_order(costs: Sequence[tuple[float | None, float | None]], means: Sequence[float | None], *,
               maximize: bool = True) -> list[int]:
    """Indices from the cheapest: fewest trainable parameters, then shortest train time, then the
    better mean, then the earlier index (missing costs count as infinite)."""
    def key(i: int) -> tuple[float, float, float, int]:
        params, train = costs[i]
        m = means[i]
        m = 0.0 if m is None else m
        return (math.inf if params is None else params, math.inf if train is None else train,
                -m if maximize else m, i)

    return sorted(range(len(costs)), key=key)


def recommend(groups: Sequence[Sequence[float]], costs: Sequence[tuple[float | None, float | None]], best: int, *,
              maximize: bool = True, margin: float, alpha: float = DEFAULT_ALPHA,
              exclude: Iterable[int] = ()) -> Recommendation | None:
    """The recommendation of a sweep without a ladder, shared by the report (`dashboards.choices`) and
    the end of a sweep (`sweeps.engine.selection.held_out_choices`): of the configurations cheaper than
    ``best`` (`cost_order`; ``groups``: each one's seed values, ``costs``: each one's (trainable
    parameters, train seconds)), the cheapest shown `noninferior` to it (seed std pooled over every
    group; the false rate split over every cheaper configuration tested), else ``best`` itself.
    ``exclude``: configurations a decided comparison already put outside the margin. None when no
    group has two seeds (no noise is measured, so nothing can be shown)."""
    pooled, dof = pooled_std(groups)
    if pooled is None:
        return None
    order = cost_order(costs, [mean(g) for g in groups], maximize=maximize)
    skip = set(exclude)
    cheaper = [i for i in order[:order.index(best)] if i not in skip and groups[i]]
    verdicts = {i: noninferior(groups[i], groups[best], pooled, dof, maximize=maximize, alpha=alpha, margin=margin,
                               comparisons=len(cheaper)) for i in cheaper}
    shown = [i for i in cheaper if verdicts[i].verdict == NON_INFERIOR]
    if shown:
        pick = shown[0]
        text = (f"the cheapest configuration shown within the margin {margin:g} of the best "
                f"(lower bound {verdicts[pick].lower:.4g} > -{margin:g}; {len(cheaper)} cheaper configuration(s) "
                "tested)")
        return Recommendation(pick, best, margin, verdicts, text)
    undecided = sum(v.verdict == UNDECIDED for v in verdicts.values())
    text = ("the best itself: " + ("it is the cheapest configuration" if not cheaper else
            f"none of the {len(cheaper)} cheaper configuration(s) is shown within the margin {margin:g} of it"
            + (f" ({undecided} undecided: more seeds could show it)" if undecided else "")))
    return Recommendation(best, best, margin, verdicts, text)


def rule_text(alpha: float = DEFAULT_ALPHA, margin: float = 0.0) -> str:
    """The rule in words, for reports and decisions."""
    return (f"the margin that matters is {margin:g}: a gain counts when its one-sided lower confidence bound "
            f"(Student t on the pooled seed std, SE of a difference of two means, false rate {alpha:g} split over "
            f"the comparisons) is above it, a plateau when its upper bound is at or below it, and a cheaper "
            f"configuration is as good when the lower bound of its difference to the best is above minus it")


def _signed(x: float) -> str:
    return f"gain {'+' if x >= 0 else ''}{x:.4g}"
