"""Optuna's own storage contract (``optuna.testing.pytest_storages.StorageTestCase``) for the PostgreSQL
storage of a sweep, `sweeps.engine.dbretry.ResilientRDBStorage`, opened as the product opens it
(``ResilientRDBStorage(url)``, `sweeps.engine.study.open_storage`); and our own checks that the retry
tokens it writes (``lora_sweep.create``, ``lora_sweep.claim``) never reach what the storage returns while a
retry still finds them.

One database per module on a PostgreSQL server: the one on 127.0.0.1:5432 (``LORA_SWEEP_TEST_POSTGRES``
names another server), or, where none answers, a private cluster (tests/services.py). Its name holds the
pytest-xdist worker and the process id, so parallel runs never share one; the tables are created once, and
each test starts from them emptied (rows deleted, id sequences restarted), not from a new database. The
database is dropped at the end.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

import optuna
import pytest
import sqlalchemy
from optuna.storages._rdb import models as optuna_models
from optuna.testing.pytest_storages import StorageTestCase
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.pool import NullPool

from sweeps.engine import dbretry
from sweeps.engine.dbretry import ResilientRDBStorage
from sweeps.names import CLAIM_TOKEN_ATTR, CREATE_TOKEN_ATTR

SERVER_ENV = "LORA_SWEEP_TEST_POSTGRES"
DEFAULT_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
TOKENS = (CREATE_TOKEN_ATTR, CLAIM_TOKEN_ATTR)
KEPT = ("version_info",)  # Optuna's schema version (and alembic's own table, outside the metadata): kept


class Database:
    """A database of this module's own on ``server`` (a URL without a database), its Optuna tables created."""

    def __init__(self, server: str) -> None:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        self.name = f"lora_sweep_contract_{worker}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.admin = sqlalchemy.create_engine(f"{server}/postgres", poolclass=NullPool, isolation_level="AUTOCOMMIT")
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{self.name}"')
        self.url = f"{server}/{self.name}"
        self.engine = sqlalchemy.create_engine(self.url, poolclass=NullPool)
        try:
            ResilientRDBStorage(self.url).engine.dispose()  # Optuna's tables and schema version, once
            with self.engine.connect() as conn:
                sequences = conn.exec_driver_sql("SELECT sequencename FROM pg_sequences WHERE schemaname = 'public'"
                                                 ).scalars().all()
        except BaseException:
            self.drop()
            raise
        # DELETE, children first, and the id sequences restarted: as empty as TRUNCATE ... RESTART IDENTITY
        # leaves them, 20 times faster on these few rows (TRUNCATE makes new files for every table and index)
        tables = [t.name for t in reversed(optuna_models.BaseModel.metadata.sorted_tables) if t.name not in KEPT]
        self.emptying = [f'DELETE FROM "{t}"' for t in tables] + [f'ALTER SEQUENCE "{s}" RESTART' for s in sequences]

    def empty(self) -> None:
        with self.engine.begin() as conn:
            for statement in self.emptying:
                conn.exec_driver_sql(statement)

    def drop(self) -> None:
        self.engine.dispose()
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self.admin.dispose()


def _answers(server: str) -> bool:
    engine = sqlalchemy.create_engine(f"{server}/postgres", poolclass=NullPool, connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            return True
    except sqlalchemy.exc.OperationalError:
        return False
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def database() -> Iterator[Database]:
    server = os.environ.get(SERVER_ENV, DEFAULT_SERVER).rstrip("/")
    private = None
    if not _answers(server):
        from services import PrivatePostgres

        try:
            private = PrivatePostgres()
        except RuntimeError as exc:  # no initdb here
            pytest.skip(f"no PostgreSQL server answers at {server} ({SERVER_ENV}) and none can be started: {exc}")
        server = private.url(driver="psycopg").rsplit("/", 1)[0]
    db = Database(server)
    try:
        yield db
    finally:
        db.drop()
        if private is not None:
            private.close()


@pytest.fixture
def fresh_storage(database: Database) -> Iterator[ResilientRDBStorage]:
    storage = ResilientRDBStorage(database.url)
    try:
        yield storage
    finally:
        storage.engine.dispose()
        database.empty()


class TestResilientRDBStorage(StorageTestCase):
    """Every test of Optuna's storage contract, on an emptied database. None is skipped: all pass, as they do
    on a plain ``optuna.storages.RDBStorage`` on the same database (checked with Optuna 5.0.0: 59 of 59)."""

    @pytest.fixture
    def storage(self, fresh_storage: ResilientRDBStorage) -> ResilientRDBStorage:
        return fresh_storage


# --------------------------------------------------------------------------- the tokens


def raw_tokens(database: Database, trial_id: int) -> dict[str, str]:
    """The tokens stored with a trial, read from the table itself."""
    with database.engine.connect() as conn:
        rows = conn.execute(sqlalchemy.text("SELECT key, value_json FROM trial_system_attributes "
                                            "WHERE trial_id = :t"), {"t": trial_id}).all()
    return {key: json.loads(value) for key, value in rows if key in TOKENS}


def assert_no_tokens(*trials: FrozenTrial | dict[str, Any]) -> None:
    for t in trials:
        attrs = t if isinstance(t, dict) else t.system_attrs
        assert not [key for key in attrs if key.startswith("lora_sweep.")], attrs


def test_what_the_storage_returns_holds_no_token(fresh_storage: ResilientRDBStorage, database: Database) -> None:
    storage = fresh_storage
    study = optuna.create_study(study_name="s", storage=storage)
    fresh = study.ask()  # create_new_trial without a template
    study.enqueue_trial({"x": 0.25}, user_attrs={"u": 1})  # with one, WAITING
    queued = study.ask()  # claims it: WAITING -> RUNNING
    assert queued.number == 1 and queued.suggest_float("x", 0, 1) == 0.25
    study.tell(fresh, 2.0)
    study.tell(queued, 1.0)
    assert set(raw_tokens(database, fresh._trial_id)) == {CREATE_TOKEN_ATTR}  # stored all the same
    assert set(raw_tokens(database, queued._trial_id)) == {CREATE_TOKEN_ATTR, CLAIM_TOKEN_ATTR}
    assert storage.claim_token(queued._trial_id) == raw_tokens(database, queued._trial_id)[CLAIM_TOKEN_ATTR]
    assert storage.claim_token(fresh._trial_id) is None

    study_id = study._study_id
    assert_no_tokens(*storage.get_all_trials(study_id), *storage.get_all_trials(study_id, deepcopy=False),
                     *storage._get_trials(study_id, None, set(), -1),
                     *study.trials, study.best_trial, storage.get_best_trial(study_id),
                     *(storage.get_trial(t._trial_id) for t in study.trials),
                     *(storage.get_trial_system_attrs(t._trial_id) for t in study.trials))
    assert storage.get_trial(queued._trial_id).system_attrs == {"fixed_params": {"x": 0.25}}
    for template in (None, study.trials[1]):
        created = storage._create_new_trial(study_id, template)  # what Optuna's cache keeps
        assert_no_tokens(created, storage.get_trial(created._trial_id))
    # a reader of the table itself (a plain RDBStorage) sees the tokens: a trial copied from it gets its own
    plain = optuna.storages.RDBStorage(database.url, skip_table_creation=True)
    try:
        seen = plain.get_trial(queued._trial_id)
    finally:
        plain.engine.dispose()
    assert set(TOKENS) <= set(seen.system_attrs)
    copied = storage.create_new_trial(study_id, seen)
    assert_no_tokens(storage.get_trial(copied))
    assert set(raw_tokens(database, copied)) == {CREATE_TOKEN_ATTR}  # its own, and no stale claim
    assert raw_tokens(database, copied)[CREATE_TOKEN_ATTR] != seen.system_attrs[CREATE_TOKEN_ATTR]


def test_copies_of_trials_carry_no_token(fresh_storage: ResilientRDBStorage, database: Database) -> None:
    storage = fresh_storage
    study = optuna.create_study(study_name="from", storage=storage)
    study.enqueue_trial({"x": 0.5})
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    study.tell(trial, 1.0)
    study.add_trial(study.trials[0])  # Optuna's add_trial, from a trial the storage returned
    study.enqueue_trial(study.trials[0].params)
    optuna.copy_study(from_study_name="from", from_storage=storage, to_storage=storage, to_study_name="to")
    copy = optuna.load_study(study_name="to", storage=storage)
    assert [t.state for t in copy.trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.WAITING]
    assert_no_tokens(*study.trials, *copy.trials)
    tokens = [raw_tokens(database, t._trial_id) for t in study.trials + copy.trials]
    assert all(set(t) <= set(TOKENS) for t in tokens)
    created = [t[CREATE_TOKEN_ATTR] for t in tokens]
    assert len(set(created)) == len(created) == 6  # each trial its own creation token, none copied
    assert all(CLAIM_TOKEN_ATTR not in t for t in tokens[1:])  # only the trial claimed holds a claim


def test_a_lost_reply_is_resolved_by_the_token(fresh_storage: ResilientRDBStorage, database: Database,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """(tests/test_db_faults.py does the same through a server that really stops.) The commit goes through,
    then the call fails as if the reply was lost: the retry finds its own trial, its own claim."""
    monkeypatch.setattr(dbretry, "FIRST_DELAY_S", 0.01)
    storage = fresh_storage
    study = optuna.create_study(study_name="s", storage=storage)
    lost = [0]
    factory = storage.scoped_session.session_factory

    @sqlalchemy.event.listens_for(factory, "after_flush")
    def _wrote(session: Any, context: Any) -> None:
        session.info["wrote"] = True

    @sqlalchemy.event.listens_for(factory, "after_commit")
    def _lose_reply(session: Any) -> None:
        if session.info.pop("wrote", False) and lost[0] > 0:
            lost[0] -= 1
            raise sqlalchemy.exc.OperationalError("COMMIT", {}, Exception("server closed the connection"))

    def states() -> list[tuple[int, str]]:
        return [(t.number, t.state.name) for t in storage.get_all_trials(study._study_id)]

    lost[0] = 1
    fresh = study.ask()  # created once, not twice
    assert lost[0] == 0 and states() == [(0, "RUNNING")] and fresh.number == 0
    lost[0] = 1
    study.enqueue_trial({"x": 0.25})
    assert lost[0] == 0 and states() == [(0, "RUNNING"), (1, "WAITING")]
    lost[0] = 1
    queued = study.ask()  # the claim's reply is lost: our token says it is ours
    assert lost[0] == 0 and queued.number == 1 and states() == [(0, "RUNNING"), (1, "RUNNING")]
    assert queued.suggest_float("x", 0, 1) == 0.25
    assert storage.claim_token(queued._trial_id) is not None
    assert_no_tokens(*study.trials, *storage.get_all_trials(study._study_id))
    assert all(raw_tokens(database, t._trial_id).get(CREATE_TOKEN_ATTR) for t in study.trials)


def test_a_failure_before_the_commit_is_done_again(fresh_storage: ResilientRDBStorage, database: Database,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The other side of the retry: nothing was committed, the token is nowhere, the call is made again."""
    monkeypatch.setattr(dbretry, "FIRST_DELAY_S", 0.01)
    storage = fresh_storage
    study = optuna.create_study(study_name="s", storage=storage)
    failing = [0]
    factory = storage.scoped_session.session_factory

    @sqlalchemy.event.listens_for(factory, "after_flush")
    def _wrote(session: Any, context: Any) -> None:
        session.info["wrote"] = True

    @sqlalchemy.event.listens_for(factory, "before_commit")
    def _drop(session: Any) -> None:  # a transaction that wrote fails before its commit: rolled back
        if session.info.pop("wrote", False) and failing[0] > 0:
            failing[0] -= 1
            raise sqlalchemy.exc.OperationalError("COMMIT", {}, Exception("server closed the connection"))

    failing[0] = 1
    study.enqueue_trial({"x": 0.25})
    assert failing[0] == 0 and [t.state for t in study.trials] == [TrialState.WAITING]
    failing[0] = 1
    trial = study.ask()
    assert failing[0] == 0 and trial.number == 0 and [t.state for t in study.trials] == [TrialState.RUNNING]
    assert set(raw_tokens(database, trial._trial_id)) == set(TOKENS)
    assert_no_tokens(*study.trials)


def test_a_second_claim_fails_and_leaves_the_first_token(fresh_storage: ResilientRDBStorage) -> None:
    storage = fresh_storage
    study = optuna.create_study(study_name="s", storage=storage)
    study.enqueue_trial({"x": 0.25})
    trial_id = study.trials[0]._trial_id
    assert storage.set_trial_state_values(trial_id, TrialState.RUNNING) is True
    first = storage.claim_token(trial_id)
    assert first is not None
    assert storage.set_trial_state_values(trial_id, TrialState.RUNNING) is False  # already claimed
    assert storage.claim_token(trial_id) == first
    assert_no_tokens(storage.get_trial(trial_id), storage.get_trial_system_attrs(trial_id))
