"""Simulated ladders on synthetic seed noise: the old significance rule against the new one.

Every seed's value is drawn from N(mean of its configuration, 1) (the seed std is the unit), with a
fixed RNG seed per scenario. Two scenarios, each with the starting target set only (stage 1: ranks
1, 2, 4, 8, patience 2) and with stage 2 (then two wider target sets at the chosen rank, with the
same mean as the chosen rank: no real gain):

- ``null``: every configuration has the same mean. A ladder "calls a gain" when a rung is called a
  significant gain or the chosen rank is above r_start (it climbed on pure noise), or, with stage 2, a
  wider target set is kept. The share of ladders that do is the false-gain rate per ladder;
- ``gain``: rung k has mean 2 k (a real gain of twice the seed std per rung). Detection: the share of
  ladders that climb above r_start (a rung called a gain, or the chosen rank above r_start).

The new rule runs through the real `sweeps.engine.ladder.plan` (seeds 2 to 4, false-gain rate 0.05):
plan -> draw the values of the slots it enqueues -> plan, until done. The old rule (``z * pooled seed
std / sqrt(seeds)``, z = 2, two seeds, as `sweeps.engine.ladder` decided before issue 14) is
replayed here in a few lines, the same decisions in the same order. Also reported: the mean trials
(seeds) per ladder.

Usage: python bench/ladder_noise.py [--n 5000] [--out bench/results/ladder-noise.json]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit
from sweeps import stats
from sweeps.engine.ladder import plan
from sweeps.engine.ladder_types import LadderSpec, Observation

RANKS = [1, 2, 4, 8]
WIDER = ["q,k,v,o", "all-linear"]
PATIENCE = 2


def _mean_of(stage: int, rung: int, chosen_rung: int, step: float) -> float:
    """The true mean of a configuration: ``step`` per rung in stage 1; stage 2 as the chosen rung."""
    return step * (rung if stage == 1 else chosen_rung)


def new_rule(rng: random.Random, step: float, stage2: bool) -> tuple[bool, bool, bool, int]:
    """One ladder through the real plan: (a rung called a gain, climbed above r_start (a rung called a
    gain or the chosen rank above it), called any gain, trials)."""
    spec = LadderSpec(ranks=RANKS, targets=["q,v", *WIDER] if stage2 else ["q,v"], alpha=1.0, dropout=0.0,
                      seeds=2, max_seeds=4, lrs=[1e-3], calibration_steps=None, maximize=True,
                      false_gain_rate=0.05, margin=0.0, patience=PATIENCE, stage2=stage2)
    obs: list[Observation] = []
    while not (p := plan(obs, spec)).done:
        chosen = RANKS.index(p.chosen_rank) if p.chosen_rank is not None else 0
        obs += [Observation(x.stage, x.rung, x.seed_index, x.params, "COMPLETE",
                            rng.gauss(_mean_of(x.stage, x.rung, chosen, step), 1.0),
                            {"trainable_params": 1000.0 * x.params["r"] * (1 + x.rung * (x.stage == 2))})
                for x in p.enqueue]
    rank_gain = any(d["evidence"]["significant"] for d in p.decisions if d["kind"] == "rank" and d["rung"] > 0)
    climbed = rank_gain or p.chosen_rank != RANKS[0]
    kept = any(d["evidence"]["kept"] for d in p.decisions if d["kind"] == "targets")
    return rank_gain, climbed, climbed or kept, len(obs)


def old_rule(rng: random.Random, step: float, stage2: bool, z: float = 2.0,
             seeds: int = 2) -> tuple[bool, bool, bool, int]:
    """One ladder by the rule before issue 14: a gain when ``mean - best > z * pooled / sqrt(seeds)``."""
    seen: list[list[float]] = []

    def run(mean: float) -> list[float]:
        values = [rng.gauss(mean, 1.0) for _ in range(seeds)]
        seen.append(values)
        return values

    def threshold() -> float:
        pooled, _ = stats.pooled_std(seen)
        return z * (pooled or 0.0) / math.sqrt(seeds)

    ladder: list[float] = []
    best: float | None = None
    misses, gained = 0, False
    for k in range(len(RANKS)):
        m = statistics_mean(run(step * k))
        ladder.append(m)
        if best is None or m - best > threshold():
            gained = gained or best is not None
            best, misses = m, 0
        else:
            misses += 1
        if misses >= PATIENCE:
            break
    thr = threshold()
    top = max(ladder)
    chosen = next(i for i, m in enumerate(ladder) if m >= top - thr)
    climbed = gained or chosen != 0
    kept_any = False
    if stage2:
        kept = ladder[chosen]
        for _ in WIDER:
            m = statistics_mean(run(step * chosen))
            if m - kept > threshold():
                kept, kept_any = m, True
    return gained, climbed, climbed or kept_any, len(seen) * seeds


def statistics_mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def scenario(rule: str, step: float, stage2: bool, n: int, rng_seed: int) -> dict[str, float | int]:
    rng = random.Random(rng_seed)
    run = new_rule if rule == "new" else old_rule
    rank_gain = climbed = called = trials = 0
    t0 = time.perf_counter()
    for _ in range(n):
        g, c, a, t = run(rng, step, stage2)
        rank_gain, climbed, called, trials = rank_gain + g, climbed + c, called + a, trials + t
    return {"ladders": n, "a_rung_called_a_gain": rank_gain / n, "climbed_above_r_start": climbed / n,
            "called_any_gain": called / n,
            "mean_trials": trials / n, "wall_s": round(time.perf_counter() - t0, 2)}


def one_rung_rate(n: int, rng_seed: int) -> dict[str, float]:
    """One rung against the previous one, equal means, 2 seeds each (the issue's first number)."""
    rng = random.Random(rng_seed)
    old = new = 0
    for _ in range(n):
        a, b = [rng.gauss(0, 1) for _ in range(2)], [rng.gauss(0, 1) for _ in range(2)]
        pooled, dof = stats.pooled_std([a, b])
        old += statistics_mean(b) - statistics_mean(a) > 2.0 * (pooled or 0.0) / math.sqrt(2)
        new += stats.compare(b, a, pooled, dof).verdict == stats.GAIN  # one look, no split
    return {"comparisons": n, "old_rule": old / n, "new_rule_one_look_alpha_0.05": new / n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5_000, help="ladders per scenario")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    results: dict[str, dict[str, object]] = {}
    for stage2 in (False, True):
        part = "stage1+stage2" if stage2 else "stage1"
        for name, step in (("null", 0.0), ("gain_2sd_per_rung", 2.0)):
            for i, rule in enumerate(("old", "new")):
                key = f"{part} {name}"
                results.setdefault(key, {})[rule] = scenario(rule, step, stage2, args.n,
                                                             rng_seed=1000 * stage2 + 10 * (step > 0) + i)
                print(f"{key} {rule}: {results[key][rule]}", file=sys.stderr)
    se = math.sqrt(0.05 * 0.95 / args.n)
    return emit({"what": "false-gain rate per ladder (equal means) and detection rate (a gain of 2 seed stds per "
                         "rung), old rule (z=2, 2 seeds) vs new rule (Student t on the SE of a difference, "
                         "false_gain_rate 0.05 split over comparisons and looks, seeds 2 to 4)",
                 "ladder": {"ranks": RANKS, "patience": PATIENCE, "wider_target_sets_in_stage2": WIDER,
                            "seed_std": 1.0},
                 "binomial_se_at_0.05": se, "one_rung": one_rung_rate(args.n * 10, rng_seed=99),
                 "results": results}, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
