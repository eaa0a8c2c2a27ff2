"""The learning rate follows the rank: the ladder's lr bracket on synthetic learning-rate x rank tables
(no training). A table whose best rate moves one step per rank doubling takes the ladder to the table's
best; a table whose best rate does not depend on the rank costs at most one extra trial per rung; a
wider target set is judged at its own best rate."""

from __future__ import annotations

import math

import pytest

from sweeps.engine.ladder import plan
from sweeps.engine.ladder_replay import lr_comparisons
from sweeps.engine.ladder_types import LadderSpec, Observation, planned_total
from sweeps.stats import t_quantile

pytestmark = pytest.mark.usefixtures("isolated")

LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]       # the calibration candidates: the bracket's grid
RANKS = [1, 2, 4, 8, 16, 32]
WIDTH = {"q,v": 2, "q,k,v,o": 4, "all-linear": 14}
NOISE = (0.002, -0.002, 0.001, -0.001)            # seed i's offset from the table's mean (seed std 0.0018-0.0023)


def spec(**kw) -> LadderSpec:
    base = {"ranks": RANKS, "targets": ["q,v"], "stage2": False, "alpha": 1.0, "dropout": 0.0, "seeds": 2,
            "max_seeds": 4, "lrs": LRS, "calibration_steps": 30, "maximize": True, "margin": 0.01, "patience": 1}
    base.update(kw)
    return LadderSpec(**base)


def run(s: LadderSpec, mean) -> tuple:
    """The ladder to its end on a table ``mean(r, targets, lr_index)``; (plan, observations)."""
    obs: list[Observation] = []
    for _ in range(200):
        p = plan(obs, s)
        if p.done:
            return p, obs
        assert p.enqueue and not p.wait
        for x in p.enqueue:
            li = LRS.index(x.params["lr"])
            value = mean(x.params["r"], x.params["targets"], li) + NOISE[x.seed_index]
            cost = {"trainable_params": 1000.0 * x.params["r"] * WIDTH[x.params["targets"]]}
            obs.append(Observation(x.stage, x.rung, x.seed_index, dict(x.params), "COMPLETE", value, cost,
                                   number=len(obs)))
    raise AssertionError("the ladder did not finish")


def moving(r: int, targets: str, li: int) -> float:
    """Quality 0.6 + 0.03 per rank doubling at the best rate, whose index is log2(r): one grid step up per
    doubling; 0.05 lost per step squared away from it."""
    k = int(math.log2(r))
    return 0.6 + 0.03 * k - 0.05 * (li - k) ** 2


def test_a_best_rate_that_moves_one_step_per_doubling_takes_the_ladder_to_the_tables_best() -> None:
    best = max((moving(r, "q,v", li), r, li) for r in RANKS for li in range(len(LRS)))
    assert best[1:] == (32, 5)
    # without re-tuning, r=2 at r=1's rate loses 0.02: the ladder stops at r=1, 0.15 below the table's best
    fixed, _ = run(spec(retune_lr=False), moving)
    assert fixed.recommendation["params"]["r"] == 1 and fixed.best_quality["params"]["r"] == 1
    # with the bracket, each rung is judged at its best rate, and the rate follows the rank
    p, obs = run(spec(), moving)
    assert p.best_quality["params"] == {"r": 32, "alpha": 1.0, "targets": "q,v", "lr": LRS[5], "dropout": 0.0}
    assert p.best_quality["mean"] == pytest.approx(best[0], abs=0.003)
    ranks = [d for d in p.decisions if d["kind"] == "rank"]
    assert [(d["evidence"]["r"], d["evidence"]["lr"], d["evidence"]["significant"]) for d in ranks] == \
        [(2 ** k, LRS[k], True) for k in range(6)]
    # r=2 found its rate by the bracket (1e-4 -> 3e-4 a gain, 1e-3 not); from r=4 on each rung starts a step up,
    # where the last best rate moved, and gains there: no bracket
    moves = [(d["evidence"]["r"], d["evidence"]["lr"], d["evidence"]["moved"]) for d in p.decisions if d["kind"] == "lr"]
    assert moves == [(2, 3e-4, True), (2, 1e-3, False)]
    assert "r=32 q,v at lr 0.03" in p.decisions[-1]["text"]
    # trials: the 6 calibration trials, 2 seeds per rung, 4 for r=2's bracket; the 2-seed grid needs 72
    assert len(obs) == 6 + 2 * 6 + 4 and len(obs) <= 0.6 * 2 * len(RANKS) * len(LRS)


def flat_rate(r: int, targets: str, li: int) -> float:
    """The best rate is 1e-3 at every rank; quality gains 0.05, 0.03, then 0.002 (a plateau at r=8)."""
    q = {1: 0.6, 2: 0.65, 4: 0.68, 8: 0.682, 16: 0.683, 32: 0.683}[r]
    return q - 0.05 * (li - 2) ** 2


def test_a_rank_independent_best_rate_costs_at_most_one_extra_trial_per_rung() -> None:
    before, before_obs = run(spec(retune_lr=False), flat_rate)
    after, after_obs = run(spec(), flat_rate)
    assert before.recommendation["params"] == after.recommendation["params"]
    assert after.recommendation["params"]["r"] == 4 and after.recommendation["params"]["lr"] == 1e-3
    rungs = len([d for d in after.decisions if d["kind"] == "rank"])
    assert rungs == 4                        # r=1, 2, 4, then r=8 is the plateau
    # the bracket ran r=8 at 3e-3 and at 3e-4, one seed each (a neighbouring rate starts at one seed: the seed
    # noise is already measured), each shown no better at once
    bracket = [o for o in after_obs if o.stage == 1 and o.params["lr"] != 1e-3]
    assert len(bracket) == 2
    extra = len(after_obs) - len(before_obs)
    assert extra == 2 and extra <= rungs
    moves = [(d["evidence"]["r"], d["evidence"]["lr"], d["evidence"]["moved"], d["evidence"]["verdict"])
             for d in after.decisions if d["kind"] == "lr"]
    assert moves == [(8, 3e-3, False, "no gain"), (8, 3e-4, False, "no gain")]
    assert [d["evidence"]["seeds"] for d in after.decisions if d["kind"] == "lr"] == [1, 1]
    stop = next(d for d in after.decisions if d["kind"] == "stop")
    assert "each at its best rate of the lr bracket" in stop["text"]


def test_a_wider_target_set_is_judged_at_its_own_best_rate() -> None:
    def table(r: int, targets: str, li: int) -> float:
        if targets == "q,v":
            return {1: 0.6, 2: 0.601}.get(r, 0.6) - 0.05 * (li - 2) ** 2
        if targets == "q,k,v,o":                            # no better than q,v at any rate
            return 0.6 - 0.05 * (li - 2) ** 2
        return 0.66 - 0.3 * max(0, li - 1)                  # all-linear: diverges above 3e-4, the best there

    p, _ = run(spec(targets=["q,v", "q,k,v,o", "all-linear"], stage2=True, ranks=[1, 2]), table)
    targets = {d["evidence"]["targets"]: d for d in p.decisions if d["kind"] == "targets"}
    assert not targets["q,k,v,o"]["evidence"]["kept"] and targets["q,k,v,o"]["evidence"]["lr"] == 1e-3
    assert targets["all-linear"]["evidence"]["kept"] and targets["all-linear"]["evidence"]["lr"] == 3e-4
    assert targets["all-linear"]["evidence"]["lrs_tried"] == [1e-3, 3e-3, 3e-4, 1e-4]
    assert p.best_quality["params"]["targets"] == "all-linear" and p.best_quality["params"]["lr"] == 3e-4
    assert p.recommendation["params"] == p.best_quality["params"]   # nothing cheaper within 0.01 of 0.66
    # at 1e-3 all-linear lost 0.24: without the bracket it would not have been kept
    fixed, _ = run(spec(targets=["q,v", "q,k,v,o", "all-linear"], stage2=True, ranks=[1, 2], retune_lr=False), table)
    assert fixed.best_quality["params"]["targets"] == "q,v"


def test_lr_moves_split_their_own_false_gain_rate_and_the_plan_counts_every_rate() -> None:
    s = spec(targets=["q,v", "q,k,v,o"], stage2=True)
    # 5 neighbouring rates at most for each of the 5 later rungs and the 1 wider set
    assert lr_comparisons(s) == 5 * 6
    p, _ = run(s, moving)
    lr_move = next(d for d in p.decisions if d["kind"] == "lr")
    ev = lr_move["evidence"]
    assert ev["comparison"]["comparisons"] == 30 and ev["comparison"]["looks"] == 3
    assert ev["t"] == pytest.approx(t_quantile(1 - 0.05 / 90, ev["dof"]), rel=1e-12)
    assert planned_total(s) == 6 + 4 * 6 * 7 and planned_total(spec(retune_lr=False)) == 6 + 4 * 6


def test_a_rung_undecided_at_max_seeds_is_not_a_plateau_the_ladder_climbs_on() -> None:
    # r=2's seeds spread 0.03 around a gain of 0.01 over r=1: undecided even at 4 seeds. Climbing on (the
    # default), r=4's clear gain is found; with climb_undecided off, r=2 counts as the plateau and r=1 wins.
    def table(r: int, targets: str, li: int) -> float:
        return {1: 0.60, 2: 0.61, 4: 0.70, 8: 0.70, 16: 0.70, 32: 0.70}[r]

    spread = {1: 0.0, 2: 0.03}

    def run_spread(s: LadderSpec):
        obs: list[Observation] = []
        while not (p := plan(obs, s)).done:
            for x in p.enqueue:
                sign = 1 if x.seed_index % 2 == 0 else -1
                value = table(x.params["r"], "", 0) + sign * spread.get(x.params["r"], 0.002)
                obs.append(Observation(x.stage, x.rung, x.seed_index, dict(x.params), "COMPLETE", value,
                                       {"trainable_params": 1000.0 * x.params["r"]}, number=len(obs)))
        return p

    s = spec(lrs=[1e-3], calibration_steps=None, patience=1)
    climbed = run_spread(s)
    ranks = [d for d in climbed.decisions if d["kind"] == "rank"]
    assert ranks[1]["evidence"]["verdict"] == "undecided" and ranks[1]["evidence"]["seeds"] == 4
    assert "not a plateau, the ladder climbs on (the best stays r=1 q,v at lr 0.001)" in ranks[1]["text"]
    assert ranks[2]["evidence"]["r"] == 4 and ranks[2]["evidence"]["significant"]
    assert ranks[2]["evidence"]["best_r"] == 1        # r=4 is compared with the best shown, r=1
    assert climbed.best_quality["params"]["r"] in (4, 8)
    stopped = run_spread(spec(lrs=[1e-3], calibration_steps=None, patience=1, climb_undecided=False))
    assert [d["evidence"]["r"] for d in stopped.decisions if d["kind"] == "rank"] == [1, 2]
    assert stopped.best_quality["params"]["r"] in (1, 2)


def test_the_reports_rank_figure_shows_every_rate_a_rung_was_tried_at() -> None:
    import optuna

    from dashboards.figures import rank_figure
    from dashboards.records import ConfigStats, SweepData
    from sweeps.config.sweep import load_sweep_config

    def cfg(r: int, lr: float, values: list[float]) -> ConfigStats:
        params = {"r": r, "alpha": 1.0, "targets": "q,v", "lr": lr, "dropout": 0.0}
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
        return ConfigStats(f"r{r}-{lr}", params, [], values, mean, std, len(values), {})

    configs = [cfg(1, 1e-3, [0.60, 0.62]), cfg(2, 1e-3, [0.63, 0.65]), cfg(2, 3e-3, [0.70]),
               cfg(2, 3e-4, [0.50]), cfg(4, 3e-3, [0.72, 0.74])]
    data = SweepData(config=load_sweep_config(None), study=optuna.create_study(), objective="accuracy",
                     direction="maximize", trials=[], configs=configs, counts={}, ladder=None, parent_run_id=None,
                     tracking_uri="", client=None)
    fig = rank_figure([data])
    traces = {t.name: (list(t.x), [round(y, 6) for y in t.y]) for t in fig.data}
    # the line follows each rank's best rate; each rate tried is its own marker trace
    assert traces["q,v (best rate per rank)"] == ([1, 2, 4], [0.61, 0.70, 0.73])
    assert traces["q,v at lr 0.0003"] == ([2], [0.5])
    assert traces["q,v at lr 0.001"] == ([1, 2], [0.61, 0.64])
    assert traces["q,v at lr 0.003"] == ([2, 4], [0.7, 0.73])
    assert len(fig.data) == 4


def test_the_ladders_stopping_and_rate_rules_are_not_part_of_the_sweeps_fingerprint() -> None:
    # a ladder from before these rules (no retune_lr or climb_undecided, patience 1 by default) resumes; the
    # search space itself (the calibration rates) still may not change
    from sweeps.config.sweep import load_sweep_config
    from sweeps.engine.study import fingerprint

    demo = fingerprint(load_sweep_config(None))
    assert demo == fingerprint(load_sweep_config(None, ["search.ladder.patience=3", "search.ladder.retune_lr=false",
                                                        "search.ladder.climb_undecided=true"]))
    assert demo != fingerprint(load_sweep_config(None, ["search.ladder.calibration_lrs=[1.0e-3,1.0e-2]"]))
