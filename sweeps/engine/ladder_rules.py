"""The ladder's rules on seed statistics (`sweeps.engine.ladder` plans with them): a configuration's
statistics, which is better, how many comparisons and looks a ladder makes, the next seeds of an
undecided comparison, and `sweeps.stats`'s gain and non-inferiority verdicts as the ladder applies them."""

from __future__ import annotations

import math
from typing import Any

from sweeps import stats as noise
from sweeps.engine.ladder_types import ConfigStats, LadderSpec, Observation, most_seeds

__all__ = ["better", "comparisons", "config_stats", "fmt", "judge", "looks", "one_more", "rate_step", "top", "within"]


def config_stats(stage: int, rung: int, params: dict[str, Any], obs: list[Observation]) -> ConfigStats:
    done = [o for o in obs if o.state == "COMPLETE" and o.value is not None and math.isfinite(o.value)]
    values = [float(o.value) for o in sorted(done, key=lambda o: o.seed_index)]  # type: ignore[arg-type]
    mean, std = noise.mean(values), noise.std(values)

    def cost(key: str) -> float | None:
        xs = [float(o.cost[key]) for o in done if o.cost.get(key) is not None]
        return noise.mean(xs)

    return ConfigStats(stage, rung, params, values, mean, std, len(values), cost("trainable_params"),
                       cost("lora_params"), cost("train_s"), cost("peak_memory_bytes"), sorted(o.number for o in obs
                                                                          if o.number is not None))


def _gain(spec: LadderSpec, new: float | None, old: float | None) -> float:
    """How much better ``new`` is than ``old`` (positive = better), whatever the direction."""
    if new is None:
        return -math.inf
    if old is None:
        return math.inf
    return new - old if spec.maximize else old - new


def better(spec: LadderSpec, a: ConfigStats, b: ConfigStats | None) -> bool:
    return b is None or b.mean is None or (a.mean is not None and _gain(spec, a.mean, b.mean) > 0)


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def comparisons(spec: LadderSpec) -> int:
    """How many comparisons one ladder can make: every rung after the first, every wider target set."""
    return max(1, len(spec.ranks) - 1 + (len(spec.targets) - 1 if spec.stage2 else 0))


def looks(spec: LadderSpec) -> int:
    """How many times the ladder can look at one comparison: at the minimum seeds, then after each added seed."""
    return most_seeds(spec) - spec.seeds + 1


def one_more(given: dict[tuple[int, int, int], int], key: tuple[int, int, int], other: tuple[int, int, int],
             top_n: int) -> dict[tuple[int, int, int], int] | None:
    """The next seeds of an undecided comparison: one more on both sides (the other side up to
    ``top_n``); None once the candidate ``key`` has ``top_n``."""
    if given[key] >= top_n:
        return None
    return {key: given[key] + 1, other: min(top_n, given[other] + 1)}


def judge(spec: LadderSpec, candidate: ConfigStats, incumbent: ConfigStats,
          seen: list[ConfigStats], count: int | None = None, margin: float | None = None) -> noise.Comparison:
    """The rule of `sweeps.stats` as the ladder applies it: the seed std pooled over ``seen``, the
    false-gain rate split over ``count`` comparisons (default: `comparisons`, the ladder's rank and
    target comparisons; a learning-rate bracket passes its own family's count) and `looks`."""
    pooled, dof = noise.pooled_std(s.values for s in seen)
    return noise.compare(candidate.values, incumbent.values, pooled, dof, maximize=spec.maximize,
                         alpha=spec.false_gain_rate, margin=spec.margin if margin is None else margin,
                         comparisons=comparisons(spec) if count is None else count, looks=looks(spec))


def rate_step(spec: LadderSpec, candidate: ConfigStats, incumbent: ConfigStats, seen: list[ConfigStats],
              count: int | None = None) -> noise.Comparison:
    """A learning-rate bracket's step: the same configuration at a neighbouring rate against its current
    rate. Two rates of one configuration cost the same, so any improvement shown is worth taking: the
    neighbour is **better** (a gain) when the lower bound of its gain is above 0 (`sweeps.stats.compare`
    at margin 0, the false rate split over ``count`` and `looks`); it is **no better** (no gain) when the
    one-sided upper bound is at or below the sweep's margin: whatever it gains does not matter; else
    undecided."""
    shown = judge(spec, candidate, incumbent, seen, count, margin=0.0)
    if shown.verdict == noise.GAIN or spec.margin <= 0.0:
        return shown
    return judge(spec, candidate, incumbent, seen, count)


def top(spec: LadderSpec, configs: list[ConfigStats]) -> ConfigStats:
    """The best-quality configuration: the best mean (ties: the earlier)."""
    best = configs[0]
    for s in configs[1:]:
        if better(spec, s, best):
            best = s
    return best


def within(spec: LadderSpec, candidate: ConfigStats, best: ConfigStats, seen: list[ConfigStats],
           tested: int) -> noise.Comparison:
    """`sweeps.stats.noninferior` as the ladder applies it: is ``candidate`` shown within the margin of
    ``best``? The seed std pooled over ``seen``, the false rate split over the ``tested`` cheaper
    configurations and `looks`."""
    pooled, dof = noise.pooled_std(s.values for s in seen)
    return noise.noninferior(candidate.values, best.values, pooled, dof, maximize=spec.maximize,
                             alpha=spec.false_gain_rate, margin=spec.margin, comparisons=tested, looks=looks(spec))


# --------------------------------------------------------------------------- the plan
