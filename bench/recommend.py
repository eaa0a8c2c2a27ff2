"""Simulated ladders through the real plan: how often the recommendation is truly worse than the best
by more than the margin, how often a truly-as-good cheap configuration is recommended, and trials used.

The table (margin ``m`` = 1, the unit): ranks 1, 2, 4, 8 (patience 2) on q,v, then q,k,v,o and
all-linear at the chosen rank (`sweeps.engine.ladder.plan`, seeds 2 to 4, false rate 0.05). Every
configuration's true mean is 0 except all-linear's, which is ``gap`` margins better (gaps 0, 0.5, 1, 2,
4): all-linear is the best, and every other configuration is the "cheap" one, as good as the best when
``gap <= 1`` and worse by more than the margin when ``gap > 1``. Each seed's value is drawn from
N(true mean, seed std), seed std = the margin and half of it; a fixed RNG seed per scenario.

Reported per scenario:
- ``wrong``: the share of ladders whose recommendation is truly worse than the best by more than the
  margin (goal: <= 0.05 at every gap);
- ``cheap_when_as_good``: where the cheap configurations are truly within the margin (gap <= 1), the
  share of ladders that recommend one of them (the saving the margin buys), and ``cheapest``: r=1 q,v;
- ``mean_trials``: trials per ladder. Gap 0 is the flat ladder; it also runs with stage 1 only, as
  bench/ladder_noise.py did before the margin (11.7 trials for stage 1, 19.4 with stage 2, margin 0).

Usage: python bench/recommend.py [--n 2000] [--out bench/results/recommend.json]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit
from sweeps.engine.ladder import plan
from sweeps.engine.ladder_types import LadderSpec, Observation

RANKS = [1, 2, 4, 8]
TARGETS = ["q,v", "q,k,v,o", "all-linear"]
WIDTH = {"q,v": 2, "q,k,v,o": 4, "all-linear": 14}   # adapted matrices per layer (all-linear: + the MLP)
GAPS = [0.0, 0.5, 1.0, 2.0, 4.0]
MARGIN = 1.0


def ladder_spec(margin: float = MARGIN, stage2: bool = True) -> LadderSpec:
    return LadderSpec(ranks=RANKS, targets=TARGETS, stage2=stage2, alpha=1.0, dropout=0.0, seeds=2, max_seeds=4, lrs=[1e-3],
                      calibration_steps=None, maximize=True, false_gain_rate=0.05, margin=margin, patience=2)


def true_mean(params: dict, gap: float) -> float:
    return gap * MARGIN if params["targets"] == "all-linear" else 0.0


def one_ladder(rng: random.Random, spec: LadderSpec, gap: float, std: float) -> tuple[dict, int]:
    """Run one ladder to the end; (its recommendation's params, trials)."""
    obs: list[Observation] = []
    while not (p := plan(obs, spec)).done:
        if not p.enqueue:
            raise RuntimeError("the plan waits with nothing running")
        obs += [Observation(x.stage, x.rung, x.seed_index, x.params, "COMPLETE",
                            rng.gauss(true_mean(x.params, gap), std),
                            {"trainable_params": 1000.0 * x.params["r"] * WIDTH[x.params["targets"]]},
                            number=len(obs) + i) for i, x in enumerate(p.enqueue)]
    assert p.recommendation is not None
    return p.recommendation["params"], len(obs)


def scenario(gap: float, std: float, n: int, rng_seed: int, stage2: bool = True) -> dict[str, float | int]:
    rng = random.Random(rng_seed)
    spec = ladder_spec(stage2=stage2)
    best = gap * MARGIN
    wrong = cheap = cheapest = trials = 0
    t0 = time.perf_counter()
    for _ in range(n):
        rec, used = one_ladder(rng, spec, gap, std)
        wrong += true_mean(rec, gap) < best - MARGIN
        cheap += rec["targets"] != "all-linear"
        cheapest += rec["targets"] == "q,v" and rec["r"] == RANKS[0]
        trials += used
    out: dict[str, float | int] = {"stage2": stage2, "gap_margins": gap, "seed_std_margins": std / MARGIN, "ladders": n,
                                   "wrong": wrong / n, "mean_trials": trials / n,
                                   "wall_s": round(time.perf_counter() - t0, 2)}
    if gap <= 1.0:
        out.update({"cheap_when_as_good": cheap / n, "cheapest_when_as_good": cheapest / n})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2_000, help="ladders per scenario")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = []
    for i, std in enumerate((MARGIN, MARGIN / 2)):
        for j, gap in enumerate(GAPS):
            row = scenario(gap, std, args.n, rng_seed=100 * i + j)
            print(row, file=sys.stderr)
            rows.append(row)
    worst = max(float(r["wrong"]) for r in rows)
    flat = {f"stage1+stage2, seed std {r['seed_std_margins']:g} margin": r["mean_trials"] for r in rows
            if r["gap_margins"] == 0}
    for i, std in enumerate((MARGIN, MARGIN / 2)):  # the flat ladder of stage 1 only, as bench/ladder_noise.py ran it
        row = scenario(0.0, std, args.n, rng_seed=1000 + i, stage2=False)
        print(row, file=sys.stderr)
        flat[f"stage1, seed std {std / MARGIN:g} margin"] = row["mean_trials"]
    return emit({"what": "simulated ladders through the real plan: recommendation truly worse than the best by more "
                         "than the margin (goal <= 0.05 at every gap), cheap recommendations when truly as good, "
                         "and trials per ladder",
                 "ladder": {"ranks": RANKS, "targets": TARGETS, "patience": 2, "seeds": 2, "max_seeds": 4,
                            "false_gain_rate": 0.05, "margin": MARGIN},
                 "worst_wrong_rate": worst, "goal_wrong_rate": 0.05,
                 "flat_ladder_trials": flat,
                 "flat_ladder_trials_before_the_margin": {"stage1": 11.725, "stage1+stage2": 19.4486,
                                                         "source": "bench/results/ladder-noise.json (new rule, "
                                                                   "min_delta 0, seed std 1)"},
                 "results": rows}, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
