"""Recovery after a crash: stale trials are failed and their seeds re-queued, one worker at a time.

Stale trials (see `sweeps.engine.liveness`) are told FAIL, their MLflow runs are ended FAILED, and every
configuration then gets back the seeds it is missing: a seed is missing when no trial of it is COMPLETE,
PRUNED, RUNNING or WAITING, unless the configuration already FAILED by an error of its own (NaN loss, an
unknown target...), which a retry would only repeat. A trial released unrun past the budget
(``lora_sweep.fail: over_budget``, `sweeps.engine.trial`) is never a missing seed: it was fresh, with no
params, and a released queued trial is WAITING again. `recovery_lock` serialises this (and the ladder's
planning) between workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweeps.config.sweep import SweepConfig
from sweeps.engine.dbretry import connect_args, retrying
from sweeps.engine.liveness import Worker, is_stale
from sweeps.engine.space import PARAM_NAMES, config_key, grid_configs, planned_params
from sweeps.engine.study import journal_path, quiet_optuna, tell
from sweeps.names import (
    ERROR_TAG,
    FAIL_ATTR,
    OPTUNA_STATE_TAG,
    OVER_BUDGET,
    RUN_ID_ATTR,
    SEED_INDEX,
    STATE_TAG,
    STUDY_NAME_TAG,
    TRIAL_NUMBER_TAG,
    WORKER_ATTR,
)
from sweeps.text import first_line, mask_url
from sweeps.tracking.store import quiet_mlflow

if TYPE_CHECKING:
    from mlflow import MlflowClient


log = logging.getLogger(__name__)


class HeldLock:
    """The sweep lock, held: ``held()`` says whether it still is (a server's advisory lock is lost with its
    connection when the database restarts; a lock file is held until released)."""

    def __init__(self, check: Callable[[], bool] | None = None) -> None:
        self._check = check

    def held(self) -> bool:
        return self._check is None or self._check()


class LockLost(Exception):
    """The sweep's advisory lock went with its connection (a database restart) before the work was done."""


@contextlib.contextmanager
def recovery_lock(config: SweepConfig, study: optuna.Study) -> Iterator[HeldLock]:
    """Serialise `recover` between workers, so two that start (or restart) at the same moment cannot
    both re-queue a missing seed: an exclusive lock file next to a journal or sqlite storage, a
    PostgreSQL advisory lock (MySQL ``GET_LOCK``) for a server storage. Taking a server's lock is retried
    through a database restart (`sweeps.engine.dbretry`); the lock holds one connection of its own."""
    url = config.search.storage or ""
    if "://" not in url or url.startswith("sqlite"):
        import fcntl

        target = Path(url.split(":///", 1)[1]) if url.startswith("sqlite") else journal_path(config)
        lock_path = target.with_name(target.name + ".recover.lock")
        with open(lock_path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield HeldLock()
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import Connection, make_url
    from sqlalchemy.pool import NullPool

    dialect = make_url(url).get_backend_name()
    if dialect not in ("postgresql", "mysql"):
        log.debug("no recovery lock for a %s storage", dialect)
        yield HeldLock()
        return
    # a connection of our own, held for as long as the lock (advisory locks belong to a session)
    engine = create_engine(url, poolclass=NullPool, connect_args=connect_args(dialect))
    if dialect == "postgresql":
        key = int.from_bytes(hashlib.sha256(f"lora-sweep:{config.name}".encode()).digest()[:8], "big",
                             signed=True)
        lock, unlock = "SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)"
        args: dict[str, Any] = {"k": key}
    else:
        lock, unlock = "SELECT GET_LOCK(:k, -1)", "SELECT RELEASE_LOCK(:k)"
        args = {"k": f"lora-sweep:{config.name}"[:64]}

    def acquire() -> Connection:
        conn = engine.connect()
        try:
            conn.execute(text(lock), args)
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        return conn

    def alive() -> bool:
        try:
            conn.execute(text("SELECT 1"))
        except Exception:
            return False
        return True

    try:
        conn = retrying(acquire, mask_url(url))
        try:
            yield HeldLock(alive)
        finally:
            with contextlib.suppress(Exception):  # a lost connection took the lock with it
                conn.execute(text(unlock), args)
            with contextlib.suppress(Exception):
                conn.close()
    finally:
        engine.dispose()


def recover(study: optuna.Study, config: SweepConfig, client: MlflowClient | None = None,
            me: Worker | None = None) -> tuple[list[int], int]:
    """Fail stale RUNNING trials (ending their MLflow runs FAILED), then enqueue every seed a
    configuration is missing (and, for a grid, every configuration not yet in the study). Runs under
    `recovery_lock`; when a database restart takes the lock away before an enqueue, it starts again.

    Returns (numbers of the trials failed, number of trials enqueued).
    """
    failed: list[int] = []
    enqueued = 0
    while True:
        try:
            with recovery_lock(config, study) as lock:
                more, added = _recover(study, config, client, me, lock)
                return failed + more, enqueued + added
        except LockLost as lost:
            failed, enqueued = failed + lost.args[0], enqueued + lost.args[1]
            log.warning("the sweep lock was lost with its database connection; recovering again")


def _recover(study: optuna.Study, config: SweepConfig, client: MlflowClient | None,
             me: Worker | None, lock: HeldLock) -> tuple[list[int], int]:
    me = me or Worker.current()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # under the lock no other recovery can tell it; a live worker on another host may have
        # finished it meanwhile, and then it keeps its own state
        if is_stale(t, me) and tell(study, t.number, state=TrialState.FAIL).state == TrialState.FAIL:
            failed.append(t.number)
            if client is not None:
                for run_id in _orphan_run_ids(client, config, study.study_name, t):
                    _end_orphan_run(client, run_id, t)
    search = config.search
    if search.strategy == "ladder":  # the ladder's plan enqueues every slot that has no live trial
        return failed, 0
    trials = study.get_trials(deepcopy=False)
    covered: dict[str, set[int]] = {}
    broken: set[str] = set()
    known: dict[str, dict[str, Any]] = {}
    keep = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get(FAIL_ATTR) == OVER_BUDGET:  # released unrun
            continue
        params = planned_params(t)
        if params is None or len(params) < len(PARAM_NAMES):  # crashed while sampling: nothing to repeat
            continue
        key = config_key(params)
        known.setdefault(key, params)
        if t.state in keep:
            covered.setdefault(key, set()).add(int(t.user_attrs.get(SEED_INDEX, 0)))
        elif t.state == TrialState.FAIL and t.user_attrs.get(FAIL_ATTR) == "error":
            broken.add(key)
    if search.strategy == "grid":
        for params in grid_configs(search):
            known.setdefault(config_key(params), params)
    enqueued = 0
    for key, params in known.items():  # dicts keep insertion order: study order, then the grid's
        if key in broken:
            continue
        for k in range(search.seeds):
            if k not in covered.get(key, set()):
                if not lock.held():  # another worker may be recovering now: look at the trials again
                    raise LockLost(failed, enqueued)
                with quiet_optuna():
                    study.enqueue_trial(params, user_attrs={SEED_INDEX: k}, skip_if_exists=False)
                enqueued += 1
    return failed, enqueued


def _orphan_run_ids(client: MlflowClient, config: SweepConfig, study_name: str, t: FrozenTrial) -> list[str]:
    """The MLflow run(s) of a stale trial: from its user attr, else (killed before it was set) by tags."""
    from mlflow.exceptions import MlflowException

    run_id = t.user_attrs.get(RUN_ID_ATTR)
    if run_id:
        return [run_id]
    # killed between creating its run and recording its id: the run may still be in a spool (looked at
    # first: a run that leaves the spool meanwhile is on the server by the search below)
    spooled = getattr(client, "spooled_run_ids", None)
    found: list[str] = spooled({STUDY_NAME_TAG: study_name, TRIAL_NUMBER_TAG: str(t.number)}) if spooled else []
    try:
        with quiet_mlflow():
            exp = client.get_experiment_by_name(config.experiment())
            if exp is None:
                return found
            runs = client.search_runs([exp.experiment_id], max_results=10, filter_string=(
                f"tags.`optuna.study_name` = '{study_name}' and tags.`optuna.trial_number` = '{t.number}' "
                "and attributes.status = 'RUNNING'"))
    except MlflowException as exc:
        log.warning("could not look for the MLflow run of trial %d: %s", t.number, first_line(exc))
        return found
    return found + [r.info.run_id for r in runs]


def _end_orphan_run(client: MlflowClient, run_id: str, t: FrozenTrial) -> None:
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    worker = t.user_attrs.get(WORKER_ATTR) or {}
    why = f"worker died: process {worker.get('pid', '?')} on {worker.get('host', '?')} left the trial RUNNING"
    try:
        with quiet_mlflow():
            try:
                if client.get_run(run_id).info.status != "RUNNING":
                    return
            except MlflowException as exc:  # unreadable now (server down, or the run still in a spool):
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST":  # end it anyway (the spool delivers in order)
                    raise
            client.log_batch(run_id, tags=[RunTag(STATE_TAG, "FAILED"), RunTag(ERROR_TAG, why),
                                           RunTag(OPTUNA_STATE_TAG, "FAIL")], synchronous=True)
            client.set_terminated(run_id, status="FAILED")
    except MlflowException as exc:
        log.warning("could not end the MLflow run %s of trial %d: %s", run_id, t.number, first_line(exc))

