"""The two configurations a report names: the recommendation and the best-quality configuration.

A ladder sweep's are its own decision record (study user attr ``lora_sweep.ladder``), read by
:func:`ladder_choice`. Without one they are derived here (:func:`derive_choices`): the best
configuration by seed mean, and, when the sweep ran at least two seeds, the cheapest configuration
(fewest trainable parameters, then shortest train time) in the noise band of the best, by the same
rule as the ladder's (`sweeps.stats.compare`): every configuration the best is not a significant gain
over, by a Student-t test on the difference of the two seed means with the seed std pooled over
every configuration with two or more seeds, the false-gain rate 0.05 split over the best's
comparisons with the other configurations.
"""

from __future__ import annotations

from typing import Any

from dashboards.records import Choice, ConfigStats, SweepData, fmt_num
from sweeps import stats as noise

__all__ = ["apply_ladder", "derive_choices", "ladder_choice", "report_choice"]


def report_choice(c: ConfigStats, how: str) -> Choice:
    """A configuration picked by the report's own rule, with its numbers and ``how`` it was picked."""
    return Choice(dict(c.params), c.mean, c.std, c.n, c.cost.get("trainable_params"),
                  [t.number for t in c.trials], "report", how)


def ladder_choice(entry: Any) -> Choice | None:
    """A choice as the ladder's record holds it (``{params, mean, std, n, trainable_params, trials}``);
    None when the entry is not such a mapping."""
    if not isinstance(entry, dict) or not isinstance(entry.get("params"), dict):
        return None

    def num(key: str) -> float | None:
        value = entry.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    trials = [int(n) for n in entry.get("trials") or [] if isinstance(n, (int, float)) and not isinstance(n, bool)]
    n = num("n")
    return Choice(dict(entry["params"]), num("mean"), num("std"), int(n) if n is not None else None,
                  num("trainable_params"), trials, "ladder")


def derive_choices(data: SweepData) -> None:
    """Set ``data.best_quality``, ``data.recommendation`` and ``data.noise`` by the rule of the module
    docstring; ``data.configs`` must not be empty."""
    best = data.best_config()
    word = "highest" if data.maximize else "lowest"
    data.best_quality = report_choice(best, f"the {word} mean {data.objective} over seeds "
                                            f"({fmt_num(best.mean)}, n={best.n})")
    seeds = data.seeds
    pooled, dof = noise.pooled_std(c.values for c in data.configs)
    if seeds < 2 or pooled is None:
        why = "the sweep ran one seed per configuration" if seeds < 2 else "no configuration has two seeds yet"
        data.recommendation = report_choice(best, f"the best configuration: {why}, so there is no noise band to "
                                                  "trade quality for cost within")
        data.noise = {"pooled_std": pooled, "dof": dof, "seeds": seeds}
        return
    others = max(1, len(data.configs) - 1)  # the best is compared with every other configuration

    def verdict(c: ConfigStats) -> noise.Comparison:
        return noise.compare(best.values, c.values, pooled, dof, maximize=data.maximize, comparisons=others)

    band = noise.cheapest_in_band([c.values for c in data.configs],
                                  [(c.cost.get("trainable_params"), c.cost.get("train_s")) for c in data.configs],
                                  data.configs.index(best), maximize=data.maximize)
    assert band is not None  # pooled is known here
    pick, inside = data.configs[band[0]], [data.configs[i] for i in band[1]]
    # the band's width for a configuration with as many seeds as the best: how far its mean may lie
    same = noise.compare(best.values, best.values, pooled, dof, maximize=data.maximize, comparisons=others)
    margin = same.threshold
    assert margin is not None  # pooled is known here
    threshold = best.mean - margin if data.maximize else best.mean + margin
    chosen = verdict(pick)
    side = "at least" if data.maximize else "at most"
    data.noise = {"pooled_std": pooled, "dof": dof, "threshold": threshold, "margin": margin,
                  "alpha": noise.DEFAULT_ALPHA, "comparisons": others, "t": same.t, "best_mean": best.mean,
                  "within": len(inside), "seeds": seeds, "rule": noise.rule_text(),
                  "recommended": chosen.evidence}
    data.recommendation = report_choice(pick, (
        f"the cheapest configuration (fewest trainable parameters, then shortest train time) the best is not a "
        f"significant gain over ({noise.rule_text()}, split over {others} comparison(s) with the best): "
        f"{chosen.text}; with as many seeds as the best ({best.n}) that is a mean {side} {fmt_num(threshold)}, "
        f"the best mean {fmt_num(best.mean)} {'minus' if data.maximize else 'plus'} t {same.t:.3g} x pooled seed "
        f"std {fmt_num(pooled)} ({dof} degrees of freedom) x sqrt(2/{best.n}) = {fmt_num(margin)}; "
        f"{len(inside)} of {len(data.configs)} configurations are in that band"))


def apply_ladder(data: SweepData) -> None:
    """Replace the derived choices by the ladder's own where its record (``data.ladder``) has them."""
    if data.ladder is None:
        return
    rec, best_q = ladder_choice(data.ladder.get("recommendation")), ladder_choice(data.ladder.get("best_quality"))
    if rec is not None:
        rec.how = "the ladder's recommendation"
        data.recommendation = rec
    if best_q is not None:
        best_q.how = "the ladder's best-quality configuration"
        data.best_quality = best_q
