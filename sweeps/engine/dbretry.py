"""Database faults of a server storage (PostgreSQL): bounded connections per process, and storage calls
that survive a database restart.

Connections. The study's storage is opened with a SQLAlchemy pool of ``POOL_SIZE`` (2) connections and no
overflow (``max_overflow=0``, a thread waits up to ``pool_timeout`` 60 s for a free one), each checked
before use (``pool_pre_ping``: a connection the server dropped is replaced, not used), recycled after
30 min, opened with a 10 s connect timeout and TCP keepalives, and named in ``pg_stat_activity``
(``application_name`` ``lora-sweep pid N``). The threads that use the storage share these two: the sweep
loop (ask, tell, reads, recovery, the ladder's planning) and the heartbeat thread of each running trial.
(Creating the tables in a new database takes both at once, for Optuna's schema version.) The recovery lock
(`sweeps.engine.recovery`) holds one more connection of its own while it is held. Look-ups open no pool:
a worker finding its sweep by name (before its study is opened) and the read-only study of ``status``,
``export`` and the report (which the owner writes after its sweep, without the lock) use one connection
per call, closed after it (`sweeps.config.ref.lookup_engine_kwargs`). So one process, a worker or the owner
of ``lora-sweep run --workers N``, holds at most ``CONNECTIONS_PER_PROCESS`` = 3 connections: N workers need
3 N, plus 3 for the owner, plus whatever else uses the server (an MLflow backend store on it, psql
sessions). SQLite storages keep SQLAlchemy's defaults.

Restarts. Every call of the storage (ask, tell, heartbeats, attribute writes, reports, the reads of the
loop) that fails with a connection error is retried with exponential backoff (0.5 s, doubling up to 5 s,
jittered) while the outage lasts less than ``RETRY_ENV`` (``LORA_SWEEP_DB_RETRY_S``, default 600 s),
counted from the first failure of the outage in this process; training goes on meanwhile. The process
prints one line when the database becomes unreachable and one when it answers again; past the bound the
call raises a one-line `LoraError` (and so does every call after it until the database answers).

Calls that are not idempotent are made safe to repeat, because a call whose commit went through but
whose reply was lost fails like one that never reached the server:

- creating a trial (``ask`` with nothing queued, ``enqueue_trial``, ``add_trial``) stores a unique token in
  the new trial (``lora_sweep.create``) in the same transaction; after a failure the retry first looks for
  the trial with that token and returns it, so a trial is never created twice (Optuna's own blind retry loop
  for this call is bypassed);
- claiming a queued trial (``ask``: WAITING -> RUNNING) writes a token (``lora_sweep.claim``) in the same
  transaction as the state change; after a failure the retry returns "claimed" when the trial holds our
  token, so a claimed trial is never left RUNNING without its worker knowing it (``claim_token`` reads the
  token of a trial's last claim, for a release that must tell its own claim from another worker's);
- finishing a trial (``tell``) that a retry finds already finished is not written again: in the state asked
  for it is our own lost reply, in another state another process finished it first (``skip_if_finished``);
- attribute writes, reports and parameters are upserts (or ignore a duplicate key): a repeat is harmless.

The tokens are rows of Optuna's trial system attributes table that only this class writes and looks for
(the two names are reserved). They are left out of everything the storage returns (``get_trial``,
``get_all_trials``, ``get_best_trial``, ``get_trial_system_attrs``, the trial ``create_new_trial`` hands
Optuna's cache), so Optuna's storage contract holds (tests/test_storage_contract.py runs Optuna's own
storage tests on it) and user code, Optuna's features and copies of a trial (``enqueue_trial``,
``add_trial``, ``copy_study``, retry callbacks) never see or carry them. A template trial given to
``create_new_trial`` loses any token it holds (one read by a plain ``RDBStorage``, which does show them):
the new trial gets a fresh creation token and no claim. The retries find their token by reading the table
itself.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable, Container, Sequence
from typing import Any, TypeVar

import optuna
import optuna.storages._rdb.storage as optuna_rdb
from optuna.storages._rdb import models as optuna_models
from optuna.trial import FrozenTrial, TrialState

from lora_core import LoraError
from sweeps.config.ref import server_connect_args as connect_args
from sweeps.names import CLAIM_TOKEN_ATTR, CREATE_TOKEN_ATTR
from sweeps.text import first_line, mask_url

__all__ = ["CONNECTIONS_PER_PROCESS", "DEFAULT_RETRY_S", "POOL_SIZE", "RETRY_ENV", "TOKEN_ATTRS",
           "ResilientRDBStorage", "connect_args", "engine_kwargs", "is_transient", "last_outage_end",
           "retry_bound_s", "retrying"]

T = TypeVar("T")

RETRY_ENV = "LORA_SWEEP_DB_RETRY_S"
DEFAULT_RETRY_S = 600.0
POOL_SIZE = 2                                 # the loop and the heartbeat thread(s)
LOCK_CONNECTIONS = 1                          # the recovery lock's own connection, while held
CONNECTIONS_PER_PROCESS = POOL_SIZE + LOCK_CONNECTIONS
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 5.0
_WORKER_ENV = "LORA_SWEEP_WORKER"             # sweeps.engine.workers.WORKER_ENV: "i/N" in a worker of --workers
_JITTER = random.Random()                     # its own: the trainer's seeded random streams stay untouched
TOKEN_ATTRS = (CREATE_TOKEN_ATTR, CLAIM_TOKEN_ATTR)  # trial system attributes the storage never returns


def retry_bound_s() -> float:
    """How long an outage may last before storage calls give up: ``LORA_SWEEP_DB_RETRY_S`` seconds."""
    raw = os.environ.get(RETRY_ENV, "").strip()
    if not raw:
        return DEFAULT_RETRY_S
    try:
        value = float(raw)
    except ValueError:
        raise LoraError(f"{RETRY_ENV}={raw!r} is not a number of seconds",
                        hint=f"e.g. {RETRY_ENV}=600 (0 fails at the first connection error)") from None
    return max(0.0, value)


def engine_kwargs(url: str) -> dict[str, Any]:
    """SQLAlchemy engine options of the study's storage: the bounded pool for a server, nothing for SQLite."""
    from sqlalchemy.engine import make_url

    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        return {}
    return {"pool_size": POOL_SIZE, "max_overflow": 0, "pool_timeout": 60, "pool_pre_ping": True,
            "pool_recycle": 1800, "connect_args": connect_args(backend)}


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a lost or refused connection, a server shutting down or
    starting, a deadlock, or no free pooled connection: worth retrying."""
    from sqlalchemy import exc as sa_exc

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError,
                                sa_exc.TimeoutError)):
            return True
        if isinstance(current, sa_exc.DBAPIError) and current.connection_invalidated:
            return True
        name, module = type(current).__name__, type(current).__module__
        if name in ("OperationalError", "InterfaceError") and module.split(".")[0] in (
                "psycopg", "psycopg2", "pymysql", "MySQLdb"):
            return True
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return False


def _reason(exc: BaseException) -> str:
    """The driver's words for a connection error (not Optuna's "An exception is raised during the commit")."""
    from sqlalchemy import exc as sa_exc

    current: BaseException | None = exc
    for _ in range(10):
        if current is None:
            break
        if isinstance(current, sa_exc.DBAPIError) and current.orig is not None:
            return f"{type(current.orig).__name__}: {first_line(current.orig, 160)}"
        if current.__cause__ is None and current.__context__ is None:
            return f"{type(current).__name__}: {first_line(current, 160)}"
        current = current.__cause__ or current.__context__
    return first_line(exc, 160)


class _Outage:
    """This process's view of the database: reachable, or unreachable since when (shared by its threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.since: float | None = None       # time.monotonic() of the first failure of the outage
        self.last_end = 0.0                   # time.time() when the last outage ended

    def failed(self, label: str, exc: BaseException, bound: float) -> float:
        """Record a failure; returns how long the outage has lasted."""
        with self._lock:
            now = time.monotonic()
            if self.since is None:
                self.since = now
                _say(f"database unreachable: {label} ({_reason(exc)}); retrying for up to {bound:g} s "
                     f"({RETRY_ENV})")
            return now - self.since

    def answered(self, label: str) -> None:
        if self.since is None:  # the common case, without the lock
            return
        with self._lock:
            if self.since is not None:
                _say(f"database back after {time.monotonic() - self.since:.1f} s: {label}")
                self.since, self.last_end = None, time.time()


_OUTAGE = _Outage()


def last_outage_end() -> float:
    """When (``time.time()``) this process last saw the database answer again after an outage; 0 if never."""
    return _OUTAGE.last_end


def _say(line: str) -> None:
    label = os.environ.get(_WORKER_ENV)
    prefix = f"[worker {label} pid {os.getpid()}] " if label else ""
    # one write, the newline included: print() writes the text and the newline separately, and a line
    # another thread prints in between (a relayed worker line, on the same pipe) tore the two apart
    sys.stderr.write(prefix + line + "\n")
    sys.stderr.flush()


class _NotDone:
    pass


NOT_DONE: Any = _NotDone()


def retrying(call: Callable[[], T], label: str, resolve: Callable[[], Any] | None = None,
             bound_s: float | None = None) -> T:
    """``call()``, retried on connection errors (see the module docstring). ``resolve``, when given, is
    called before each retry: a result other than ``NOT_DONE`` means the failed attempt took effect
    after all, and is returned instead of calling again."""
    bound = retry_bound_s() if bound_s is None else bound_s
    delay, failed = FIRST_DELAY_S, False
    while True:
        try:
            if failed and resolve is not None:
                done = resolve()
                if done is not NOT_DONE:
                    _OUTAGE.answered(label)
                    return done
            result = call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            failed = True
            lasted = _OUTAGE.failed(label, exc, bound)
            if lasted >= bound:
                raise LoraError(f"the database {label} has been unreachable for {lasted:.0f} s, longer than "
                                f"{RETRY_ENV}={bound:g}: {_reason(exc)}") from None
            time.sleep(min(delay * _JITTER.uniform(0.8, 1.2), max(0.05, bound - lasted)))
            delay = min(delay * 2, MAX_DELAY_S)
            continue
        _OUTAGE.answered(label)
        return result


def _retried(name: str) -> Callable[..., Any]:
    plain = getattr(optuna.storages.RDBStorage, name)

    def method(self: ResilientRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return retrying(lambda: plain(self, *args, **kwargs), self.label, bound_s=self.bound_s)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"``RDBStorage.{name}``, retried on connection errors."
    return method


def _without_tokens(trial: FrozenTrial) -> FrozenTrial:
    """``trial`` (one just built from the rows, not shared) with the retry tokens taken out."""
    for key in TOKEN_ATTRS:
        trial.system_attrs.pop(key, None)
    return trial


class ResilientRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage with the bounded pool of `engine_kwargs` and every call retried through a
    database restart, its retry tokens kept out of what it returns (see the module docstring). Opening it
    is not retried: a wrong URL fails at once."""

    # Methods that only read, or write idempotently (upserts; a duplicate parameter is ignored), retried as
    # they are. They include the private ones Optuna's cache in front of an RDB storage calls. (The reads of
    # trials, retried too, are defined below: they leave the tokens out.)
    PLAIN = ("create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
             "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
             "get_study_system_attrs", "get_all_studies", "_set_trial_param", "get_trial_param",
             "get_trial_id_from_study_id_trial_number", "_get_best_trial_id", "set_trial_intermediate_value",
             "set_trial_user_attr", "set_trial_system_attr", "get_trial_user_attrs", "record_heartbeat",
             "_get_stale_trial_ids")
    # RDBStorage's methods that the ones below call or replace (checked at import, as PLAIN is)
    USED = ("get_trial", "_get_trials", "get_trial_system_attrs", "get_all_trials", "get_best_trial",
            "_create_new_trial", "_get_prepared_new_trial", "_set_trial_attr_without_commit",
            "_build_frozen_trial_from_trial_model", "check_trial_is_updatable", "set_trial_state_values")

    def __init__(self, url: str, bound_s: float | None = None, **kwargs: Any) -> None:
        self.label, self.bound_s = mask_url(url), bound_s
        super().__init__(url, engine_kwargs=engine_kwargs(url), **kwargs)
        self.engine.dispose()  # creating the tables took two at once: the pool grows again only as threads need

    # ------------------------------------------------------------------ reads: no token in what they return
    # (get_all_trials reads through _get_trials, get_best_trial through get_trial)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        """``RDBStorage.get_trial``, retried on connection errors, without the retry tokens."""
        plain = optuna.storages.RDBStorage.get_trial
        return _without_tokens(retrying(lambda: plain(self, trial_id), self.label, bound_s=self.bound_s))

    def _get_trials(self, study_id: int, states: Container[TrialState] | None, included_trial_ids: set[int],
                    trial_id_greater_than: int) -> list[FrozenTrial]:
        """``RDBStorage._get_trials`` (of ``get_all_trials`` and Optuna's cache), retried on connection
        errors, without the retry tokens."""
        plain = optuna.storages.RDBStorage._get_trials
        trials = retrying(lambda: plain(self, study_id, states, included_trial_ids, trial_id_greater_than),
                          self.label, bound_s=self.bound_s)
        return [_without_tokens(t) for t in trials]

    def get_trial_system_attrs(self, trial_id: int) -> dict[str, Any]:
        """``RDBStorage.get_trial_system_attrs``, retried on connection errors, without the retry tokens."""
        plain = optuna.storages.RDBStorage.get_trial_system_attrs
        attrs = retrying(lambda: plain(self, trial_id), self.label, bound_s=self.bound_s)
        return {key: value for key, value in attrs.items() if key not in TOKEN_ATTRS}

    def claim_token(self, trial_id: int) -> str | None:
        """The token of the last claim of trial ``trial_id`` (WAITING -> RUNNING through this class), None
        if it was never claimed so; retried on connection errors."""
        return retrying(lambda: self._stored_token(trial_id, CLAIM_TOKEN_ATTR), self.label, bound_s=self.bound_s)

    def _stored_token(self, trial_id: int, key: str) -> str | None:
        """The token ``key`` of a trial, read from the table (once: the caller retries)."""
        model = optuna_models.TrialSystemAttributeModel
        with optuna_rdb._create_scoped_session(self.scoped_session) as session:
            row = session.query(model.value_json).filter(model.trial_id == trial_id, model.key == key).one_or_none()
            return None if row is None else json.loads(row[0])

    # ------------------------------------------------------------------ writes made safe to repeat

    def _create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> FrozenTrial:
        if template_trial is None:  # a fresh trial, as RDBStorage makes it, as a template to carry the token
            template = FrozenTrial(number=-1, state=TrialState.RUNNING, value=None, values=None,
                                   datetime_start=datetime.datetime.now(), datetime_complete=None, params={},
                                   distributions={}, user_attrs={}, system_attrs={}, intermediate_values={},
                                   trial_id=-1)
        else:  # a copy of another trial (read by a plain RDBStorage, say) leaves its tokens behind
            template = _without_tokens(copy.deepcopy(template_trial))
        token = uuid.uuid4().hex
        fresh = template_trial is None

        def create() -> FrozenTrial:
            if fresh:
                template.datetime_start = datetime.datetime.now()
            written = copy.copy(template)
            written.system_attrs = {**template.system_attrs, CREATE_TOKEN_ATTR: token}
            with optuna_rdb._create_scoped_session(self.scoped_session) as session:
                # the study row locked: trial numbers are counted in this transaction (as RDBStorage does)
                optuna_models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
                trial = self._get_prepared_new_trial(study_id, written, session)
                frozen = copy.deepcopy(template)  # what Optuna's cache keeps: without the token
                frozen.number, frozen.datetime_start, frozen._trial_id = (trial.number, trial.datetime_start,
                                                                          trial.trial_id)
            return frozen

        def resolve() -> Any:
            model = optuna_models.TrialSystemAttributeModel
            with optuna_rdb._create_scoped_session(self.scoped_session) as session:
                trial = (session.query(optuna_models.TrialModel)
                         .join(model, model.trial_id == optuna_models.TrialModel.trial_id)
                         .filter(optuna_models.TrialModel.study_id == study_id, model.key == CREATE_TOKEN_ATTR,
                                 model.value_json == json.dumps(token))
                         .one_or_none())
                if trial is None:
                    return NOT_DONE
                return _without_tokens(self._build_frozen_trial_from_trial_model(trial))

        return retrying(create, self.label, resolve, self.bound_s)

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        if state == TrialState.RUNNING and values is None:
            return self._claim(trial_id)
        plain = optuna.storages.RDBStorage.set_trial_state_values

        def resolve() -> Any:
            stored = self.get_trial(trial_id)
            if not stored.state.is_finished():
                return NOT_DONE
            same = stored.state == state and (values is None or list(stored.values or []) == list(values))
            return same  # ours after all, or another process finished it first: left as it is

        return retrying(lambda: plain(self, trial_id, state, values), self.label,
                        resolve if state.is_finished() else None, self.bound_s)

    def _claim(self, trial_id: int) -> bool:
        """WAITING -> RUNNING (``ask`` popping a queued trial) with a claim token in the same transaction."""
        from sqlalchemy.exc import IntegrityError

        token = uuid.uuid4().hex

        def claim() -> bool:
            try:
                with optuna_rdb._create_scoped_session(self.scoped_session) as session:
                    trial = optuna_models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
                    self.check_trial_is_updatable(trial_id, trial.state)
                    if trial.state != TrialState.WAITING:
                        return False  # another worker claimed it first
                    trial.state = TrialState.RUNNING
                    trial.datetime_start = datetime.datetime.now()
                    self._set_trial_attr_without_commit(session, optuna_models.TrialSystemAttributeModel,
                                                        trial_id, CLAIM_TOKEN_ATTR, token)
            except IntegrityError:
                return False
            return True

        def resolve() -> Any:
            return True if self._stored_token(trial_id, CLAIM_TOKEN_ATTR) == token else NOT_DONE

        return retrying(claim, self.label, resolve, self.bound_s)


for _name in ResilientRDBStorage.PLAIN + ResilientRDBStorage.USED:
    if not callable(getattr(optuna.storages.RDBStorage, _name, None)):  # a renamed method in another Optuna
        raise ImportError(f"optuna.storages.RDBStorage has no method {_name}: sweeps.engine.dbretry needs "
                          f"updating for Optuna {optuna.__version__}")
for _name in ResilientRDBStorage.PLAIN:
    setattr(ResilientRDBStorage, _name, _retried(_name))
