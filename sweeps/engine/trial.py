"""One sweep trial: ask Optuna, train with the sampled configuration as an MLflow child run, tell the outcome.

Pruning (single objective): the trainer's report hook calls ``trial.report(value, step)`` after each
evaluation and asks the trainer to stop when ``trial.should_prune()``.

The budget, race-free. The loop (and a pack's ``may_start``) looks at the budget before it asks, and
several workers can pass that look together; so right after a trial is obtained (``ask``, or
``claim_queued`` for the grid and the ladder), before anything is written to it, `begin_trial` counts the
trials numbered below it that are COMPLETE, PRUNED, RUNNING or WAITING (the waiting ones are claimed
before any new trial is made: ``ask`` and ``claim_queued`` take the lowest-numbered first). When they are
``search.budget()`` or more, the trial is released unrun and `begin_trial` returns None:

- a trial ``ask`` made (fresh: no params yet) is told FAIL with ``lora_sweep.fail: over_budget``; it is
  never re-queued (`sweeps.engine.recovery`), never counts as a failure in a row, and the sweep's state
  counts (`sweeps.engine.study.state_counts`: the summary, the parent run's ``n_*`` metrics, progress)
  show it as ``OVER_BUDGET``, not FAIL (``lora-sweep status`` lists it as FAIL, fail reason over_budget);
- a queued trial (a grid point, a ladder slot, a repeat seed ``ask`` popped) goes back to WAITING
  unchanged (`sweeps.engine.study.release_claim`), so a later run with a larger ``n_trials`` still has it.

Why no worker can overshoot: trial numbers follow creation, so every trial below ours exists when we
count; and a trial that ends COMPLETE or PRUNED is WAITING, RUNNING, COMPLETE or PRUNED at every moment of
its life (a released one goes back to WAITING, a re-queued seed is a new trial). So whenever we count, we
count every trial below ours that will end up counted by the budget. If the highest-numbered trial that
ends COMPLETE or PRUNED saw fewer than ``budget`` below it, at most ``budget`` end so in all, whatever the
timing. A release is never a loss either: the trials ahead of it hold the budget, and if some of them fail
the loop's budget check lets a worker ask again.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from sweeps.config.sweep import SearchConfig, SweepConfig
from sweeps.config.trial import TrialConfig
from sweeps.data.prepare import PreparedData
from sweeps.engine.liveness import Heartbeat, Worker
from sweeps.engine.progress import SweepProgress
from sweeps.engine.space import suggest, trial_config
from sweeps.engine.study import claim_queued, quiet_optuna, release_claim, tell
from sweeps.models.cache import BaseModelCache
from sweeps.names import (
    COST_ATTR,
    FAIL_ATTR,
    OPTUNA_STATE_TAG,
    OVER_BUDGET,
    RUN_ID_ATTR,
    RUNG_ATTR,
    SEED_INDEX,
    SEED_INDEX_TAG,
    STAGE_ATTR,
    STEPS_ATTR,
    STUDY_NAME_TAG,
    SWEEP_TAG,
    TRIAL_NUMBER_TAG,
    WORKER_ATTR,
)
from sweeps.text import first_line
from sweeps.tracking.store import quiet_mlflow
from sweeps.tracking.trial_run import TrialRun, trial_run_name
from sweeps.training.state import ProgressHook, ReportHook
from sweeps.training.trainer import Trial, run_trial

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from sweeps.engine.ladder_types import LadderSpec


PLANNED = ("grid", "ladder")  # strategies whose trials are all enqueued (the sampler is never consulted)
AHEAD = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)  # hold the budget


@dataclass
class TrialOutcome:
    train_s: float = 0.0
    eval_s: float = 0.0
    error: str = ""


@dataclass
class BegunTrial:
    """A trial asked from Optuna and started: its heartbeat and MLflow run open (``stack``), its trial
    config and the hooks its trainer calls."""

    trial: optuna.Trial
    cfg: TrialConfig
    params: dict[str, Any]
    run: TrialRun
    stack: contextlib.ExitStack
    report: ReportHook
    progress: ProgressHook


def run_one_trial(study: optuna.Study, config: SweepConfig, data: PreparedData, models: BaseModelCache,
                  client: MlflowClient, parent_run_id: str, me: Worker, state: SweepProgress,
                  refresh: Callable[[str], None], include_plotlyjs: bool | str,
                  ladder: LadderSpec | None = None) -> TrialOutcome | None:
    """Ask, train (``run_trial``) and tell one trial; None when no queued trial was left or the trial was
    released past the budget (`begin_trial`)."""
    begun = begin_trial(study, config, client, parent_run_id, me, state, refresh, include_plotlyjs, ladder)
    if begun is None:
        return None
    try:
        done = run_trial(begun.cfg, report=begun.report, progress=begun.progress, data=data, models=models)
    except BaseException as exc:
        outcome = abort_trial(begun, study, state, refresh, exc)
        if not isinstance(exc, Exception):
            raise
        return outcome
    return finish_trial(begun, done, study, config, state, refresh)


def begin_trial(study: optuna.Study, config: SweepConfig, client: MlflowClient, parent_run_id: str, me: Worker,
                state: SweepProgress, refresh: Callable[[str], None], include_plotlyjs: bool | str,
                ladder: LadderSpec | None = None, extra_attrs: dict[str, Any] | None = None) -> BegunTrial | None:
    """Ask Optuna for a trial, sample (or take the planned) params, enqueue its other seeds, open its
    heartbeat and MLflow child run. For the grid and the ladder (``PLANNED``) it claims a queued trial and
    returns None when there is none left. It also returns None when the trial it got is past the budget
    and was released unrun (see the module docstring): the caller looks at its budget again. ``extra_attrs``
    are set on the trial and as tags on its run."""
    from mlflow.entities import Param

    search = config.search
    single = len(study.directions) == 1
    objective = search.objective_name(config.model.task)
    if search.strategy in PLANNED:  # every trial is enqueued: take one, never make one up
        queued = claim_queued(study)
        if queued is None:  # another worker took the last one between our look and our claim
            return None
        trial = queued
    else:
        with quiet_optuna():
            trial = study.ask()
    try:
        ahead = trials_ahead(study, trial)
    except BaseException:  # Ctrl-C (or a lost database) before the trial was started or released
        with contextlib.suppress(Exception):
            trial.set_user_attr(FAIL_ATTR, "interrupted")  # a queued one is re-queued by the next run
            tell(study, trial, state=TrialState.FAIL)
        raise
    if ahead >= search.budget():
        how = release(study, trial)
        refresh(f"trial {trial.number} released unrun ({how}): {ahead} trial(s) ahead of it hold the budget "
                f"of {search.budget()}")
        return None
    trial.set_user_attr(WORKER_ATTR, me.as_attr())
    fresh = SEED_INDEX not in trial.user_attrs
    params = suggest(trial, search, ladder)
    seed_index = int(trial.user_attrs.get(SEED_INDEX, 0))
    slot_tags = {k: trial.user_attrs[k] for k in (STAGE_ATTR, RUNG_ATTR) if k in trial.user_attrs}
    for key, value in (extra_attrs or {}).items():
        trial.set_user_attr(key, value)
    if fresh:
        trial.set_user_attr(SEED_INDEX, 0)
        with quiet_optuna():
            for k in range(1, search.seeds):
                study.enqueue_trial(params, user_attrs={SEED_INDEX: k}, skip_if_exists=False)
    state.running, state.running_params, state.running_seed, state.step = trial.number, params, seed_index, 0
    refresh(f"trial {trial.number} started")

    def report(step: int, metrics: dict[str, float]) -> str | None:
        value = metrics.get(objective)
        if not single or value is None or not math.isfinite(value):
            return None
        trial.report(value, step)
        return f"pruned at step {step}" if trial.should_prune() else None

    def on_progress(step: int, total: int, loss: float | None) -> None:
        state.step, state.steps = step, total
        refresh("")

    stack = contextlib.ExitStack()
    try:
        cfg = trial_config(config, params, seed_index)
        if STEPS_ATTR in trial.user_attrs:  # a ladder's calibration trial: shorter
            cfg.train.steps = int(trial.user_attrs[STEPS_ATTR])
            cfg.train.eval_every = min(cfg.train.eval_every, cfg.train.steps)
            state.steps = cfg.train.steps
        stack.enter_context(Heartbeat(trial))
        run = stack.enter_context(TrialRun.start(
            config.tracking, cfg, experiment=config.experiment(), client=client,
            run_name=trial_run_name(trial.number, cfg, config.search.varied()), parent_run_id=parent_run_id,
            tags={TRIAL_NUMBER_TAG: trial.number, STUDY_NAME_TAG: study.study_name,
                  SWEEP_TAG: config.name, SEED_INDEX_TAG: seed_index, **slot_tags, **(extra_attrs or {})},
            include_plotlyjs=include_plotlyjs))
        with quiet_mlflow():
            client.log_batch(run.run_id, params=[Param(TRIAL_NUMBER_TAG, str(trial.number)),
                                                 Param(SEED_INDEX_TAG, str(seed_index))],
                             synchronous=True)
        trial.set_user_attr(RUN_ID_ATTR, run.run_id)  # (recovery also finds the run by its tags)
    except BaseException as exc:
        stack.__exit__(type(exc), exc, exc.__traceback__)
        trial.set_user_attr(FAIL_ATTR, "interrupted" if not isinstance(exc, Exception) else "error")
        tell(study, trial, state=TrialState.FAIL)
        state.running = None
        refresh(f"trial {trial.number} FAIL: {first_line(exc) or type(exc).__name__}")
        raise
    return BegunTrial(trial, cfg, params, run, stack, report, on_progress)


def trials_ahead(study: optuna.Study, trial: optuna.Trial) -> int:
    """How many trials numbered below ``trial`` hold the budget (`AHEAD`; see the module docstring)."""
    return sum(t.number < trial.number for t in study.get_trials(deepcopy=False, states=AHEAD))


def release(study: optuna.Study, trial: optuna.Trial) -> str:
    """Release ``trial``, just obtained and untouched, past the budget: a queued one (a planned trial or
    a repeat seed) back to the queue, unchanged; a fresh one FAIL ``over_budget``. Says which."""
    frozen = trial._cached_frozen_trial  # as obtained: its attributes and enqueued params
    if SEED_INDEX in frozen.user_attrs or "fixed_params" in frozen.system_attrs:
        release_claim(study, trial)
        return "back to the queue"
    trial.set_user_attr(FAIL_ATTR, OVER_BUDGET)
    tell(study, trial, state=TrialState.FAIL)
    return OVER_BUDGET


def finish_trial(begun: BegunTrial, done: Trial, study: optuna.Study, config: SweepConfig, state: SweepProgress,
                 refresh: Callable[[str], None], write_adapter: Callable[[Path], object] | None = None) -> TrialOutcome:
    """Log a trained trial to its run (``write_adapter`` for a packed one), end the run and tell Optuna."""
    trial, run, search = begun.trial, begun.run, config.search
    objective = search.objective_name(config.model.task)
    r = done.result
    outcome = TrialOutcome(r.train_s, r.eval_s)
    try:
        values = _values(r, search, objective)
        optuna_state = r.state if r.state != "FAILED" else "FAIL"
        if r.state == "COMPLETE" and values is None:
            optuna_state, r.state, r.reason = "FAIL", "FAILED", f"no finite {objective} at the end"
        run.set_tags({OPTUNA_STATE_TAG: optuna_state})
        run.log_trial(done, write_adapter)
        trial.set_user_attr(COST_ATTR, {"trainable_params": r.trainable_params, "lora_params": r.lora_params,
                                        "train_s": r.train_s, "peak_memory_bytes": r.peak_memory_bytes})
    except BaseException as exc:
        aborted = abort_trial(begun, study, state, refresh, exc)
        if not isinstance(exc, Exception):
            raise
        aborted.train_s, aborted.eval_s = outcome.train_s, outcome.eval_s
        return aborted
    begun.stack.close()
    if optuna_state == "COMPLETE":
        tell(study, trial, values=values)
    elif optuna_state == "PRUNED":
        tell(study, trial, state=TrialState.PRUNED)
    else:
        outcome.error = r.reason or "failed"
        trial.set_user_attr(FAIL_ATTR, "error")
        tell(study, trial, state=TrialState.FAIL)
    if state.running == trial.number:
        state.running = None
    shown = f" {objective} {values[0]:.4f}" if values and optuna_state == "COMPLETE" else \
        (f" ({r.reason})" if r.reason else "")
    refresh(f"trial {trial.number} {optuna_state}{shown}")
    return outcome


def abort_trial(begun: BegunTrial, study: optuna.Study, state: SweepProgress, refresh: Callable[[str], None],
                exc: BaseException) -> TrialOutcome:
    """End a started trial on an exception: its run FAILED (KILLED for Ctrl-C) with the error, the trial
    told FAIL (``interrupted`` for Ctrl-C and other non-Exceptions, which the next run re-queues)."""
    trial = begun.trial
    begun.stack.__exit__(type(exc), exc, exc.__traceback__)
    interrupted = not isinstance(exc, Exception)
    trial.set_user_attr(FAIL_ATTR, "interrupted" if interrupted else "error")
    tell(study, trial, state=TrialState.FAIL)
    if state.running == trial.number:
        state.running = None
    error = "" if interrupted else (first_line(exc) or type(exc).__name__)
    refresh(f"trial {trial.number} interrupted" if interrupted else f"trial {trial.number} FAIL: {error}")
    return TrialOutcome(error=error or "interrupted")


def _values(r: Any, search: SearchConfig, objective: str) -> list[float] | None:
    value = r.final_metrics.get(objective)
    if value is None or not math.isfinite(value):
        return None
    values = [float(value)]
    if search.second_objective == "trainable_params":
        values.append(float(r.trainable_params))
    elif search.second_objective == "train_s":
        values.append(float(r.train_s))
    return values

