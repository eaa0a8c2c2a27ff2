"""``strategy: ladder``: the start-low-then-increase procedure, as a plan over Optuna trials.

The procedure (the LoRA paper's advice, made mechanical and noise-aware):

- Stage 0, learning-rate calibration (``ladder.calibrate``, on by default): the starting rank and
  targets at each candidate lr, for ``ladder.calibration_steps`` steps (default: half the trial's
  steps); the best lr is then fixed for every later trial. alpha is fixed too (default: the starting
  rank, as the paper did), so the alpha/r scaling keeps update sizes comparable across ranks.
- Stage 1, the rank ladder: ranks ``r_start, 2 r_start, 4 r_start, ... <= r_max`` on the starting
  target set, each with ``seeds`` seeds. A rung is a significant gain when its seed mean beats the
  best mean so far by more than the threshold ``max(min_delta, z * pooled_std / sqrt(seeds))``,
  where ``pooled_std`` pools the seed standard deviations of every configuration run so far (stage
  1 and 2, which share the training length). The ladder climbs while rungs gain, and stops after
  ``patience`` rungs in a row without a significant gain (the plateau), at ``r_max``, or when a
  cost limit is reached (the next rung's trainable parameters above ``max_params``; a rung's mean
  train time above ``max_train_s``, or its peak memory above ``max_memory_mb``).
- The chosen rank: the smallest rank whose mean is within the noise band of the best rank
  (``mean >= best - threshold`` for a maximised metric).
- Stage 2, wider target sets: at the chosen rank, the next target sets in ``ladder.targets`` order
  (default q,v then q,k,v,o then all-linear). A wider set is kept only when it beats the kept one by
  more than the threshold.
- Stage 3, the recommendation: over every configuration of stages 1 and 2, the best-quality one
  (best mean) and the recommended one: the cheapest (fewest trainable parameters) whose mean is
  within the noise band of the best.

The plan is a pure function of the trials so far (`plan`), so the ladder resumes after a crash like
any sweep: the driver calls it, enqueues what it asks for (each trial tagged with its stage, rung and
seed), and stores the decisions. Every decision carries its evidence (means, stds, deltas, the
threshold) as plain JSON.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from sweeps import stats as noise
from sweeps.engine.ladder_types import PENDING, ConfigStats, LadderSpec, Observation, Plan, Slot

__all__ = ["plan", "summarise", "threshold"]


def _stats(stage: int, rung: int, params: dict[str, Any], obs: list[Observation]) -> ConfigStats:
    done = [o for o in obs if o.state == "COMPLETE" and o.value is not None and math.isfinite(o.value)]
    values = [float(o.value) for o in sorted(done, key=lambda o: o.seed_index)]  # type: ignore[arg-type]
    mean = statistics.fmean(values) if values else None
    std = statistics.stdev(values) if len(values) >= 2 else None

    def cost(key: str) -> float | None:
        xs = [float(o.cost[key]) for o in done if o.cost.get(key) is not None]
        return statistics.fmean(xs) if xs else None

    return ConfigStats(stage, rung, params, values, mean, std, len(values), cost("trainable_params"),
                       cost("lora_params"), cost("train_s"), cost("peak_memory_bytes"), sorted(o.number for o in obs
                                                                          if o.number is not None))


def threshold(spec: LadderSpec, stats: list[ConfigStats]) -> tuple[float, float | None]:
    """(the significance threshold, the pooled seed std it came from): the rule of `sweeps.stats`."""
    pooled, _ = noise.pooled_std(s.values for s in stats)
    return noise.threshold(pooled, spec.seeds, spec.z, spec.min_delta), pooled


def _gain(spec: LadderSpec, new: float | None, old: float | None) -> float:
    """How much better ``new`` is than ``old`` (positive = better), whatever the direction."""
    if new is None:
        return -math.inf
    if old is None:
        return math.inf
    return new - old if spec.maximize else old - new


def _better(spec: LadderSpec, a: ConfigStats, b: ConfigStats | None) -> bool:
    return b is None or b.mean is None or (a.mean is not None and _gain(spec, a.mean, b.mean) > 0)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


# --------------------------------------------------------------------------- the plan


def plan(observations: list[Observation], spec: LadderSpec) -> Plan:
    """Replay the ladder over the trials so far and say what comes next (see the module docstring)."""
    out = Plan()
    live = [o for o in observations if not o.retried]
    by_slot: dict[tuple[int, int], list[Observation]] = {}
    for o in live:
        by_slot.setdefault((o.stage, o.rung), []).append(o)

    def rung_state(slots: list[Slot]) -> str:
        """"missing" (some not in the study: they get enqueued), "pending", or "finished"."""
        have = {(o.stage, o.rung, o.seed_index): o for o in live}
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

    # ---- stage 1: the rank ladder
    ladder: list[ConfigStats] = []
    seen: list[ConfigStats] = []   # every stage-1/2 configuration, for the pooled noise

    def run_rung(stage: int, rung: int, params: dict[str, Any]) -> ConfigStats | None:
        """The configuration's seed statistics once all its seeds finished (added to ``seen``); None
        while its trials are still to enqueue (``out.enqueue``) or running (``out.wait``)."""
        state = rung_state([Slot(stage, rung, params, s) for s in range(spec.seeds)])
        if state != "finished":
            out.wait = state == "pending"
            return None
        st = _stats(stage, rung, params, by_slot.get((stage, rung), []))
        seen.append(st)
        return st

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
        st = run_rung(1, k, config(r, spec.targets[0], lr))
        if st is None:
            return out
        ladder.append(st)
        thr, pooled = threshold(spec, seen)
        prev_best = best
        gain = _gain(spec, st.mean, prev_best.mean if prev_best else None)
        significant = prev_best is None or (st.mean is not None and gain > thr)
        if st.mean is None:
            text = f"r={r}: every seed failed"
        elif prev_best is None:
            text = (f"r={r}: mean {st.mean:.4f} ± {_fmt(st.std)} over {st.n} seeds; the first rung, the "
                    "baseline")
        else:
            verdict = "a significant gain: go up" if significant else "not a significant gain"
            text = (f"r={r}: mean {st.mean:.4f} ± {_fmt(st.std)} (n={st.n}) vs best {prev_best.mean:.4f} "
                    f"(r={prev_best.params['r']}): {'+' if gain >= 0 else ''}{gain:.4f} "
                    f"{'>' if gain > thr else '<='} threshold {thr:.4f} -> {verdict}")
        if significant and st.mean is not None:
            best, misses = st, 0
        else:
            misses += 1
        out.decisions.append({"stage": 1, "rung": k, "kind": "rank", "text": text, "evidence": {
            "r": r, "mean": st.mean, "std": st.std, "n": st.n, "values": st.values,
            "best_mean": prev_best.mean if prev_best else None,
            "best_r": prev_best.params["r"] if prev_best else None,
            "delta": None if prev_best is None or st.mean is None else gain, "threshold": thr,
            "pooled_std": pooled, "z": spec.z, "min_delta": spec.min_delta, "significant": bool(significant),
            "misses": misses, "trials": st.trials}})
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

    thr, pooled = threshold(spec, seen)
    out.threshold = thr
    rated = [s for s in ladder if s.mean is not None]
    if not rated:
        out.done = True
        out.decisions.append({"stage": 1, "rung": None, "kind": "chosen_rank",
                              "text": "no rung finished with a result: nothing to recommend", "evidence": {}})
        return out
    top = rated[0]
    for s in rated[1:]:
        if _better(spec, s, top):
            top = s
    assert top.mean is not None  # rated rungs have a mean
    chosen = next(s for s in rated if _gain(spec, s.mean, top.mean) >= -thr)  # ranks ascend
    out.chosen_rank = int(chosen.params["r"])
    out.decisions.append({"stage": 1, "rung": None, "kind": "chosen_rank", "text": (
        f"chosen rank r={chosen.params['r']}: the smallest within the noise band of the best rank "
        f"r={top.params['r']} ({top.mean:.4f}; band {thr:.4f}, so >= {top.mean - thr if spec.maximize else top.mean + thr:.4f})"
        if chosen is not top else f"chosen rank r={chosen.params['r']}: the best rung, and no smaller rank "
        f"is within its noise band ({thr:.4f})"),
        "evidence": {"chosen_r": chosen.params["r"], "chosen_mean": chosen.mean, "best_r": top.params["r"],
                     "best_mean": top.mean, "threshold": thr, "pooled_std": pooled,
                     "ladder": [{"r": s.params["r"], "mean": s.mean, "std": s.std, "n": s.n} for s in ladder]}})

    # ---- stage 2: wider target sets at the chosen rank
    kept = chosen
    if spec.stage2:
        for i, targets in enumerate(spec.targets[1:], start=1):
            st = run_rung(2, i, config(int(chosen.params["r"]), targets, lr))
            if st is None:
                return out
            thr, pooled = threshold(spec, seen)
            gain = _gain(spec, st.mean, kept.mean)
            over = (spec.max_params is not None and st.trainable_params is not None
                    and st.trainable_params > spec.max_params)
            keep = st.mean is not None and gain > thr and not over
            text = (f"{targets} at r={chosen.params['r']}: " + ("every seed failed" if st.mean is None else
                    f"mean {st.mean:.4f} ± {_fmt(st.std)} (n={st.n}) vs kept {kept.params['targets']} "
                    f"{kept.mean:.4f}: {'+' if gain >= 0 else ''}{gain:.4f} {'>' if gain > thr else '<='} "
                    f"threshold {thr:.4f} -> " + ("kept" if keep else "over max_params, not kept" if over
                                                  else "not kept")))
            out.decisions.append({"stage": 2, "rung": i, "kind": "targets", "text": text, "evidence": {
                "targets": targets, "r": chosen.params["r"], "mean": st.mean, "std": st.std, "n": st.n,
                "values": st.values, "kept_targets": kept.params["targets"], "kept_mean": kept.mean,
                "delta": None if st.mean is None else gain, "threshold": thr, "pooled_std": pooled,
                "kept": bool(keep), "trainable_params": st.trainable_params, "trials": st.trials}})
            if keep:
                kept = st

    # ---- stage 3: quality against cost
    thr, pooled = threshold(spec, seen)
    out.threshold = thr
    rated = [s for s in seen if s.mean is not None]
    top = rated[0]
    for s in rated[1:]:
        if _better(spec, s, top):
            top = s
    assert top.mean is not None  # rated rungs have a mean
    band = [s for s in rated if _gain(spec, s.mean, top.mean) >= -thr]
    cheapest = min(band, key=lambda s: (s.trainable_params if s.trainable_params is not None else math.inf,
                                        -(s.mean if spec.maximize else -s.mean)))  # type: ignore[operator]
    out.recommendation, out.best_quality = cheapest.brief(), top.brief()
    out.decisions.append({"stage": 3, "rung": None, "kind": "recommendation", "text": (
        f"recommended: {cheapest.label()} ({_fmt(cheapest.mean)} ± {_fmt(cheapest.std)}, "
        f"{_fmt(cheapest.trainable_params)} trainable parameters), the cheapest of {len(band)} configuration(s) "
        f"within {thr:.4f} of the best; best quality: {top.label()} ({_fmt(top.mean)})"),
        "evidence": {"threshold": thr, "pooled_std": pooled, "band": [s.brief() for s in band],
                     "table": [s.brief() for s in seen], "recommended": cheapest.brief(), "best": top.brief()}})
    out.done = True
    return out


def summarise(p: Plan) -> dict[str, Any]:
    """The plan's decisions and results as JSON-ready data (the study's user attr, the parent run)."""
    return p.as_attr()
