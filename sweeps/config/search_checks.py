"""The checks of a sweep's ``search`` block (`sweeps.config.search`, checked as the sweep is loaded): each mistake raises
``lora_core.LoraError`` naming the key, with a hint; nothing runs before they pass."""

from __future__ import annotations

import math
from typing import Any

from lora_core import LoraError
from sweeps.config.search import MAX_PACK, MAX_SEEDS, MAX_TRIALS, METRICS, LogRange, SearchConfig
from sweeps.config.trial import MAX_RANK, at_most, check_seed


def check_search(search: SearchConfig, task: str) -> None:
    """Check ``search`` for a sweep of ``task``; explicit ``configs`` also set ``rank`` and ``targets``
    to the pairs' values (the choices the trials' parameters hold)."""
    if search.configs is not None:
        if search.strategy != "grid":
            raise LoraError("search.configs (explicit rank and target pairs) needs strategy: grid",
                            hint="set search.strategy: grid, or use search.rank and search.targets")
        if not search.configs:
            raise LoraError("search.configs is empty", hint='e.g. [{r: 8, targets: "q"}, {r: 4, targets: "q,v"}]')
        pairs = search.grid_pairs()
        _no_duplicates([(r, frozenset(t.split(","))) for r, t in pairs], "search.configs")
        # the parameters' choices are the pairs' values (what the trials' distributions hold)
        search.rank = sorted({r for r, _ in pairs})
        search.targets = list(dict.fromkeys(t for _, t in pairs))
    if not search.rank:
        raise LoraError("search.rank is empty", hint="e.g. [1, 2, 4, 8, 16]")
    for r in search.rank:
        if r < 1:
            raise LoraError(f"search.rank values must be >= 1, got {r}", hint="LoRA ranks are 1, 2, 4, 8, ...")
    _no_duplicates(search.rank, "search.rank")
    if isinstance(search.alpha, list) and not search.alpha:
        raise LoraError("search.alpha is empty", hint='e.g. 16, [8, 16] or "2r"')
    mode, values = search.alpha_mode()
    if mode == "fixed" and not isinstance(search.alpha, (float, int)) and not all(isinstance(a, (int, float))
                                                                                for a in search.alpha):
        raise LoraError("search.alpha mixes numbers and multiples of r", hint='use [8, 16] or ["1r", "2r"]')
    for a in values:
        if not a > 0:
            raise LoraError(f"search.alpha must be positive, got {a:g}" + ("r" if mode == "multiple" else ""))
    _no_duplicates(values, "search.alpha")
    entries = [search.targets] if isinstance(search.targets, str) else search.targets
    if not entries:
        raise LoraError("search.targets is empty", hint='e.g. ["q,v", "q,k,v,o", "all-linear"]')
    for entry, subset in zip(entries, search.target_subsets(), strict=True):
        if not entry.strip() or any(not t for t in subset):
            raise LoraError(f"search.targets has an empty subset or name: {entry!r}",
                            hint='each entry is a comma-separated subset, e.g. "q,v" or "all-linear"')
        if len(set(subset)) != len(subset):
            raise LoraError(f"search.targets subset {entry!r} names a target twice")
    _no_duplicates([frozenset(s) for s in search.target_subsets()], "search.targets")
    if isinstance(search.lr, LogRange):
        if not (search.lr.low > 0 and search.lr.high > 0):
            raise LoraError(f"search.lr range must be positive, got [{search.lr.low:g}, {search.lr.high:g}]")
        if not search.lr.low < search.lr.high:
            raise LoraError(f"search.lr: low ({search.lr.low:g}) must be below high ({search.lr.high:g})",
                            hint="e.g. lr: {low: 1.0e-4, high: 3.0e-3}; a list ([1.0e-3]) gives fixed values")
    else:
        if not search.lr:
            raise LoraError("search.lr is empty", hint="a range {low: 1.0e-4, high: 3.0e-3} or a list of values")
        for v in search.lr:
            if not v > 0:
                raise LoraError(f"search.lr values must be positive, got {v:g}")
        _no_duplicates(search.lr, "search.lr")
    if not search.dropout:
        raise LoraError("search.dropout is empty", hint="e.g. [0.0] or [0.0, 0.05, 0.1]")
    for d in search.dropout:
        if not 0 <= d < 1:
            raise LoraError(f"search.dropout values must be in [0, 1), got {d:g}")
    _no_duplicates(search.dropout, "search.dropout")
    if search.seeds < 1:
        raise LoraError(f"search.seeds must be >= 1, got {search.seeds}", hint="repeats of each configuration")
    at_most(search.seeds, MAX_SEEDS, "search.seeds", hint="repeats of each configuration")
    if search.n_trials < 1:
        raise LoraError(f"search.n_trials must be >= 1, got {search.n_trials}")
    at_most(search.n_trials, MAX_TRIALS, "search.n_trials",
            hint="a study holds every trial in memory; run fewer (a resumed sweep may raise n_trials)")
    for r in search.rank:
        at_most(r, MAX_RANK, "search.rank", hint="the model's layer sizes bound it too")
    check_seed(search.sampler_seed, "search.sampler_seed")
    if search.pack != "auto" and isinstance(search.pack, int):
        at_most(search.pack, MAX_PACK, "search.pack", hint="trials one worker trains together")
    if search.pack != "auto" and (isinstance(search.pack, bool) or not isinstance(search.pack, int) or search.pack < 1):
        raise LoraError(f"search.pack must be an integer >= 1 or auto, got {search.pack!r}",
                        hint="how many trials one worker trains together, e.g. 4 on a GPU; 1 trains one at a time")
    if search.n_trials % search.seeds:
        raise LoraError(f"search.n_trials ({search.n_trials}) must be a multiple of search.seeds ({search.seeds})",
                        hint="each configuration runs once per seed, and every seed is one trial")
    if search.timeout is not None and not search.timeout > 0:
        raise LoraError(f"search.timeout must be a positive number of seconds, got {search.timeout:g}",
                        hint="or null for no time limit")
    if search.strategy == "grid" and isinstance(search.lr, LogRange):
        raise LoraError("search.strategy grid needs search.lr as a list of values, not a range",
                        hint="e.g. lr: [3.0e-4, 1.0e-3]")
    if search.margin is not None and (isinstance(search.margin, bool) or not isinstance(search.margin, (int, float))
                                    or not math.isfinite(search.margin) or search.margin < 0):
        raise LoraError(f"search.margin must be a number >= 0, got {search.margin!r}",
                        hint="the smallest difference that matters, in the objective's units: e.g. 0.01 for one "
                             "point of accuracy, 0.01 of eval_loss; null for the metric's default")
    metrics = METRICS.get(task, ())
    if search.objective is not None and search.objective not in metrics:
        raise LoraError(f"search.objective {search.objective!r} is not a metric of task {task}",
                        hint=f"choose one of {', '.join(metrics)}")
    if search.second_objective and search.pruner_name() != "none":
        raise LoraError(f"search.pruner {search.pruner} cannot prune a two-objective (Pareto) study",
                        hint="set search.pruner: none, or drop search.second_objective")
    for key in ("startup_trials", "ei_candidates", "prune_startup_trials"):
        if getattr(search, key) < 0 or (key == "ei_candidates" and search.ei_candidates < 1):
            raise LoraError(f"search.{key} must be {'>= 1' if key == 'ei_candidates' else '>= 0'}, "
                            f"got {getattr(search, key)}")
    if search.prune_warmup_steps < 0:
        raise LoraError(f"search.prune_warmup_steps must be >= 0, got {search.prune_warmup_steps}")
    if search.hyperband_min_steps is not None and search.hyperband_min_steps < 1:
        raise LoraError(f"search.hyperband_min_steps must be >= 1, got {search.hyperband_min_steps}")
    if search.hyperband_reduction < 2:
        raise LoraError(f"search.hyperband_reduction must be >= 2, got {search.hyperband_reduction}")
    if search.strategy == "ladder":
        _check_ladder(search)
    if search.storage is not None and not search.storage.strip():
        raise LoraError("search.storage is empty", hint="null for the default journal file, or a URL")


def _check_ladder(search: SearchConfig) -> None:
    lad = search.ladder
    if lad.r_start < 1 or lad.r_max < lad.r_start:
        raise LoraError(f"search.ladder: need 1 <= r_start <= r_max, got r_start={lad.r_start}, r_max={lad.r_max}",
                        hint="e.g. r_start: 1, r_max: 64 (ranks 1, 2, 4, ..., 64)")
    if not lad.targets:
        raise LoraError("search.ladder.targets is empty", hint='e.g. ["q,v", "q,k,v,o", "all-linear"]')
    subsets = [[t.strip() for t in entry.split(",")] for entry in lad.targets]
    if any(not all(subset) for subset in subsets):
        raise LoraError(f"search.ladder.targets has an empty subset or name: {lad.targets!r}")
    _no_duplicates([frozenset(x) for x in subsets], "search.ladder.targets")
    for key in ("seeds", "patience", "calibration_seeds"):
        if getattr(lad, key) < 1:
            raise LoraError(f"search.ladder.{key} must be >= 1, got {getattr(lad, key)}")
    for key in ("seeds", "max_seeds", "calibration_seeds"):
        at_most(getattr(lad, key), MAX_SEEDS, f"search.ladder.{key}")
    at_most(lad.r_max, MAX_RANK, "search.ladder.r_max", hint="the model's layer sizes bound it too")
    if lad.seeds < 2:
        raise LoraError(f"search.ladder.seeds must be >= 2, got {lad.seeds}",
                        hint="the ladder measures seed noise; it needs two seeds or more per configuration")
    if lad.max_seeds < lad.seeds:
        raise LoraError(f"search.ladder.max_seeds ({lad.max_seeds}) must be >= search.ladder.seeds ({lad.seeds})",
                        hint="seeds is the minimum per configuration, max_seeds the most an undecided comparison "
                             "gets; e.g. seeds: 2, max_seeds: 4 (equal: no adaptive seeds)")
    if lad.z is not None:
        raise LoraError("search.ladder.z is no longer used: the ladder now bounds its false-gain rate instead",
                        hint="remove z; set search.ladder.false_gain_rate (default 0.05: the most a ladder calls "
                             "any gain on pure noise)")
    if not 0 < lad.false_gain_rate < 1:
        raise LoraError(f"search.ladder.false_gain_rate must be between 0 and 1, got {lad.false_gain_rate:g}",
                        hint="e.g. 0.05: at most a 5% chance that a ladder calls any gain on pure noise")
    if lad.alpha is not None and not lad.alpha > 0:
        raise LoraError(f"search.ladder.alpha must be positive, got {lad.alpha:g}")
    if lad.calibration_lrs is not None and (not lad.calibration_lrs or any(not x > 0 for x in lad.calibration_lrs)):
        raise LoraError("search.ladder.calibration_lrs must be positive values", hint="e.g. [3.0e-4, 1.0e-3, 3.0e-3]")
    if lad.calibration_steps is not None and lad.calibration_steps < 1:
        raise LoraError(f"search.ladder.calibration_steps must be >= 1, got {lad.calibration_steps}")
    if lad.min_delta is not None and not (math.isfinite(lad.min_delta) and lad.min_delta >= 0):
        raise LoraError(f"search.ladder.min_delta must be >= 0, got {lad.min_delta:g}",
                        hint="min_delta is the old name of search.margin; set search.margin instead")
    if lad.min_delta is not None and search.margin is not None and lad.min_delta != search.margin:
        raise LoraError(f"search.margin ({search.margin:g}) and its old name search.ladder.min_delta "
                        f"({lad.min_delta:g}) disagree", hint="keep search.margin and remove search.ladder.min_delta")
    for key in ("max_params", "max_train_s", "max_memory_mb"):
        value = getattr(lad, key)
        if value is not None and not value > 0:
            raise LoraError(f"search.ladder.{key} must be positive, got {value:g}", hint="or null for no limit")
    if search.second_objective:
        raise LoraError("strategy ladder optimises one metric", hint="drop search.second_objective")
    if search.pruner_name() != "none":
        raise LoraError(f"strategy ladder does not prune (search.pruner: {search.pruner})",
                        hint="every seed of a rung must finish to measure the noise; set search.pruner: none")



def _no_duplicates(values: list[Any], key: str) -> None:
    seen = []
    for v in values:
        if v in seen:
            raise LoraError(f"{key} lists {sorted(v) if isinstance(v, frozenset) else v!r} twice")
        seen.append(v)
