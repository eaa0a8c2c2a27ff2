"""``strategy: ladder``: the start-low-then-increase procedure, as a plan over Optuna trials.

The procedure (the LoRA paper's advice, made mechanical and noise-aware):

- Stage 0, learning-rate calibration (``ladder.calibrate``, on by default): the starting rank and
  targets at each candidate lr, for ``ladder.calibration_steps`` steps (default: half the trial's
  steps); the best lr is where stage 1 starts. The candidates, sorted, are the grid the lr bracket walks
  (below). alpha is fixed (default: the starting rank, as the paper did), with alpha/r scaling (rsLoRA's
  alpha/sqrt(r) when the sweep chooses it).
- Stage 1, the rank ladder: ranks ``r_start, 2 r_start, 4 r_start, ... <= r_max`` on the starting
  target set. Each rung is compared with the best rung so far by the one rule of `sweeps.stats`: a
  Student-t bound on the difference of the two seed means against the sweep's margin (``search.margin``,
  the smallest difference that matters), with the seed std pooled over every configuration run so far
  (stages 1 and 2, which share the training length), whose false-gain rate ``false_gain_rate`` is split
  over every comparison the ladder can make and every look at one, so a whole ladder calls a gain on
  pure noise at most that often. A comparison is a gain (shown above the margin), no gain (shown below
  it: the plateau, at the minimum seeds when the noise allows), or undecided; an undecided one gets one
  more seed on both sides (``seeds`` is the minimum, ``max_seeds`` the maximum) and is looked at
  again. Still undecided at ``max_seeds``, the rung is not a gain (the best stays) and, with
  ``climb_undecided`` (the default), not a plateau either: a plateau is shown, never assumed, so the
  ladder climbs on (off: it counts as a rung without a gain, cheaper and more likely to stop low). The
  ladder stops after ``patience`` (default 2) rungs without a gain since the best (the plateau), at
  ``r_max``, or when a cost limit is reached (the next rung's trainable parameters above
  ``max_params``; a rung's mean train time above ``max_train_s``, or its peak memory above
  ``max_memory_mb``).
- The learning rate follows the rank (``retune_lr``, on by default when calibrating over two or more
  rates; `sweeps.engine.ladder_replay.Replay.bracket`): a rung starts at the best rung's rate, moved one
  grid step further when the best rate moved between the last two best rungs. A rung not shown a gain
  there is tried at the neighbouring rate of the grid (first the way the rate last moved, else up),
  which starts at one seed (the seed noise is already measured) and gets more while undecided; it is
  kept when shown better than the current rate (lower bound above 0: two rates of one configuration
  cost the same, so any shown improvement is worth taking; the false-gain rate split over every rate
  comparison the ladder can make), and the walk goes on that way; it stops as soon as a neighbour is
  not shown better (its gain shown below the margin, or still undecided at ``max_seeds``); a walk that
  moved nothing the first way tries the other. The rung is then compared with the best at the rate
  its bracket ended on. Only a comparison that was not a gain gets a bracket, so where the best rate
  does not move the bracket costs the plateau rungs' neighbours, one seed each when they are clearly
  worse.
- The chosen rank: the smallest rank shown within the margin of the best rank (non-inferiority, `within`,
  with the same adaptive seeds), else the best rank; a rank a decided gain beat is not a candidate.
- Stage 2, wider target sets: at the chosen rank, the next target sets in ``ladder.targets`` order
  (default q,v then q,k,v,o then all-linear), each starting at the kept configuration's rate and judged
  at its own best rate of the bracket. A wider set is kept only when it is a gain over the kept one, with
  the same adaptive seeds.
- Stage 3, the recommendation: over every rung and target set of stages 1 and 2 at the rate it was
  judged at, the best-quality one
  (best mean) and the recommended one: the cheapest (fewest trainable parameters) shown within the
  margin of the best (the lower confidence bound of its difference to the best above minus the
  margin; undecided ones get seeds up to ``max_seeds``), else the best itself, said aloud. A
  configuration a decided gain put below another is never recommended over it, so the recommendation
  cannot contradict a comparison the ladder decided.

The plan is a pure function of the trials so far (`plan`), so the ladder resumes after a crash like
any sweep: the driver calls it, enqueues what it asks for (each trial tagged with its stage, rung and
seed; its rate is in its params), and stores the decisions. The extra seeds of an undecided comparison are ordinary slots with
the next seed index, and the replay gives every comparison exactly the seeds it had when it was first
decided, so later seeds never change an earlier decision. Every decision carries its evidence (means,
seeds used and why, the standard error, the t quantile and its degrees of freedom, the threshold) as
plain JSON, and a one-line text.
"""

from __future__ import annotations

import math
from typing import Any

from sweeps import stats as noise
from sweeps.engine.ladder_replay import Key, Replay
from sweeps.engine.ladder_rules import better as _better
from sweeps.engine.ladder_rules import comparisons, judge, looks, within
from sweeps.engine.ladder_rules import config_stats as _stats
from sweeps.engine.ladder_rules import fmt as _fmt
from sweeps.engine.ladder_rules import top as _top
from sweeps.engine.ladder_types import ConfigStats, LadderSpec, Observation, Plan, Slot

__all__ = ["comparisons", "judge", "looks", "plan", "summarise"]


def _calibrate(rp: Replay, spec: LadderSpec, config: Any) -> float | None:
    """Stage 0: the best candidate lr at the starting rank and targets (None while it runs or when every
    calibration trial failed; ``rp.out`` says which)."""
    out = rp.out
    slots = [Slot(0, i, config(spec.ranks[0], spec.targets[0], x), k, spec.calibration_steps)
             for i, x in enumerate(spec.lrs) for k in range(spec.calibration_seeds)]
    state = rp.slots_state(slots)
    if state != "finished":
        out.wait = state == "pending"
        return None
    cal = [_stats(0, i, config(spec.ranks[0], spec.targets[0], x), rp.observed((0, i, rp.li({"lr": x}))))
           for i, x in enumerate(spec.lrs)]
    usable = [c for c in cal if c.mean is not None]
    if not usable:
        out.done = True
        out.decisions.append({"stage": 0, "rung": None, "kind": "calibration", "text":
                              "every calibration trial failed: no learning rate to choose; the ladder stops",
                              "evidence": {"lrs": spec.lrs, "means": [None] * len(cal)}})
        return None
    calibrated = usable[0]
    for c in usable[1:]:
        if _better(spec, c, calibrated):
            calibrated = c
    lr = float(calibrated.params["lr"])
    edge = ""
    if lr in (min(spec.lrs), max(spec.lrs)):
        edge = (f"; it is the {'largest' if lr == max(spec.lrs) else 'smallest'} candidate, so a "
                f"{'larger' if lr == max(spec.lrs) else 'smaller'} lr might do better (widen calibration_lrs)")
    out.decisions.append({
        "stage": 0, "rung": None, "kind": "calibration",
        "text": (f"learning rate {lr:.3g} chosen: the best of {len(spec.lrs)} candidates at "
                 f"r={spec.ranks[0]} on {spec.targets[0]} ({spec.calibration_steps} steps): "
                 + ", ".join(f"{c.params['lr']:.3g} -> {_fmt(c.mean)}" for c in cal) + edge),
        "evidence": {"lrs": spec.lrs, "means": [c.mean for c in cal], "chosen_lr": lr, "at_edge": bool(edge),
                     "steps": spec.calibration_steps, "trials": [c.trials for c in cal]}})
    return lr


def plan(observations: list[Observation], spec: LadderSpec) -> Plan:
    """Replay the ladder over the trials so far and say what comes next (see the module docstring)."""
    out = Plan()
    rp = Replay(spec, observations, out)
    grid = rp.grid
    retune = spec.retune_lr and len(grid) > 1

    def config(r: int, targets: str, lr: float) -> dict[str, Any]:
        return {"r": r, "alpha": spec.alpha, "targets": targets, "lr": lr, "dropout": spec.dropout}

    # ---- stage 0: the learning rate
    lr = spec.lrs[0]
    if spec.calibration_steps is not None and len(spec.lrs) > 1:
        calibrated = _calibrate(rp, spec, config)
        if calibrated is None:
            return out
        lr = calibrated
    out.lr = lr
    stats, seen, beaten = rp.stats, rp.seen, rp.beaten

    def at(r: int, targets: str) -> Any:
        return lambda li: config(r, targets, grid[li])

    def rated_at(key: Key, params: dict[str, Any], inc_key: Key, vs: str, trend: int
                 ) -> tuple[noise.Comparison, ConfigStats, ConfigStats, str, Key, int] | None:
        """A rung or a target set against the incumbent at its starting rate, and, when that is not a
        gain, at the rate its lr bracket ends on (`Replay.bracket`, first towards ``trend``): (the
        comparison, both sides' stats, why those seeds, the key it was judged at, the bracket's move)."""
        name = f"r={params['r']} {params['targets']}"
        inc_label = f"{vs} {stats(inc_key).label()}"
        fought = rp.duel(key, params, inc_key, f"{name} at lr {grid[key[2]]:.3g} vs {inc_label}")
        if fought is None:
            return None
        cmp, st, inc, why = fought
        if cmp.verdict == noise.GAIN or not retune or st.mean is None:
            return cmp, st, inc, why, key, 0
        tuned = rp.bracket(key, at(int(params["r"]), str(params["targets"])), trend, name)
        if tuned is None:
            return None
        best_key, moved = tuned
        if best_key == key:
            return cmp, st, inc, why, key, 0
        fought = rp.duel(best_key, rp.params_of[best_key], inc_key,
                         f"{name} at lr {grid[best_key[2]]:.3g} vs {inc_label}")
        if fought is None:
            return None
        return (*fought, best_key, moved)

    def cost_key(s: ConfigStats) -> tuple[float, float]:
        return (s.trainable_params if s.trainable_params is not None else math.inf,
                -(s.mean if spec.maximize else -s.mean) if s.mean is not None else math.inf)

    def tried_rates(stage: int, rung: int) -> list[float]:
        return [grid[k[2]] for k in rp.order if k[:2] == (stage, rung)]

    def key_of(st: ConfigStats) -> Key:
        return (st.stage, st.rung, rp.li(st.params))

    # ---- stage 1: the rank ladder (each rung starts at the best rung's rate, moved one step further the
    # way the last bracket moved it: the rate follows the rank)
    ladder: list[Key] = []              # each rung's key at the rate it was judged at
    best: Key | None = None
    misses, trend = 0, 0
    start_li = rp.li({"lr": lr})
    for k, r in enumerate(spec.ranks):
        if k > 0 and spec.max_params is not None and stats(ladder[-1]).trainable_params is not None:
            prev = stats(ladder[-1])
            assert prev.trainable_params is not None
            lora = prev.lora_params if prev.lora_params is not None else prev.trainable_params
            predicted = prev.trainable_params + lora * (r / prev.params["r"] - 1)  # LoRA params scale with r
            if predicted > spec.max_params:
                out.decisions.append({"stage": 1, "rung": k, "kind": "stop", "text": (
                    f"stop before r={r}: it would train about {predicted:,.0f} parameters, above the limit "
                    f"max_params={spec.max_params:,.0f}"), "evidence": {"reason": "max_params", "r": r,
                                                                       "predicted_params": predicted,
                                                                       "limit": spec.max_params}})
                break
        li0 = start_li if best is None else min(len(grid) - 1, max(0, best[2] + (trend if spec.follow_trend else 0)))
        key: Key = (1, k, li0)
        params = config(r, spec.targets[0], grid[li0])
        prev_best = best
        if prev_best is None:
            first = rp.start(key, params)
            if first is None:
                return out
            st, judged = first, key
            significant, climbs = st.mean is not None, False
            text = (f"r={r}: every seed failed" if st.mean is None else
                    f"r={r} at lr {grid[li0]:.3g}: mean {st.mean:.4f} ± {_fmt(st.std)} over {st.n} seeds; the first "
                    "rung, the baseline")
            evidence: dict[str, Any] = {"verdict": None, "seeds": st.n, "seeds_given": spec.seeds,
                                        "seeds_why": "the baseline runs the minimum seeds", "delta": None,
                                        "threshold": None, "false_gain_rate": spec.false_gain_rate,
                                        "margin": spec.margin, "lr": grid[li0]}
        else:
            rated_rung = rated_at(key, params, prev_best, "best", trend)
            if rated_rung is None:
                return out
            cmp, st, inc, why, judged, _ = rated_rung
            significant = cmp.verdict == noise.GAIN
            climbs = spec.climb_undecided and cmp.verdict == noise.UNDECIDED and st.mean is not None
            text = (f"r={r}: every seed failed" if st.mean is None else
                    f"{st.label()}: mean {st.mean:.4f} ± {_fmt(st.std)} (n={st.n}) vs best {inc.mean:.4f} "
                    f"({inc.label()}, n={inc.n}): {cmp.text}; {why} -> "
                    + ("a significant gain: go up" if significant else
                       f"undecided at max_seeds: not a plateau, the ladder climbs on (the best stays {inc.label()})"
                       if climbs else "no gain: a plateau rung" if cmp.verdict == noise.NO_GAIN else
                       "not a significant gain"))
            evidence = rp.evidence(cmp, st, inc, judged, why)
            evidence.update({"best_mean": inc.mean, "best_r": inc.params["r"]})
        if significant:
            if prev_best is not None:
                beaten[prev_best] = f"r={r} was shown a gain over it (stage 1)"
                trend = (judged[2] > prev_best[2]) - (judged[2] < prev_best[2])  # where the best rate went
            best, misses = judged, 0
        elif not (prev_best is not None and climbs):
            misses += 1
        ladder.append(judged)
        evidence.update({"r": r, "mean": st.mean, "std": st.std, "n": st.n, "values": st.values,
                         "significant": bool(significant), "misses": misses, "trials": st.trials,
                         "lrs_tried": tried_rates(1, k)})
        out.decisions.append({"stage": 1, "rung": k, "kind": "rank", "text": text, "evidence": evidence})
        if spec.max_train_s is not None and st.train_s is not None and st.train_s > spec.max_train_s:
            out.decisions.append({"stage": 1, "rung": k, "kind": "stop", "text": (
                f"stop after r={r}: its trials trained {st.train_s:.1f} s on average, above max_train_s="
                f"{spec.max_train_s:g}"), "evidence": {"reason": "max_train_s", "train_s": st.train_s,
                                                       "limit": spec.max_train_s}})
            break
        if spec.max_memory_mb is not None and st.peak_memory_bytes is not None and \
                st.peak_memory_bytes / 2 ** 20 > spec.max_memory_mb:
            out.decisions.append({"stage": 1, "rung": k, "kind": "stop", "text": (
                f"stop after r={r}: peak memory {st.peak_memory_bytes / 2 ** 20:.0f} MiB is above max_memory_mb="
                f"{spec.max_memory_mb:g}"), "evidence": {"reason": "max_memory_mb",
                                                         "peak_memory_mb": st.peak_memory_bytes / 2 ** 20,
                                                         "limit": spec.max_memory_mb}})
            break
        if misses >= spec.patience:
            out.decisions.append({"stage": 1, "rung": k, "kind": "stop", "text": (
                f"plateau: {misses} rung(s) in a row without a significant gain (patience {spec.patience}"
                + (", each at its best rate of the lr bracket" if retune else "") + f"); the ladder stops at r={r}"),
                "evidence": {"reason": "plateau", "misses": misses, "patience": spec.patience}})
            break
    else:
        out.decisions.append({"stage": 1, "rung": len(spec.ranks) - 1, "kind": "stop", "text": (
            f"reached r_max={spec.ranks[-1]} while still gaining" if misses == 0 else
            f"reached r_max={spec.ranks[-1]}"), "evidence": {"reason": "r_max", "r_max": spec.ranks[-1]}})

    rated = [key for key in ladder if stats(key).mean is not None]  # with every seed given so far
    if not rated:
        out.done = True
        out.decisions.append({"stage": 1, "rung": None, "kind": "chosen_rank",
                              "text": "no rung finished with a result: nothing to recommend", "evidence": {}})
        return out
    top_key = key_of(_top(spec, [stats(x) for x in rated]))
    top = stats(top_key)
    smaller = [x for x in rated if stats(x).params["r"] < top.params["r"] and x not in beaten]
    settled = rp.settle(smaller, top_key, f"the chosen rank (best r={top.params['r']})")
    if settled is None:
        return out
    pick, tried = settled
    chosen, top = stats(pick), stats(top_key)
    out.chosen_rank = int(chosen.params["r"])
    ruled = [f"{stats(x).label()} ({why})" for x, why in beaten.items() if x[0] == 1]
    if pick != top_key:
        text = (f"chosen rank r={chosen.params['r']}: the smallest rank shown within the margin {spec.margin:g} of the "
                f"best rank, {top.label()} ({_fmt(top.mean)}, n={top.n}): {tried[-1]['text']}")
    elif tried:
        text = (f"chosen rank r={chosen.params['r']}: the best rung, {top.label()} ({_fmt(top.mean)}, n={top.n}); no "
                f"smaller rank is shown within the margin {spec.margin:g} of it: " + "; ".join(
                    f"r={t['config']['params']['r']} {t['text']}" for t in tried))
    else:
        text = (f"chosen rank r={chosen.params['r']}: the best rung, {top.label()} ({_fmt(top.mean)}, n={top.n}), and "
                "no smaller rank is left to try")
    if ruled:
        text += "; ruled out by a decided gain: " + ", ".join(ruled)
    pooled, dof = noise.pooled_std(x.values for x in seen())
    out.decisions.append({"stage": 1, "rung": None, "kind": "chosen_rank", "text": text, "evidence": {
        "chosen_r": chosen.params["r"], "chosen_mean": chosen.mean, "chosen_lr": chosen.params["lr"],
        "best_r": top.params["r"], "best_mean": top.mean, "best_lr": top.params["lr"],
        "margin": spec.margin, "pooled_std": pooled, "dof": dof, "tried": tried,
        "ruled_out": {f"{x[0]}.{x[1]}": why for x, why in beaten.items()},
        "ladder": [{"r": x.params["r"], "lr": x.params["lr"], "mean": x.mean, "std": x.std, "n": x.n}
                   for x in (stats(y) for y in ladder)]}})

    # ---- stage 2: wider target sets at the chosen rank, each judged at its own best rate of the bracket
    kept = pick
    reps = list(ladder)                 # the configurations stage 3 chooses among: one per rung and set
    if spec.stage2:
        r_chosen = int(chosen.params["r"])
        for i, targets in enumerate(spec.targets[1:], start=1):
            rated_set = rated_at((2, i, kept[2]), config(r_chosen, targets, grid[kept[2]]), kept, "kept", 0)
            if rated_set is None:
                return out
            cmp, st, inc, why, judged, _ = rated_set
            reps.append(judged)
            over = (spec.max_params is not None and st.trainable_params is not None
                    and st.trainable_params > spec.max_params)
            keep = cmp.verdict == noise.GAIN and not over
            text = (f"{targets} at r={r_chosen}: " + ("every seed failed" if st.mean is None else
                    f"{st.label()}: mean {st.mean:.4f} ± {_fmt(st.std)} (n={st.n}) vs kept {inc.label()} "
                    f"{inc.mean:.4f} (n={inc.n}): {cmp.text}; {why} -> "
                    + ("kept" if keep else "over max_params, not kept" if over else "not kept")))
            evidence = rp.evidence(cmp, st, inc, judged, why)
            evidence.update({"targets": targets, "r": r_chosen, "mean": st.mean, "std": st.std,
                             "n": st.n, "values": st.values, "kept_targets": inc.params["targets"],
                             "kept_mean": inc.mean, "kept": bool(keep), "trainable_params": st.trainable_params,
                             "trials": st.trials, "lrs_tried": tried_rates(2, i)})
            out.decisions.append({"stage": 2, "rung": i, "kind": "targets", "text": text, "evidence": evidence})
            if keep:
                beaten[kept] = f"{targets} was shown a gain over it (stage 2)"
                kept = judged

    # ---- stage 3: quality against cost, over each rung and target set at the rate it was judged at
    rated = [x for x in dict.fromkeys(reps) if stats(x).mean is not None]
    top_key = key_of(_top(spec, [stats(x) for x in rated]))
    top = stats(top_key)
    cheaper = [x for x in sorted(rated, key=lambda y: cost_key(stats(y)))
               if cost_key(stats(x)) < cost_key(top) and x not in beaten]
    settled = rp.settle(cheaper, top_key, "the recommendation")
    if settled is None:
        return out
    pick, tried = settled
    everything = seen()
    rec, top = stats(pick), stats(top_key)
    pooled, dof = noise.pooled_std(x.values for x in everything)
    same = within(spec, top, top, everything, max(1, len(cheaper)))
    out.threshold, out.margin = same.threshold, spec.margin
    out.recommendation, out.best_quality = rec.brief(), top.brief()
    head = (f"recommended: {rec.label()} ({_fmt(rec.mean)} ± {_fmt(rec.std)}, n={rec.n}, "
            f"{_fmt(rec.trainable_params)} trainable parameters)")
    undecided = [t for t in tried if t["verdict"] == noise.UNDECIDED]
    if pick != top_key:
        shown = tried[-1]
        why = (f"within {spec.margin:g} of the best, shown (lower bound {shown['lower']:.4g} > -{spec.margin:g}): "
               f"{shown['text']}")
    elif not cheaper:
        why = "the best itself: no cheaper configuration is left that a decided gain did not rule out"
    else:
        why = (f"the best itself: none of the {len(cheaper)} cheaper configuration(s) is shown within the margin "
               f"{spec.margin:g} of it" + (f" ({len(undecided)} still undecided at max_seeds={rp.top_n}: the "
                                          "conservative choice)" if undecided else ""))
    ruled = [f"{stats(x).label()} ({w})" for x, w in beaten.items()]
    out.why = why
    out.decisions.append({"stage": 3, "rung": None, "kind": "recommendation", "text": (
        f"{head}: {why}; best quality: {top.label()} ({_fmt(top.mean)}, n={top.n})"
        + ("; ruled out by a decided gain: " + ", ".join(ruled) if ruled else "")),
        "evidence": {"margin": spec.margin, "threshold": same.threshold, "pooled_std": pooled, "dof": dof,
                     "false_gain_rate": spec.false_gain_rate, "shown": pick != top_key,
                     "tried": tried, "ruled_out": {f"{x[0]}.{x[1]}": w for x, w in beaten.items()},
                     "table": [x.brief() for x in everything], "recommended": rec.brief(), "best": top.brief()}})
    out.done = True
    return out


def summarise(p: Plan) -> dict[str, Any]:
    """The plan's decisions and results as JSON-ready data (the study's user attr, the parent run)."""
    return p.as_attr()
