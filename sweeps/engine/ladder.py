"""``strategy: ladder``: the start-low-then-increase procedure, as a plan over Optuna trials.

The procedure (the LoRA paper's advice, made mechanical and noise-aware):

- Stage 0, learning-rate calibration (``ladder.calibrate``, on by default): the starting rank and
  targets at each candidate lr, for ``ladder.calibration_steps`` steps (default: half the trial's
  steps); the best lr is then fixed for every later trial. alpha is fixed too (default: the starting
  rank, as the paper did), so the alpha/r scaling keeps update sizes comparable across ranks.
- Stage 1, the rank ladder: ranks ``r_start, 2 r_start, 4 r_start, ... <= r_max`` on the starting
  target set. Each rung is compared with the best rung so far by the one rule of `sweeps.stats`: a
  Student-t bound on the difference of the two seed means against the sweep's margin (``search.margin``,
  the smallest difference that matters), with the seed std pooled over every configuration run so far
  (stages 1 and 2, which share the training length), whose false-gain rate ``false_gain_rate`` is split
  over every comparison the ladder can make and every look at one, so a whole ladder calls a gain on
  pure noise at most that often. A comparison is a gain (shown above the margin), no gain (shown below
  it: the plateau, at the minimum seeds when the noise allows), or undecided; an undecided one gets one
  more seed on both sides (``seeds`` is the minimum, ``max_seeds`` the maximum) and is looked at
  again; still undecided at ``max_seeds``, it counts as no gain. The
  ladder climbs while rungs gain, and stops after ``patience`` rungs in a row without a gain (the
  plateau), at ``r_max``, or when a cost limit is reached (the next rung's trainable parameters above
  ``max_params``; a rung's mean train time above ``max_train_s``, or its peak memory above
  ``max_memory_mb``).
- The chosen rank: the smallest rank shown within the margin of the best rank (non-inferiority, `within`,
  with the same adaptive seeds), else the best rank; a rank a decided gain beat is not a candidate.
- Stage 2, wider target sets: at the chosen rank, the next target sets in ``ladder.targets`` order
  (default q,v then q,k,v,o then all-linear). A wider set is kept only when it is a gain over the kept
  one, with the same adaptive seeds.
- Stage 3, the recommendation: over every configuration of stages 1 and 2, the best-quality one
  (best mean) and the recommended one: the cheapest (fewest trainable parameters) shown within the
  margin of the best (the lower confidence bound of its difference to the best above minus the
  margin; undecided ones get seeds up to ``max_seeds``), else the best itself, said aloud. A
  configuration a decided gain put below another is never recommended over it, so the recommendation
  cannot contradict a comparison the ladder decided.

The plan is a pure function of the trials so far (`plan`), so the ladder resumes after a crash like
any sweep: the driver calls it, enqueues what it asks for (each trial tagged with its stage, rung and
seed), and stores the decisions. The extra seeds of an undecided comparison are ordinary slots with
the next seed index, and the replay gives every comparison exactly the seeds it had when it was first
decided, so later seeds never change an earlier decision. Every decision carries its evidence (means,
seeds used and why, the standard error, the t quantile and its degrees of freedom, the threshold) as
plain JSON, and a one-line text.
"""

from __future__ import annotations

import math
from typing import Any

from sweeps import stats as noise
from sweeps.engine.ladder_rules import better as _better
from sweeps.engine.ladder_rules import comparisons, judge, looks, one_more, within
from sweeps.engine.ladder_rules import config_stats as _stats
from sweeps.engine.ladder_rules import fmt as _fmt
from sweeps.engine.ladder_rules import top as _top
from sweeps.engine.ladder_types import PENDING, ConfigStats, LadderSpec, Observation, Plan, Slot, most_seeds

__all__ = ["comparisons", "judge", "looks", "plan", "summarise"]


def plan(observations: list[Observation], spec: LadderSpec) -> Plan:
    """Replay the ladder over the trials so far and say what comes next (see the module docstring)."""
    out = Plan()
    live = [o for o in observations if not o.retried]
    have: dict[tuple[int, int, int], Observation] = {}
    by_slot: dict[tuple[int, int], list[Observation]] = {}
    for o in live:
        have[(o.stage, o.rung, o.seed_index)] = o
        by_slot.setdefault((o.stage, o.rung), []).append(o)

    def rung_state(slots: list[Slot]) -> str:
        """"missing" (some not in the study: they get enqueued), "pending", or "finished"."""
        missing = [s for s in slots if s.key() not in have]
        if missing:
            out.enqueue.extend(missing)
            return "missing"
        if any(have[s.key()].state in PENDING for s in slots):
            return "pending"
        return "finished"

    def config(r: int, targets: str, lr: float) -> dict[str, Any]:
        return {"r": r, "alpha": spec.alpha, "targets": targets, "lr": lr, "dropout": spec.dropout}

    # ---- stage 0: the learning rate
    lr = spec.lrs[0]
    if spec.calibration_steps is not None and len(spec.lrs) > 1:
        slots = [Slot(0, i, config(spec.ranks[0], spec.targets[0], x), k, spec.calibration_steps)
                 for i, x in enumerate(spec.lrs) for k in range(spec.calibration_seeds)]
        state = rung_state(slots)
        if state != "finished":
            out.wait = state == "pending"
            return out
        cal = [_stats(0, i, config(spec.ranks[0], spec.targets[0], x), by_slot.get((0, i), []))
               for i, x in enumerate(spec.lrs)]
        usable = [c for c in cal if c.mean is not None]
        if not usable:
            out.done = True
            out.decisions.append({"stage": 0, "rung": None, "kind": "calibration", "text":
                                  "every calibration trial failed: no learning rate to choose; the ladder stops",
                                  "evidence": {"lrs": spec.lrs, "means": [None] * len(cal)}})
            return out
        calibrated = usable[0]
        for c in usable[1:]:
            if _better(spec, c, calibrated):
                calibrated = c
        lr = float(calibrated.params["lr"])
        edge = ""
        if len(spec.lrs) > 1 and lr in (min(spec.lrs), max(spec.lrs)):
            edge = (f"; it is the {'largest' if lr == max(spec.lrs) else 'smallest'} candidate, so a "
                    f"{'larger' if lr == max(spec.lrs) else 'smaller'} lr might do better (widen calibration_lrs)")
        out.decisions.append({
            "stage": 0, "rung": None, "kind": "calibration",
            "text": (f"learning rate {lr:.3g} chosen: the best of {len(spec.lrs)} candidates at "
                     f"r={spec.ranks[0]} on {spec.targets[0]} ({spec.calibration_steps} steps): "
                     + ", ".join(f"{c.params['lr']:.3g} -> {_fmt(c.mean)}" for c in cal) + edge),
            "evidence": {"lrs": spec.lrs, "means": [c.mean for c in cal], "chosen_lr": lr, "at_edge": bool(edge),
                         "steps": spec.calibration_steps, "trials": [c.trials for c in cal]}})
    out.lr = lr

    # ---- the replay's state: how many seeds each configuration of stages 1 and 2 has been given so
    # far, so every comparison sees exactly the seeds it had when it was decided
    given: dict[tuple[int, int], int] = {}
    params_of: dict[tuple[int, int], dict[str, Any]] = {}
    order: list[tuple[int, int]] = []   # every stage-1/2 configuration, for the pooled noise
    top_n = most_seeds(spec)

    def give(wanted: dict[tuple[int, int], int]) -> bool:
        """Give each configuration that many seeds (slots 0..n-1); True once all of them finished,
        else their missing slots are enqueued (``out.enqueue``) or some still run (``out.wait``)."""
        slots = []
        for key, n in wanted.items():
            given[key] = max(given.get(key, 0), n)
            slots += [Slot(key[0], key[1], params_of[key], i) for i in range(given[key])]
        state = rung_state(slots)
        out.wait = state == "pending"
        return state == "finished"

    memo: dict[tuple[int, int, int], ConfigStats] = {}

    def stats(key: tuple[int, int]) -> ConfigStats:
        """The configuration's statistics over the seeds given to it so far."""
        at = (*key, given[key])
        if at not in memo:
            obs = [o for o in by_slot.get(key, []) if o.seed_index < given[key]]
            memo[at] = _stats(key[0], key[1], params_of[key], obs)
        return memo[at]

    def seen() -> list[ConfigStats]:
        return [stats(k) for k in order]

    def start(key: tuple[int, int], params: dict[str, Any]) -> ConfigStats | None:
        """The configuration at the minimum seeds, once they all finished (None before)."""
        params_of[key] = params
        if not give({key: spec.seeds}):
            return None
        if key not in order:
            order.append(key)
        return stats(key)

    def duel(key: tuple[int, int], params: dict[str, Any], inc_key: tuple[int, int],
             what: str) -> tuple[noise.Comparison, ConfigStats, ConfigStats, str] | None:
        """Compare a configuration with the incumbent, adding one seed to both sides while undecided (up
        to ``max_seeds``): (the comparison, both sides' stats, why it used the seeds it used); None while
        seeds are still to run."""
        st = start(key, params)
        if st is None:
            return None
        while True:
            inc = stats(inc_key)
            c = judge(spec, st, inc, seen())
            n = given[key]
            more = one_more(given, key, inc_key, top_n)
            if c.verdict != noise.UNDECIDED or more is None or st.mean is None:
                if n == spec.seeds:
                    why = f"decided at the minimum {n} seeds"
                elif c.verdict == noise.UNDECIDED:
                    why = f"still undecided at max_seeds={n}: counted as no gain"
                else:
                    why = f"undecided at {spec.seeds} seeds, decided at {n}"
                return c, st, inc, why
            out.decisions.append({"stage": key[0], "rung": key[1], "kind": "more_seeds", "text": (
                f"{what}: undecided with {n} vs {given[inc_key]} seeds ({c.text}); one more seed each "
                f"(up to max_seeds={top_n})"), "evidence": {
                "seeds": n, "incumbent_seeds": given[inc_key], "next_seeds": more[key],
                "next_incumbent_seeds": more[inc_key], "max_seeds": top_n,
                "comparison": c.evidence}})
            if not give(more):
                return None
            st = stats(key)

    def verdict_evidence(c: noise.Comparison, st: ConfigStats, inc: ConfigStats, why: str) -> dict[str, Any]:
        return {"verdict": c.verdict, "seeds": st.n, "seeds_given": given[(st.stage, st.rung)],
                "incumbent_seeds": inc.n, "seeds_why": why, "delta": c.gain, "threshold": c.threshold,
                "se": c.se, "t": c.t, "dof": c.evidence.get("dof"), "pooled_std": c.evidence.get("pooled_std"),
                "lower": c.lower, "upper": c.upper, "false_gain_rate": spec.false_gain_rate,
                "margin": spec.margin, "comparison": c.evidence}

    beaten: dict[tuple[int, int], str] = {}   # configurations a decided gain put outside the margin

    def settle(candidates: list[tuple[int, int]], top_key: tuple[int, int],
               what: str) -> tuple[tuple[int, int], list[dict[str, Any]]] | None:
        """The cheapest of ``candidates`` (cheapest first) shown within the margin of ``top_key``
        (`within`), adding one seed to both sides while one is undecided (up to ``max_seeds``), else
        ``top_key`` itself: (the pick, every candidate's verdict as JSON); None while seeds run."""
        tried: list[dict[str, Any]] = []
        for key in candidates:
            while True:
                st, top = stats(key), stats(top_key)
                c = within(spec, st, top, seen(), len(candidates))
                n = given[key]
                more = one_more(given, key, top_key, top_n)
                if c.verdict != noise.UNDECIDED or more is None or st.mean is None:
                    break
                out.decisions.append({"stage": key[0], "rung": key[1], "kind": "more_seeds", "text": (
                    f"{what}: is {st.label()} within the margin {spec.margin:g} of {top.label()}? undecided with "
                    f"{n} vs {given[top_key]} seeds ({c.text}); one more seed each (up to max_seeds={top_n})"),
                    "evidence": {"seeds": n, "incumbent_seeds": given[top_key], "next_seeds": more[key],
                                 "next_incumbent_seeds": more[top_key], "max_seeds": top_n,
                                 "comparison": c.evidence}})
                if not give(more):
                    return None
            tried.append({"config": st.brief(), "verdict": c.verdict, "text": c.text, "lower": c.lower,
                          "upper": c.upper, "seeds": st.n, "best_seeds": top.n, "comparison": c.evidence})
            if c.verdict == noise.NON_INFERIOR:
                return key, tried
        return top_key, tried

    def cost_key(s: ConfigStats) -> tuple[float, float]:
        return (s.trainable_params if s.trainable_params is not None else math.inf,
                -(s.mean if spec.maximize else -s.mean) if s.mean is not None else math.inf)

    # ---- stage 1: the rank ladder
    ladder: list[ConfigStats] = []
    best: ConfigStats | None = None
    misses = 0
    for k, r in enumerate(spec.ranks):
        if k > 0 and spec.max_params is not None and ladder[-1].trainable_params is not None:
            prev = ladder[-1]
            lora = prev.lora_params if prev.lora_params is not None else prev.trainable_params
            predicted = prev.trainable_params + lora * (r / prev.params["r"] - 1)  # LoRA params scale with r
            if predicted > spec.max_params:
                out.decisions.append({"stage": 1, "rung": k, "kind": "stop", "text": (
                    f"stop before r={r}: it would train about {predicted:,.0f} parameters, above the limit "
                    f"max_params={spec.max_params:,.0f}"), "evidence": {"reason": "max_params", "r": r,
                                                                       "predicted_params": predicted,
                                                                       "limit": spec.max_params}})
                break
        params = config(r, spec.targets[0], lr)
        prev_best = best
        if prev_best is None:
            first = start((1, k), params)
            if first is None:
                return out
            st = first
            significant = st.mean is not None
            text = (f"r={r}: every seed failed" if st.mean is None else
                    f"r={r}: mean {st.mean:.4f} ± {_fmt(st.std)} over {st.n} seeds; the first rung, the baseline")
            evidence: dict[str, Any] = {"verdict": None, "seeds": st.n, "seeds_given": spec.seeds,
                                        "seeds_why": "the baseline runs the minimum seeds", "delta": None,
                                        "threshold": None, "false_gain_rate": spec.false_gain_rate,
                                        "margin": spec.margin}
        else:
            what = f"r={r} vs best r={prev_best.params['r']}"
            fought = duel((1, k), params, (prev_best.stage, prev_best.rung), what)
            if fought is None:
                return out
            cmp, st, inc, why = fought
            significant = cmp.verdict == noise.GAIN
            best_now = inc
            text = (f"r={r}: every seed failed" if st.mean is None else
                    f"r={r}: mean {st.mean:.4f} ± {_fmt(st.std)} (n={st.n}) vs best {best_now.mean:.4f} "
                    f"(r={best_now.params['r']}, n={best_now.n}): {cmp.text}; {why} -> "
                    + ("a significant gain: go up" if significant else "not a significant gain"))
            evidence = verdict_evidence(cmp, st, inc, why)
            evidence.update({"best_mean": best_now.mean, "best_r": best_now.params["r"]})
        if significant:
            if prev_best is not None:
                beaten[(prev_best.stage, prev_best.rung)] = f"r={r} was shown a gain over it (stage 1)"
            best, misses = st, 0
        else:
            misses += 1
        ladder.append(st)
        evidence.update({"r": r, "mean": st.mean, "std": st.std, "n": st.n, "values": st.values,
                         "significant": bool(significant), "misses": misses, "trials": st.trials})
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
                f"plateau: {misses} rung(s) in a row without a significant gain (patience {spec.patience}); "
                f"the ladder stops at r={r}"), "evidence": {"reason": "plateau", "misses": misses,
                                                           "patience": spec.patience}})
            break
    else:
        out.decisions.append({"stage": 1, "rung": len(spec.ranks) - 1, "kind": "stop", "text": (
            f"reached r_max={spec.ranks[-1]} while still gaining" if misses == 0 else
            f"reached r_max={spec.ranks[-1]}"), "evidence": {"reason": "r_max", "r_max": spec.ranks[-1]}})

    rungs = [stats((s.stage, s.rung)) for s in ladder]  # with every seed given so far
    rated = [s for s in rungs if s.mean is not None]
    if not rated:
        out.done = True
        out.decisions.append({"stage": 1, "rung": None, "kind": "chosen_rank",
                              "text": "no rung finished with a result: nothing to recommend", "evidence": {}})
        return out
    top = _top(spec, rated)
    top_key = (top.stage, top.rung)
    smaller = [(s.stage, s.rung) for s in rated if s.params["r"] < top.params["r"] and (s.stage, s.rung) not in beaten]
    settled = settle(smaller, top_key, f"the chosen rank (best r={top.params['r']})")
    if settled is None:
        return out
    pick, tried = settled
    chosen, top = stats(pick), stats(top_key)
    out.chosen_rank = int(chosen.params["r"])
    ruled = [f"r={stats(k).params['r']} ({why})" for k, why in beaten.items() if k[0] == 1]
    if pick != top_key:
        text = (f"chosen rank r={chosen.params['r']}: the smallest rank shown within the margin {spec.margin:g} of the "
                f"best rank r={top.params['r']} ({_fmt(top.mean)}, n={top.n}): {tried[-1]['text']}")
    elif tried:
        text = (f"chosen rank r={chosen.params['r']}: the best rung ({_fmt(top.mean)}, n={top.n}); no smaller rank is "
                f"shown within the margin {spec.margin:g} of it: " + "; ".join(
                    f"r={t['config']['params']['r']} {t['text']}" for t in tried))
    else:
        text = (f"chosen rank r={chosen.params['r']}: the best rung ({_fmt(top.mean)}, n={top.n}), and no smaller rank "
                "is left to try")
    if ruled:
        text += "; ruled out by a decided gain: " + ", ".join(ruled)
    pooled, dof = noise.pooled_std(s.values for s in seen())
    out.decisions.append({"stage": 1, "rung": None, "kind": "chosen_rank", "text": text, "evidence": {
        "chosen_r": chosen.params["r"], "chosen_mean": chosen.mean, "best_r": top.params["r"], "best_mean": top.mean,
        "margin": spec.margin, "pooled_std": pooled, "dof": dof, "tried": tried,
        "ruled_out": {f"{k[0]}.{k[1]}": why for k, why in beaten.items()},
        "ladder": [{"r": s.params["r"], "mean": s.mean, "std": s.std, "n": s.n}
                   for s in (stats((x.stage, x.rung)) for x in ladder)]}})

    # ---- stage 2: wider target sets at the chosen rank
    kept = chosen
    if spec.stage2:
        for i, targets in enumerate(spec.targets[1:], start=1):
            what = f"{targets} vs kept {kept.params['targets']} at r={chosen.params['r']}"
            fought = duel((2, i), config(int(chosen.params["r"]), targets, lr), (kept.stage, kept.rung), what)
            if fought is None:
                return out
            cmp, st, inc, why = fought
            over = (spec.max_params is not None and st.trainable_params is not None
                    and st.trainable_params > spec.max_params)
            keep = cmp.verdict == noise.GAIN and not over
            text = (f"{targets} at r={chosen.params['r']}: " + ("every seed failed" if st.mean is None else
                    f"mean {st.mean:.4f} ± {_fmt(st.std)} (n={st.n}) vs kept {inc.params['targets']} "
                    f"{inc.mean:.4f} (n={inc.n}): {cmp.text}; {why} -> "
                    + ("kept" if keep else "over max_params, not kept" if over else "not kept")))
            evidence = verdict_evidence(cmp, st, inc, why)
            evidence.update({"targets": targets, "r": chosen.params["r"], "mean": st.mean, "std": st.std,
                             "n": st.n, "values": st.values, "kept_targets": inc.params["targets"],
                             "kept_mean": inc.mean, "kept": bool(keep), "trainable_params": st.trainable_params,
                             "trials": st.trials})
            out.decisions.append({"stage": 2, "rung": i, "kind": "targets", "text": text, "evidence": evidence})
            if keep:
                beaten[(kept.stage, kept.rung)] = f"{targets} was shown a gain over it (stage 2)"
                kept = st

    # ---- stage 3: quality against cost
    rated = [s for s in seen() if s.mean is not None]
    top = _top(spec, rated)
    top_key = (top.stage, top.rung)
    cheaper = [(s.stage, s.rung) for s in sorted(rated, key=cost_key)
               if cost_key(s) < cost_key(top) and (s.stage, s.rung) not in beaten]
    settled = settle(cheaper, top_key, "the recommendation")
    if settled is None:
        return out
    pick, tried = settled
    everything = seen()
    rec, top = stats(pick), stats(top_key)
    pooled, dof = noise.pooled_std(s.values for s in everything)
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
               f"{spec.margin:g} of it" + (f" ({len(undecided)} still undecided at max_seeds={top_n}: the "
                                          "conservative choice)" if undecided else ""))
    ruled = [f"{stats(k).label()} ({w})" for k, w in beaten.items()]
    out.why = why
    out.decisions.append({"stage": 3, "rung": None, "kind": "recommendation", "text": (
        f"{head}: {why}; best quality: {top.label()} ({_fmt(top.mean)}, n={top.n})"
        + ("; ruled out by a decided gain: " + ", ".join(ruled) if ruled else "")),
        "evidence": {"margin": spec.margin, "threshold": same.threshold, "pooled_std": pooled, "dof": dof,
                     "false_gain_rate": spec.false_gain_rate, "shown": pick != top_key,
                     "tried": tried, "ruled_out": {f"{k[0]}.{k[1]}": w for k, w in beaten.items()},
                     "table": [s.brief() for s in everything], "recommended": rec.brief(), "best": top.brief()}})
    out.done = True
    return out


def summarise(p: Plan) -> dict[str, Any]:
    """The plan's decisions and results as JSON-ready data (the study's user attr, the parent run)."""
    return p.as_attr()
