"""Choosing the best trial (by configuration mean over seeds), tagging it, a ladder's recommended trial, and
the two configurations whose seeds the end of a sweep evaluates on the test split (`held_out_choices`)."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweeps import stats
from sweeps.config.sweep import SweepConfig
from sweeps.engine.space import config_key
from sweeps.engine.study import state_counts, sweep_objectives
from sweeps.names import (
    BEST_PREFIX,
    BEST_RUN_ID_TAG,
    BEST_RUNS_ATTR,
    BEST_TAG,
    BEST_TRIAL_TAG,
    COST_ATTR,
    LADDER_ATTR,
    PARETO_TAG,
    RUN_ID_ATTR,
    SEED_INDEX,
    STAGE_ATTR,
    STEPS_ATTR,
)
from sweeps.tracking.store import quiet_mlflow
from sweeps.tracking.trial_run import param_value

if TYPE_CHECKING:
    from mlflow import MlflowClient


@dataclass
class BestTrial:
    number: int
    values: list[float]
    params: dict[str, Any]
    seed_index: int
    run_id: str | None


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best COMPLETE trial (single objective) or the Pareto front; [] when nothing completed.

    With seed repeats (single objective), the best is judged by configuration, not by one lucky seed:
    the configuration (params, and a ladder's stage) with the best mean over its COMPLETE seeds wins
    (ties: more seeds, then the earlier trial), and its best seed's trial is returned."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return []
    if len(study.directions) > 1:
        return study.best_trials
    groups: dict[str, list[FrozenTrial]] = {}
    for t in complete:
        key = config_key({**t.params, "stage": t.user_attrs.get(STAGE_ATTR)})
        groups.setdefault(key, []).append(t)
    if all(len(g) == 1 for g in groups.values()):
        return [study.best_trial]
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0

    def rank(group: list[FrozenTrial]) -> tuple[float, int, int]:
        mean = sum(t.values[0] for t in group) / len(group)
        return (sign * mean, len(group), -min(t.number for t in group))

    group = max(groups.values(), key=rank)
    return [max(group, key=lambda t: (sign * t.values[0], -t.number))]


def tag_best(study: optuna.Study, config: SweepConfig, client: MlflowClient, parent_run_id: str) -> list[BestTrial]:
    """Tag the best trial's child run ``lora_sweep.best=true`` (untagging earlier bests) and log the best
    value, params and run to the parent run."""
    from mlflow.entities import Metric, RunTag

    best = [BestTrial(t.number, list(t.values), dict(t.params), int(t.user_attrs.get(SEED_INDEX, 0)),
                      t.user_attrs.get(RUN_ID_ATTR)) for t in best_trials(study)]
    new_ids = [b.run_id for b in best if b.run_id]
    old_ids = study.user_attrs.get(BEST_RUNS_ATTR) or []
    with quiet_mlflow():
        for run_id in old_ids:
            if run_id not in new_ids:
                concurrent_write(functools.partial(client.set_tag, run_id, BEST_TAG, "false"))
        for run_id in new_ids:
            concurrent_write(functools.partial(client.set_tag, run_id, BEST_TAG, "true"))
    if new_ids != old_ids:
        study.set_user_attr(BEST_RUNS_ATTR, new_ids)
    counts = state_counts(study)
    now = int(time.time() * 1000)
    done = counts.get("COMPLETE", 0) + counts.get("PRUNED", 0)
    metrics = [Metric(f"n_{state.lower()}", float(n), now, 0) for state, n in counts.items()]
    tags = []
    objectives = sweep_objectives(config)
    if best and len(best) == 1:
        b = best[0]
        metrics.append(Metric(f"best_{objectives[0]}", b.values[0], now, done))
        tags += [RunTag(BEST_TRIAL_TAG, str(b.number)), RunTag(BEST_RUN_ID_TAG, b.run_id or "")]
        tags += [RunTag(f"{BEST_PREFIX}{k}", param_value(v)) for k, v in b.params.items()]
        tags.append(RunTag(f"{BEST_PREFIX}seed_index", str(b.seed_index)))
    elif best:
        tags.append(RunTag(PARETO_TAG, ",".join(str(b.number) for b in best)))
    with quiet_mlflow():
        concurrent_write(lambda: client.log_batch(parent_run_id, metrics=metrics, tags=tags, synchronous=True))
    return best


def concurrent_write(write: Callable[[], object]) -> None:
    """A tag write that another worker may make at the same moment (every worker tags the best trial when
    it ends). MLflow's SQL store inserts a tag it did not find, so two first writes of one tag at once
    collide on the unique key; the loser writes again, finding the row and updating it."""
    try:
        write()
    except Exception as exc:
        if not _unique_key_clash(exc):
            raise
        time.sleep(0.1)
        write()


def _unique_key_clash(exc: BaseException) -> bool:
    current: BaseException | None = exc
    for _ in range(10):
        if current is None:
            return False
        text = str(current)
        if type(current).__name__ == "IntegrityError" or "UNIQUE constraint failed" in text or \
                "duplicate key value violates unique constraint" in text:
            return True
        current = current.__cause__ or current.__context__
    return False


def ladder_outcome(study: optuna.Study) -> tuple[dict[str, Any] | None, int | None]:
    """A ladder's record, and the trial to export for its recommendation (the best of its seeds)."""
    record = study.user_attrs.get(LADDER_ATTR)
    rec = (record or {}).get("recommendation")
    if not rec:
        return record, None
    numbers = set(rec.get("trials") or [])
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.number in numbers]
    if not done:
        return record, None
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
    return record, max(done, key=lambda t: (sign * t.values[0], -t.number)).number



def recommendation_why(study: optuna.Study, config: SweepConfig, ladder: dict[str, Any] | None) -> str | None:
    """Why the sweep recommends what it does, in one sentence: a ladder's own (its record's ``why``), or
    for other sweeps `derived_recommendation`'s; None before there is a recommendation."""
    if config.search.strategy == "ladder":
        why = (ladder or {}).get("why") if (ladder or {}).get("recommendation") else None
        return why if isinstance(why, str) else None
    derived = derived_recommendation(study, config)
    return derived[2] if derived is not None else None


TEST_ROLES = ("recommended", "best_quality")


def held_out_choices(study: optuna.Study, config: SweepConfig) -> dict[str, list[FrozenTrial]]:
    """The configurations the test split is read for, each as its COMPLETE seeds (in trial order):
    ``{"recommended": [...], "best_quality": [...]}``.

    A ladder's are its record's recommendation and best-quality configuration (their ``trials``);
    nothing before the ladder recommends. Otherwise ``best_quality`` is the configuration of
    `best_trials` (the best seed mean, ``result.best``) and ``recommended`` the cheapest configuration
    shown within the sweep's margin of it by `sweeps.stats.recommend`, the rule the report uses, with
    the costs the trials stored (``COST_ATTR``); with one seed per configuration, or no configuration
    with two, the best. A two-objective (Pareto) study has neither: ``{}``."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    by_number = {t.number: t for t in complete}
    if config.search.strategy == "ladder":
        record = study.user_attrs.get(LADDER_ATTR) or {}
        out = {}
        for role, key in zip(TEST_ROLES, ("recommendation", "best_quality"), strict=True):
            entry = record.get(key) if isinstance(record, dict) else None
            numbers = entry.get("trials") if isinstance(entry, dict) else None
            trials = sorted((by_number[n] for n in numbers or [] if n in by_number), key=lambda t: t.number)
            if trials:
                out[role] = trials
        return out
    derived = derived_recommendation(study, config)
    if derived is None:
        return {}
    rec_group, best_group, _ = derived
    return {"recommended": rec_group, "best_quality": best_group}


def derived_recommendation(study: optuna.Study, config: SweepConfig) -> tuple[
        list[FrozenTrial], list[FrozenTrial], str] | None:
    """A sweep without a ladder: (the recommended configuration's COMPLETE seeds, the best-quality one's,
    why it was recommended in one sentence) by `sweeps.stats.recommend` with the sweep's margin; None
    for a two-objective study or before any trial completed."""
    if len(study.directions) > 1:
        return None
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    best = best_trials(study)
    if not best:
        return None
    groups: dict[str, list[FrozenTrial]] = {}
    for t in sorted(complete, key=lambda t: t.number):
        if STEPS_ATTR not in t.user_attrs:
            groups.setdefault(config_key({**t.params, "stage": t.user_attrs.get(STAGE_ATTR)}), []).append(t)
    keys = list(groups)
    top = keys.index(config_key({**best[0].params, "stage": best[0].user_attrs.get(STAGE_ATTR)}))
    margin = config.search.margin_value(config.model.task)
    if config.search.seeds < 2:
        return groups[keys[top]], groups[keys[top]], (f"the best configuration: one seed per configuration, so "
                                                      f"nothing can be shown within the margin {margin:g} of it")

    def cost(group: list[FrozenTrial], name: str) -> float | None:
        got = [float(c[name]) for t in group if isinstance(c := t.user_attrs.get(COST_ATTR), dict)
               and isinstance(c.get(name), (int, float)) and math.isfinite(c[name])]
        return stats.mean(got)

    rec = stats.recommend([[t.values[0] for t in groups[k]] for k in keys],
                          [(cost(groups[k], "trainable_params"), cost(groups[k], "train_s")) for k in keys],
                          top, maximize=study.direction == optuna.study.StudyDirection.MAXIMIZE, margin=margin)
    if rec is None:
        return groups[keys[top]], groups[keys[top]], ("the best configuration: no configuration has two seeds yet, "
                                                      f"so nothing can be shown within the margin {margin:g} of it")
    if rec.index != rec.best:
        v = rec.verdicts[rec.index]
        why = (f"within {margin:g} of the best, shown (lower bound {v.lower:.4g} > -{margin:g}; "
               f"{len(rec.verdicts)} cheaper configuration(s) tested)")
    else:
        why = rec.text
    return groups[keys[rec.index]], groups[keys[top]], why

