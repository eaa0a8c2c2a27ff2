"""The ladder's replay state (`sweeps.engine.ladder.plan` drives it): which seeds each configuration has
been given, their statistics, and the three moves every stage is made of:

- `Replay.duel`: a configuration against an incumbent by the gain rule, one more seed on both sides while
  undecided (up to ``max_seeds``);
- `Replay.bracket`: the learning rate re-checked around a configuration: its neighbouring rate on the
  lr grid is tried and kept only when shown a gain over the current rate, and the walk goes on in that
  direction; it stops as soon as a neighbour is not shown better (no gain, or undecided at ``max_seeds``);
- `Replay.settle`: the cheapest of some candidates shown within the margin of the best (non-inferiority).

A configuration is keyed by ``(stage, rung, lr index)``: its stage and rung (a rank, a target set) and the
index of its learning rate on the sorted lr grid (`lr_grid`), so one rung tried at several rates is
several configurations; they all feed the pooled seed noise.
"""

from __future__ import annotations

from typing import Any

from sweeps import stats as noise
from sweeps.engine.ladder_rules import config_stats, fmt, judge, one_more, rate_step, within
from sweeps.engine.ladder_types import PENDING, ConfigStats, LadderSpec, Observation, Plan, Slot, most_seeds

Key = tuple[int, int, int]   # (stage, rung, index of the learning rate on the lr grid)

__all__ = ["Key", "Replay", "lr_comparisons", "lr_grid"]


def lr_grid(spec: LadderSpec) -> list[float]:
    """The rates a bracket walks over: the calibration candidates, sorted and without repeats."""
    return sorted(set(float(x) for x in spec.lrs))


def lr_comparisons(spec: LadderSpec) -> int:
    """How many lr comparisons one ladder can make (the split of their false-gain rate): each bracket
    tries every rate at most once, so at most ``len(grid) - 1`` per bracketed configuration (every
    rung after the first and every wider target set)."""
    configs = len(spec.ranks) - 1 + (len(spec.targets) - 1 if spec.stage2 else 0)
    return max(1, (len(lr_grid(spec)) - 1) * max(1, configs))


class Replay:
    """What the plan knows while it replays the trials so far (see the module docstring)."""

    def __init__(self, spec: LadderSpec, observations: list[Observation], out: Plan) -> None:
        self.spec, self.out = spec, out
        self.grid = lr_grid(spec)
        self.top_n = most_seeds(spec)
        self.have: dict[tuple[int, int, int, int], Observation] = {}
        self.by_key: dict[Key, list[Observation]] = {}
        for o in observations:
            if o.retried:
                continue
            key = (o.stage, o.rung, self.li(o.params))
            self.have[(*key, o.seed_index)] = o
            self.by_key.setdefault(key, []).append(o)
        self.given: dict[Key, int] = {}
        self.params_of: dict[Key, dict[str, Any]] = {}
        self.order: list[Key] = []          # every stage-1/2 configuration, for the pooled noise
        self.memo: dict[tuple[int, int, int, int], ConfigStats] = {}
        self.beaten: dict[Key, str] = {}    # configurations a decided gain put outside the margin

    # ------------------------------------------------------------------ bookkeeping

    def li(self, params: dict[str, Any]) -> int:
        """The index of a configuration's learning rate on the grid (-1 when it is not on it)."""
        try:
            return self.grid.index(float(params["lr"]))
        except (KeyError, TypeError, ValueError):
            return -1

    def slots_state(self, slots: list[Slot]) -> str:
        """"missing" (some not in the study: they get enqueued), "pending", or "finished"."""
        missing = [s for s in slots if (s.stage, s.rung, self.li(s.params), s.seed_index) not in self.have]
        if missing:
            self.out.enqueue.extend(missing)
            return "missing"
        if any(self.have[(s.stage, s.rung, self.li(s.params), s.seed_index)].state in PENDING for s in slots):
            return "pending"
        return "finished"

    def observed(self, key: Key) -> list[Observation]:
        return self.by_key.get(key, [])

    def give(self, wanted: dict[Key, int]) -> bool:
        """Give each configuration that many seeds (slots 0..n-1); True once all of them finished,
        else their missing slots are enqueued (``out.enqueue``) or some still run (``out.wait``)."""
        slots = []
        for key, n in wanted.items():
            self.given[key] = max(self.given.get(key, 0), n)
            slots += [Slot(key[0], key[1], self.params_of[key], i) for i in range(self.given[key])]
        state = self.slots_state(slots)
        self.out.wait = state == "pending"
        return state == "finished"

    def stats(self, key: Key) -> ConfigStats:
        """The configuration's statistics over the seeds given to it so far."""
        at = (*key, self.given[key])
        if at not in self.memo:
            obs = [o for o in self.observed(key) if o.seed_index < self.given[key]]
            self.memo[at] = config_stats(key[0], key[1], self.params_of[key], obs)
        return self.memo[at]

    def seen(self) -> list[ConfigStats]:
        return [self.stats(k) for k in self.order]

    def start(self, key: Key, params: dict[str, Any], seeds: int | None = None) -> ConfigStats | None:
        """The configuration at ``seeds`` (default: the minimum seeds), once they all finished (None before)."""
        self.params_of[key] = params
        if not self.give({key: self.spec.seeds if seeds is None else seeds}):
            return None
        if key not in self.order:
            self.order.append(key)
        return self.stats(key)

    def evidence(self, c: noise.Comparison, st: ConfigStats, inc: ConfigStats, key: Key, why: str) -> dict[str, Any]:
        """A verdict's evidence as the decisions' JSON holds it."""
        return {"verdict": c.verdict, "seeds": st.n, "seeds_given": self.given[key], "incumbent_seeds": inc.n,
                "seeds_why": why, "delta": c.gain, "threshold": c.threshold, "se": c.se, "t": c.t,
                "dof": c.evidence.get("dof"), "pooled_std": c.evidence.get("pooled_std"), "lower": c.lower,
                "upper": c.upper, "false_gain_rate": self.spec.false_gain_rate, "margin": self.spec.margin,
                "lr": st.params.get("lr"), "incumbent_lr": inc.params.get("lr"), "comparison": c.evidence}

    # ------------------------------------------------------------------ the three moves

    def duel(self, key: Key, params: dict[str, Any], inc_key: Key, what: str, count: int | None = None,
             seeds: int | None = None, rule: Any = judge) -> tuple[noise.Comparison, ConfigStats, ConfigStats, str] | None:
        """Compare a configuration with the incumbent, adding one seed to both sides while undecided (up
        to ``max_seeds``): (the comparison, both sides' stats, why it used the seeds it used); None while
        seeds are still to run. ``count``: the comparisons its false-gain rate is split over (default:
        the ladder's rank and target comparisons); ``seeds``: the candidate's first seeds (default: the
        minimum seeds)."""
        spec = self.spec
        first = spec.seeds if seeds is None else seeds
        st = self.start(key, params, first)
        if st is None:
            return None
        while True:
            inc = self.stats(inc_key)
            c = rule(spec, st, inc, self.seen(), count)
            n = self.given[key]
            more = one_more(self.given, key, inc_key, self.top_n)
            if c.verdict != noise.UNDECIDED or more is None or st.mean is None:
                if n == first:
                    why = f"decided at the minimum {n} seeds"
                elif c.verdict == noise.UNDECIDED:
                    why = f"still undecided at max_seeds={n}: counted as no gain"
                else:
                    why = f"undecided at {first} seed(s), decided at {n}"
                return c, st, inc, why
            self.out.decisions.append({"stage": key[0], "rung": key[1], "kind": "more_seeds", "text": (
                f"{what}: undecided with {n} vs {self.given[inc_key]} seeds ({c.text}); one more seed each "
                f"(up to max_seeds={self.top_n})"), "evidence": {
                "seeds": n, "incumbent_seeds": self.given[inc_key], "next_seeds": more[key],
                "next_incumbent_seeds": more[inc_key], "max_seeds": self.top_n, "lr": st.params.get("lr"),
                "incumbent_lr": inc.params.get("lr"), "comparison": c.evidence}})
            if not self.give(more):
                return None
            st = self.stats(key)

    def bracket(self, key: Key, params_at: Any, first: int, name: str) -> tuple[Key, int] | None:
        """Re-check the learning rate of the configuration ``key`` (already run): try the neighbouring
        rate in the direction ``first`` (+1: larger; 0 means +1), keep it when it is shown a gain over
        the current one and go on that way; if the first direction moved nothing, the other. ``params_at``
        gives the configuration's params at a grid index. Returns (the key of its best rate shown, the
        direction it moved: +1, -1 or 0); None while trials run. Every comparison is a decision of kind
        "lr"."""
        stage, rung, cur = key
        directions = [first or 1, -(first or 1)]
        for d in directions:
            moved = False
            while 0 <= cur + d < len(self.grid):
                nxt: Key = (stage, rung, cur + d)
                lo, hi = self.grid[cur], self.grid[cur + d]
                fought = self.duel(nxt, params_at(cur + d), (stage, rung, cur),
                                   f"{name}: lr {hi:.3g} vs {lo:.3g}", count=lr_comparisons(self.spec),
                                   seeds=self.spec.probe_seeds, rule=rate_step)
                if fought is None:
                    return None
                c, st, inc, why = fought
                gain = c.verdict == noise.GAIN
                self.out.decisions.append({"stage": stage, "rung": rung, "kind": "lr", "text": (
                    f"lr bracket of {name}: at lr {hi:.3g} " + ("every seed failed -> " if st.mean is None else
                                                               f"{st.mean:.4f} ± {fmt(st.std)} (n={st.n}) vs at lr "
                                                               f"{lo:.3g} {fmt(inc.mean)} (n={inc.n}): {c.text}; "
                                                               f"{why} -> ")
                    + (f"a gain: lr {hi:.3g} kept, the next rate that way is tried" if gain else
                       f"not shown better: the bracket stops {'above' if d > 0 else 'below'} lr {lo:.3g}")),
                    "evidence": {**self.evidence(c, st, inc, nxt, why), "direction": d, "moved": gain,
                                 "r": st.params.get("r"), "targets": st.params.get("targets"),
                                 "mean": st.mean, "std": st.std, "n": st.n, "values": st.values,
                                 "trials": st.trials}})
                if not gain:
                    break
                cur, moved = cur + d, True
            if moved:
                return (stage, rung, cur), d
        return (stage, rung, cur), 0

    def settle(self, candidates: list[Key], top_key: Key, what: str) -> tuple[Key, list[dict[str, Any]]] | None:
        """The cheapest of ``candidates`` (cheapest first) shown within the margin of ``top_key``
        (`within`), adding one seed to both sides while one is undecided (up to ``max_seeds``), else
        ``top_key`` itself: (the pick, every candidate's verdict as JSON); None while seeds run."""
        spec = self.spec
        tried: list[dict[str, Any]] = []
        for key in candidates:
            while True:
                st, top = self.stats(key), self.stats(top_key)
                c = within(spec, st, top, self.seen(), len(candidates))
                n = self.given[key]
                more = one_more(self.given, key, top_key, self.top_n)
                if c.verdict != noise.UNDECIDED or more is None or st.mean is None:
                    break
                self.out.decisions.append({"stage": key[0], "rung": key[1], "kind": "more_seeds", "text": (
                    f"{what}: is {st.label()} within the margin {spec.margin:g} of {top.label()}? undecided with "
                    f"{n} vs {self.given[top_key]} seeds ({c.text}); one more seed each (up to max_seeds="
                    f"{self.top_n})"), "evidence": {"seeds": n, "incumbent_seeds": self.given[top_key],
                                                    "next_seeds": more[key], "next_incumbent_seeds": more[top_key],
                                                    "max_seeds": self.top_n, "comparison": c.evidence}})
                if not self.give(more):
                    return None
            tried.append({"config": st.brief(), "verdict": c.verdict, "text": c.text, "lower": c.lower,
                          "upper": c.upper, "seeds": st.n, "best_seeds": top.n, "comparison": c.evidence})
            if c.verdict == noise.NON_INFERIOR:
                return key, tried
        return top_key, tried
