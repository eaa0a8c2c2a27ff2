"""The two configurations a report names: the recommendation and the best-quality configuration.

A ladder sweep's are its own decision record (study user attr ``lora_sweep.ladder``), read by
:func:`ladder_choice`. Without one they are derived here (:func:`derive_choices`) by the rule of
`sweeps.stats` (the same as the end of a sweep's, `sweeps.engine.selection`): the best configuration
by seed mean, and, when the sweep ran at least two seeds, the cheapest configuration (fewest
trainable parameters, then shortest train time) *shown* within the sweep's margin of the best
(`sweeps.stats.recommend`: the lower confidence bound of its difference to the best above minus the
margin, seed std pooled over every configuration with two or more seeds, the false rate 0.05 split
over the cheaper configurations tested); else the best itself, and the report says why.
"""

from __future__ import annotations

from typing import Any

from dashboards.records import Choice, ConfigStats, SweepData, fmt_num
from sweeps import stats as noise

__all__ = ["apply_ladder", "derive_choices", "ladder_choice", "recommendation_text", "report_choice"]


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
    margin = data.config.search.margin_value(data.config.model.task)
    pooled, dof = noise.pooled_std(c.values for c in data.configs)
    if seeds < 2 or pooled is None:
        why = "the sweep ran one seed per configuration" if seeds < 2 else "no configuration has two seeds yet"
        data.recommendation = report_choice(best, f"the best configuration: {why}, so nothing can be shown within "
                                                  f"the margin {margin:g} of it")
        data.noise = {"pooled_std": pooled, "dof": dof, "seeds": seeds, "margin": margin}
        return
    rec = noise.recommend([c.values for c in data.configs],
                          [(c.cost.get("trainable_params"), c.cost.get("train_s")) for c in data.configs],
                          data.configs.index(best), maximize=data.maximize, margin=margin)
    assert rec is not None  # pooled is known here
    pick = data.configs[rec.index]
    tried = [{"params": data.configs[i].params, "mean": data.configs[i].mean, "n": data.configs[i].n,
              "verdict": v.verdict, "lower": v.lower, "upper": v.upper, "text": v.text}
             for i, v in rec.verdicts.items()]
    data.noise = {"pooled_std": pooled, "dof": dof, "margin": margin, "alpha": noise.DEFAULT_ALPHA,
                  "tested": len(rec.verdicts), "best_mean": best.mean, "seeds": seeds, "shown": rec.index != rec.best,
                  "rule": noise.rule_text(margin=margin), "tried": tried,
                  "recommended": rec.verdicts[rec.index].evidence if rec.index != rec.best else None}
    if rec.index != rec.best:
        v = rec.verdicts[rec.index]
        how_text = (f"within {margin:g} of the best, shown (lower bound {v.lower:.4g} > -{margin:g}): the cheapest "
                    f"configuration (fewest trainable parameters, then shortest train time) whose difference to the "
                    f"best has a lower confidence bound above minus the margin ({v.text}; the false rate "
                    f"{noise.DEFAULT_ALPHA:g} split over {len(rec.verdicts)} cheaper configuration(s) tested)")
    else:
        how_text = rec.text + f" (the margin that matters: {margin:g}; {noise.rule_text(margin=margin)})"
    data.recommendation = report_choice(pick, how_text)


def recommendation_text(ladder: dict[str, Any]) -> str | None:
    """The ladder's recommendation decision in words (what it recommended and why), if it recorded one."""
    for d in reversed(ladder.get("decisions") or []):
        if isinstance(d, dict) and d.get("kind") == "recommendation" and isinstance(d.get("text"), str):
            return d["text"]
    return None


def apply_ladder(data: SweepData) -> None:
    """Replace the derived choices by the ladder's own where its record (``data.ladder``) has them."""
    if data.ladder is None:
        return
    rec, best_q = ladder_choice(data.ladder.get("recommendation")), ladder_choice(data.ladder.get("best_quality"))
    if rec is not None:
        said = recommendation_text(data.ladder)
        rec.how = "the ladder's recommendation" + (f": {said}" if said else "")
        data.recommendation = rec
    if best_q is not None:
        best_q.how = "the ladder's best-quality configuration"
        data.best_quality = best_q
