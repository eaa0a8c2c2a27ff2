"""Strategies compared on real results: a tabular benchmark replaying the LoRA-paper study's 57 trials.

The table is `docs/studies/lora-paper/results/results.json`: 19 (target set, rank) configurations of the
built-in MiniLM encoder on pydoc-topics, each trained with 3 seeds (validation accuracy). A simulated
trial of a configuration draws one of its 3 measured seed values (uniformly, with replacement), the way
tabular HPO benchmarks (HPOBench, YAHPO, LCBench) replay measured results. The true value of a
configuration is the mean of its measured seeds; the true best is the best of those.

Four strategies get the same trial budgets (a trial is one seed of one configuration):

- ``ladder``: the real `sweeps.engine.ladder.plan` (q,v then q,k,v,o; ranks 1, 2, 4, 8, 64: the ranks
  the table has; seeds 2 to 4, the defaults: patience 2, a rung undecided at max_seeds climbs on;
  ``ladder-before``: the defaults before, patience 1 and an undecided rung counted as the plateau; the
  false-gain rate 0.05, no calibration: the table has one learning rate); it stops when its plan is
  done or the budget is spent (then the recommendation is derived from what ran, as the report does);
- ``tpe`` and ``random``: Optuna's TPESampler and RandomSampler over the 19 configurations (one
  categorical choice), each sampled configuration run at 2 seeds (2 trials), repeats pooled;
- ``grid``: every configuration at 2 seeds (38 trials).

Every strategy but the ladder recommends by the end-of-sweep rule (`sweeps.stats.recommend`: the
cheapest configuration shown within the margin of the best mean, else the best). Reported per
strategy, budget and margin: the share of runs whose recommendation is truly within the margin of
the true best, the share that recommend the true best itself, and the trials used.

Usage: python bench/strategies.py [--runs 300] [--out bench/results/strategies-lora-paper.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna

from bench.common import emit
from sweeps import stats
from sweeps.engine.ladder import plan
from sweeps.engine.ladder_types import LadderSpec, Observation

TABLE = Path(__file__).resolve().parents[1] / "docs" / "studies" / "lora-paper" / "results" / "results.json"
RANKS = [1, 2, 4, 8, 64]
TARGETS = ["q,v", "q,k,v,o"]
MARGINS = [0.01, 0.02]
BUDGETS = [20, 38]
SEEDS_PER_CONFIG = 2


def load_table(path: Path = TABLE) -> list[dict[str, Any]]:
    """The measured configurations: targets, r, trainable params and the 3 seed values each."""
    data = json.loads(path.read_text())
    return [{"key": (c["targets"], int(c["r"])), "trainable_params": float(c["trainable_params"]),
             "values": [float(s["value"]) for s in c["seeds"]]} for c in data["configurations"]]


class Replay:
    """Draws seed values from the table; counts trials."""

    def __init__(self, table: list[dict[str, Any]], rng: random.Random) -> None:
        self.by_key = {c["key"]: c for c in table}
        self.rng = rng
        self.trials = 0

    def draw(self, key: tuple[str, int]) -> float:
        self.trials += 1
        return self.rng.choice(self.by_key[key]["values"])


def recommend_from(groups: dict[tuple[str, int], list[float]], replay: Replay, margin: float) -> tuple[str, int]:
    """The end-of-sweep rule over what ran: the cheapest configuration shown within the margin of the
    best mean, else the best (with one seed everywhere: the best mean)."""
    keys = [k for k, v in groups.items() if v]
    values = [groups[k] for k in keys]
    best = max(range(len(keys)), key=lambda i: (stats.mean(values[i]), -i))
    rec = stats.recommend(values, [(replay.by_key[k]["trainable_params"], None) for k in keys], best,
                          maximize=True, margin=margin)
    return keys[rec.index if rec is not None else best]


def run_ladder(replay: Replay, budget: int, margin: float, patience: int = 2, climb: bool = True) -> tuple[str, int]:
    spec = LadderSpec(ranks=RANKS, targets=TARGETS, alpha=16.0, dropout=0.0, seeds=2, max_seeds=4, lrs=[2e-3],
                      calibration_steps=None, maximize=True, false_gain_rate=0.05, margin=margin, patience=patience,
                      climb_undecided=climb)
    obs: list[Observation] = []
    while True:
        p = plan(obs, spec)
        if p.done:
            assert p.recommendation is not None
            return p.recommendation["params"]["targets"], int(p.recommendation["params"]["r"])
        if not p.enqueue or replay.trials + len(p.enqueue) > budget:
            break
        for x in p.enqueue:
            key = (x.params["targets"], int(x.params["r"]))
            obs.append(Observation(x.stage, x.rung, x.seed_index, x.params, "COMPLETE", replay.draw(key),
                                   {"trainable_params": replay.by_key[key]["trainable_params"]}, number=len(obs)))
    groups: dict[tuple[str, int], list[float]] = {}
    for o in obs:
        groups.setdefault((o.params["targets"], int(o.params["r"])), []).append(float(o.value))  # type: ignore[arg-type]
    return recommend_from(groups, replay, margin)


def run_optuna(replay: Replay, budget: int, margin: float, sampler: optuna.samplers.BaseSampler) -> tuple[str, int]:
    keys = sorted(replay.by_key)
    labels = [f"{t} r={r}" for t, r in keys]
    study = optuna.create_study(direction="maximize", sampler=sampler)
    groups: dict[tuple[str, int], list[float]] = {}
    while replay.trials + SEEDS_PER_CONFIG <= budget:
        trial = study.ask()
        key = keys[labels.index(trial.suggest_categorical("config", labels))]
        drawn = [replay.draw(key) for _ in range(SEEDS_PER_CONFIG)]
        groups.setdefault(key, []).extend(drawn)
        study.tell(trial, stats.mean(drawn))
    return recommend_from(groups, replay, margin)


def run_grid(replay: Replay, budget: int, margin: float) -> tuple[str, int]:
    groups = {key: [replay.draw(key) for _ in range(SEEDS_PER_CONFIG)] for key in sorted(replay.by_key)}
    return recommend_from(groups, replay, margin)


def evaluate(strategy: str, budget: int, margin: float, runs: int, table: list[dict[str, Any]],
             seed: int) -> dict[str, Any]:
    truth = {c["key"]: stats.mean(c["values"]) for c in table}
    best = max(truth.values())
    within = exact = trials = 0
    picks: dict[str, int] = {}
    t0 = time.perf_counter()
    for i in range(runs):
        replay = Replay(table, random.Random(seed * 100_003 + i))
        if strategy.startswith("ladder"):
            old = strategy == "ladder-before"   # the defaults before: patience 1, an undecided rung stops it
            pick = run_ladder(replay, budget, margin, patience=1 if old else 2, climb=not old)
        elif strategy == "grid":
            pick = run_grid(replay, budget, margin)
        else:
            sampler = (optuna.samplers.TPESampler(seed=seed * 100_003 + i) if strategy == "tpe"
                       else optuna.samplers.RandomSampler(seed=seed * 100_003 + i))
            pick = run_optuna(replay, budget, margin, sampler)
        within += truth[pick] >= best - margin - 1e-12
        exact += truth[pick] == best
        trials += replay.trials
        label = f"{pick[0]} r={pick[1]}"
        picks[label] = picks.get(label, 0) + 1
    top = sorted(picks.items(), key=lambda kv: -kv[1])[:4]
    return {"strategy": strategy, "budget": budget, "margin": margin, "runs": runs,
            "within_margin_of_true_best": within / runs, "true_best": exact / runs, "mean_trials": trials / runs,
            "most_recommended": {k: v / runs for k, v in top}, "wall_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=300, help="simulated sweeps per strategy, budget and margin")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    table = load_table()
    truth = {f"{c['key'][0]} r={c['key'][1]}": stats.mean(c["values"]) for c in table}
    rows = []
    for mi, margin in enumerate(MARGINS):
        for bi, budget in enumerate(BUDGETS):
            for si, strategy in enumerate(("ladder", "ladder-before", "tpe", "random", "grid")):
                if strategy == "grid" and budget < len(table) * SEEDS_PER_CONFIG:
                    continue
                row = evaluate(strategy, budget, margin, args.runs, table, seed=1 + 100 * mi + 10 * bi + si)
                print(row, file=sys.stderr)
                rows.append(row)
    pooled, dof = stats.pooled_std(c["values"] for c in table)
    return emit({"what": "strategies on a tabular replay of the LoRA-paper study (19 configurations x 3 measured "
                         "seeds): share of runs whose recommendation is within the margin of the true best, and "
                         "trials used, at equal budgets",
                 "table": str(TABLE.relative_to(TABLE.parents[4])), "true_best": max(truth, key=truth.get),
                 "true_means": dict(sorted(truth.items(), key=lambda kv: -kv[1])),
                 "seed_noise": {"pooled_std": pooled, "dof": dof},
                 "ladder": {"targets": TARGETS, "ranks": RANKS, "seeds": 2, "max_seeds": 4, "patience": 2,
                            "climb_undecided": True, "ladder-before": {"patience": 1, "climb_undecided": False}},
                 "results": rows}, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
