"""The sweep loop: an Optuna study run through ask/tell, one tracked trial at a time, until the budget.

    >>> result = run_sweep(load_sweep_config("examples/demo-sweep.yaml"))   # a TPE sweep
    >>> result.best[0].values, result.best[0].params

- Each Optuna trial is one configuration at one seed. A configuration the sampler proposes is trial
  ``seed_index`` 0; its repeats (``seed_index`` 1 .. seeds-1) are enqueued at once with the same
  params, so TPE sees every seed as one observation of the same point and any worker sharing the
  storage can claim them. The trial's seed is ``config.seed + seed_index``; the data split always uses
  ``config.seed`` (prepared once per sweep), so every trial is judged on the same validation set.
- ``strategy: grid`` enqueues the whole grid (configurations in the order written, then seeds); the
  sampler is never consulted. (Optuna's ``GridSampler`` calls ``study.stop()`` when the grid runs out,
  which raises outside ``study.optimize``; enqueued trials avoid that and are claimable by several
  workers.) ``strategy: ladder`` enqueues what its plan asks for (`sweeps.engine.ladder`).
- The budget ``n_trials`` counts COMPLETE + PRUNED trials in the study plus RUNNING trials of live
  workers; FAIL trials do not count. Several workers may pass the loop's look at the budget together;
  a trial obtained past it is released unrun (a fresh one FAIL ``over_budget``, a queued one back to
  WAITING: `sweeps.engine.trial`), so at most ``n_trials`` trials end COMPLETE or PRUNED, and the loop
  looks at its budget again (the owner then waits for live running trials, which may yet fail and leave
  budget). No new trial starts after ``timeout`` seconds (of this run). The
  grid and the ladder only ever claim queued trials (`sweeps.engine.study.claim_queued`): a grid sweep
  whose queue is empty stops (``stopped: grid``) once no other worker runs one of its trials, even if
  failed trials left the budget unspent.
- Resume: at start-up stale trials are failed and their seeds re-queued (`sweeps.engine.recovery`);
  the MLflow parent run's id is kept in the study and reused (`sweeps.engine.parent`).
- The end: the owner tags the best trial, then (after the last decision, only when the sweep ended by
  its budget, timeout, grid or ladder) evaluates the recommended and best-quality configurations on the
  test split, once (`sweeps.engine.holdout`; ``result.test``), then ends the parent run.
- Ctrl-C: the running trial is told FAIL (``lora_sweep.fail: interrupted``) and its MLflow run ends
  KILLED; the parent run ends KILLED; the next run re-queues the trial with the same params.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState

from lora_core import LoraError
from sweeps.config.sweep import SweepConfig
from sweeps.data.prepare import PreparedData, prepare_data
from sweeps.engine.holdout import HoldoutResult, evaluate_test_split
from sweeps.engine.ladder import plan as ladder_plan
from sweeps.engine.ladder_types import LadderSpec, Observation, ladder_spec
from sweeps.engine.liveness import Worker, live_running, wait_for_other_workers
from sweeps.engine.packing import budget_allows, check_packable, make_trainer, run_pack_session
from sweeps.engine.parent import end_parent, log_ladder, log_worker, open_parent_run
from sweeps.engine.progress import SweepProgress, SweepResult, estimate_left, shown_budget
from sweeps.engine.recovery import recover, recovery_lock
from sweeps.engine.selection import ladder_outcome, recommendation_why, tag_best
from sweeps.engine.space import planned_params
from sweeps.engine.study import open_study, quiet_optuna, state_counts, storage_label, sweep_objectives
from sweeps.engine.trial import TrialOutcome, run_one_trial
from sweeps.models.cache import BaseModelCache
from sweeps.models.load import load_tokenizer
from sweeps.names import (
    COST_ATTR,
    FAIL_ATTR,
    LADDER_ATTR,
    RUNG_ATTR,
    SEED_INDEX,
    STAGE_ATTR,
    STEPS_ATTR,
)
from sweeps.text import first_line
from sweeps.tracking.store import close_client, sweep_client
from sweeps.training.packed import PackedTrainer

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from sweeps.engine.ladder_types import LadderSpec


LADDER_POLL_S = 2.0
MAX_CONSECUTIVE_FAILURES = 3


def prepare_sweep_data(config: SweepConfig) -> PreparedData:
    """Tokenise the data once per sweep (split with the base seed; see the module docstring)."""
    tokenizer = load_tokenizer(config.model.name, trust_remote_code=config.model.trust_remote_code)
    return prepare_data(config.data, config.model.task, tokenizer, seed=config.seed)


def run_sweep(config: SweepConfig, progress: Callable[[SweepProgress], None] | None = None,
              include_plotlyjs: bool | str = "cdn", owner: bool = True,
              models: BaseModelCache | None = None) -> SweepResult:
    """Run (or resume) the sweep until its budget or timeout; see the module docstring.

    ``owner``: this process owns the sweep's MLflow parent run: when the budget is spent it waits
    for other workers' running trials, then ends the parent run. A joining worker (``lora-sweep
    worker``, or a process started by ``--workers``) only tags the best trial. ``models`` keeps the
    base model loaded between trials (one is made when None). Trials' learning_curve.html loads
    plotly.js from its CDN by default (``True`` embeds its 4.8 MB in every trial); MLflow's own
    charts of the logged step metrics need neither.

    Raises:
        LoraError: a user-fixable problem before any trial (storage, data, a changed sweep), or
            ``MAX_CONSECUTIVE_FAILURES`` trials failing in a row (the last error in the message).
    """
    t_start = time.perf_counter()
    search, task = config.search, config.model.task
    data = prepare_sweep_data(config)
    models = models if models is not None else BaseModelCache()
    study = open_study(config)
    client = sweep_client(config.tracking)
    me = Worker.current()
    recovered, requeued = recover(study, config, client, me)
    parent_run_id = open_parent_run(study, config, client)
    objectives, directions = sweep_objectives(config), search.directions(task)
    budget = search.budget()
    result = SweepResult(study.study_name, storage_label(config), config.experiment(), parent_run_id, "budget",
                         {}, [], objectives, directions, recovered=recovered, requeued=requeued)
    state = SweepProgress(budget=shown_budget(config), objective=objectives[0], steps=config.train.steps,
                          ladder=search.strategy == "ladder")
    eta_base: tuple[float, float | None] = (0.0, None)  # (when, estimate then)

    def refresh(event: str = "") -> None:
        """Report progress; the study is read again only for events, not for step updates."""
        nonlocal eta_base
        elapsed = time.perf_counter() - t_start
        timeout_left = max(0.0, search.timeout - elapsed) if search.timeout is not None else None
        if event:
            state.read_counts(study)
            eta_base = (elapsed, estimate_left(study, state.budget, 1, timeout_left))
        state.elapsed_s = elapsed
        state.eta_s = None if eta_base[1] is None else max(0.0, eta_base[1] - (elapsed - eta_base[0]))
        state.event = event
        if progress:
            progress(state)

    parent_status = "FINISHED"
    failures_in_a_row = 0
    ladder = ladder_spec(config) if search.strategy == "ladder" else None
    pack = search.pack != 1
    if pack:
        check_packable(config)
    trainer: PackedTrainer | None = None
    deadline = t_start + search.timeout if search.timeout is not None else None
    last_plan = 0.0
    sessions = 0  # pack sessions of this worker (numbers the packs' ids)

    def count(outcome: TrialOutcome) -> None:
        """Add an ended trial's outcome to the result; stop the sweep after too many failures in a row."""
        nonlocal failures_in_a_row
        result.trials_run += 1
        result.trial_train_s += outcome.train_s
        result.trial_eval_s += outcome.eval_s
        if not outcome.error:
            failures_in_a_row = 0
            return
        failures_in_a_row += 1
        if failures_in_a_row >= MAX_CONSECUTIVE_FAILURES:
            raise LoraError(f"{failures_in_a_row} trials in a row failed; the last: {outcome.error}",
                            hint="see the failed runs' lora_sweep.error tag in MLflow")

    def may_start() -> bool:
        """Inside a pack session: whether a freed slot may take a new trial now (budget, timeout, and
        for the ladder a planned trial: planning again at most every LADDER_POLL_S)."""
        nonlocal last_plan
        if not budget_allows(study, budget, deadline):
            return False
        if ladder is None or study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return True
        if time.perf_counter() - last_plan < LADDER_POLL_S:
            return False
        last_plan = time.perf_counter()
        return ladder_step(study, config, ladder, client, parent_run_id, refresh) == "run"

    try:
        refresh(f"resumed: failed {len(recovered)} stale trial(s) {recovered}, re-queued their seeds"
                if recovered else f"sweep {config.name} started")
        while True:
            if search.timeout is not None and time.perf_counter() - t_start >= search.timeout:
                result.stopped = "timeout"
                break
            trials = study.get_trials(deepcopy=False,
                                      states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
            if len(trials) >= budget:
                if owner and live_running(study, me):  # they may fail, leaving budget to this worker
                    wait_for_other_workers(study, me, refresh)
                    continue
                break
            if ladder is not None:
                step = ladder_step(study, config, ladder, client, parent_run_id, refresh)
                if step == "done":
                    result.stopped = "ladder"
                    break
                if step == "wait":  # a rung is running on other workers; fail theirs if they die
                    time.sleep(LADDER_POLL_S)
                    recover(study, config, client, me)
                    continue
            if pack and trainer is None:
                trainer = make_trainer(config, data, models, ladder)
                if trainer.pack.capacity == 1:  # auto chose 1: trials one at a time
                    trainer.pack.remove()
                    pack, trainer = False, None
                else:
                    refresh(f"packing {trainer.pack.capacity} trials at a time")
            if pack and trainer is not None:
                sessions += 1
                run_pack_session(trainer, study, config, client, parent_run_id, me, state, refresh,
                                 include_plotlyjs, ladder, allowed=may_start, on_outcome=count, number=sessions)
                continue
            if search.strategy == "grid" and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                # the whole grid is enqueued and none of it is left (failed trials keep the budget open)
                if not live_running(study, me):
                    result.stopped = "grid"
                    break
                time.sleep(LADDER_POLL_S)  # another worker's trial may yet die and be re-queued
                recover(study, config, client, me)
                continue
            outcome = run_one_trial(study, config, data, models, client, parent_run_id, me, state, refresh,
                                    include_plotlyjs, ladder)
            if outcome is not None:  # None: another worker took the last queued trial, or the trial was
                # released past the budget (never a failure in a row); look again
                count(outcome)
    except KeyboardInterrupt:
        result.stopped, parent_status = "interrupted", "KILLED"
    except BaseException:
        parent_status = "FAILED"
        raise
    finally:
        try:
            result.best = tag_best(study, config, client, parent_run_id)
            result.states = state_counts(study)
            result.ladder, result.recommended_trial = ladder_outcome(study)
            result.recommendation_why = recommendation_why(study, config, result.ladder)
            if owner and parent_status == "FINISHED" and result.stopped != "interrupted":
                result.test = end_with_test_split(study, config, data, client, parent_run_id, refresh)
        finally:
            result.wall_s = time.perf_counter() - t_start
            if owner:
                end_parent(client, parent_run_id, parent_status, result)
            else:
                log_worker(client, parent_run_id, me, result)
            result.unsent_writes = close_client(client)  # the report then reads a complete store
    return result


def end_with_test_split(study: optuna.Study, config: SweepConfig, data: PreparedData, client: MlflowClient,
                        parent_run_id: str, say: Callable[[str], None]) -> HoldoutResult:
    """The owner's last step: the chosen configurations on the test split (`sweeps.engine.holdout`). Runs
    after every decision and feeds none; a failure is a note, never the sweep's failure."""
    try:
        return evaluate_test_split(study, config, data, client, parent_run_id, say)
    except Exception as exc:
        return HoldoutResult(None, f"the test split could not be evaluated: {first_line(exc) or type(exc).__name__}; "
                                   "run the sweep again to retry")


def observe(study: optuna.Study) -> list[Observation]:
    """The ladder's view of the study: every trial tagged with a stage, with its value and cost."""
    out = []
    for t in study.get_trials(deepcopy=False):
        if STAGE_ATTR not in t.user_attrs:
            continue
        params = planned_params(t) or {}
        value = t.values[0] if t.state == TrialState.COMPLETE and t.values else None
        out.append(Observation(stage=int(t.user_attrs[STAGE_ATTR]), rung=int(t.user_attrs[RUNG_ATTR]),
                               seed_index=int(t.user_attrs.get(SEED_INDEX, 0)), params=params,
                               state=t.state.name, value=value, cost=dict(t.user_attrs.get(COST_ATTR) or {}),
                               number=t.number,
                               retried=t.state == TrialState.FAIL and t.user_attrs.get(FAIL_ATTR) != "error"))
    return out


def ladder_step(study: optuna.Study, config: SweepConfig, spec: LadderSpec, client: MlflowClient,
                parent_run_id: str, refresh: Callable[[str], None]) -> str:
    """Plan the ladder's next trials (under the sweep's lock, so workers agree), enqueue them, and
    store the decisions. Returns "run" (a trial is waiting), "wait" (others are running a rung)
    or "done"."""
    with recovery_lock(config, study):
        p = ladder_plan(observe(study), spec)
        with quiet_optuna():
            for slot in p.enqueue:
                attrs = {SEED_INDEX: slot.seed_index, STAGE_ATTR: slot.stage, RUNG_ATTR: slot.rung}
                if slot.steps is not None:
                    attrs[STEPS_ATTR] = slot.steps
                study.enqueue_trial(slot.params, user_attrs=attrs, skip_if_exists=False)
        record = p.as_attr()
        before = study.user_attrs.get(LADDER_ATTR) or {}
        changed = before != record
        if changed:
            study.set_user_attr(LADDER_ATTR, record)
        waiting = bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    if changed:
        log_ladder(client, parent_run_id, record)
        known = len(before.get("decisions") or [])
        for d in record["decisions"][known:]:
            refresh(f"ladder: {d['text']}")
    if p.done:
        return "done"
    return "run" if waiting else "wait"

