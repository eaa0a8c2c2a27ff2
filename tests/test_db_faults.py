"""Database faults, against a private PostgreSQL cluster the tests stop and start (tests/services.py):
a restart in the middle of a sweep, six workers under ``max_connections=20``, the retry helper (an outage
it rides out, one past its bound, a commit whose reply is lost), and the plain ``postgresql://`` URL for
the Optuna storage (psycopg 3; test_multi_machine.py runs an ``mlflow server`` on such a URL).

Workers are real processes training the tiny BERT of ``test_train``, as in test_workers.py.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState
from services import PrivatePostgres
from support import mlflow_runs, planned, seeded_home, write_sweep

from lora_core import LoraError
from sweeps.config.sweep import load_sweep_config
from sweeps.engine import dbretry
from sweeps.engine.dbretry import CONNECTIONS_PER_PROCESS, RETRY_ENV, ResilientRDBStorage
from sweeps.engine.study import open_storage
from sweeps.names import CLAIM_TOKEN_ATTR, CREATE_TOKEN_ATTR, WORKER_ATTR

pytestmark = pytest.mark.usefixtures("isolated")

REPO = Path(__file__).resolve().parents[1]
MAX_CONNECTIONS = 20
OUTAGE_S = 10.0


@pytest.fixture(scope="module")
def server() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres(max_connections=MAX_CONNECTIONS)
    try:
        yield pg
    finally:
        pg.close()


@pytest.fixture
def pg(server: PrivatePostgres) -> Iterator[PrivatePostgres]:
    """The module's server, running again after each test (a test that failed while it was stopped)."""
    yield server
    with contextlib.suppress(subprocess.CalledProcessError):
        server.start()


def fresh_db(pg: PrivatePostgres) -> tuple[str, str]:
    name = f"t_{uuid.uuid4().hex[:10]}"
    return name, pg.create_database(name)


def cli(*args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "sweeps.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def cli_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
            "TRANSFORMERS_VERBOSITY": "error", "LORA_SWEEP_CACHE": str(tmp_path / "cache")}


class Watch:
    """A psycopg connection of the test's own (to the ``postgres`` database) that samples, every 0.1 s,
    the client connections to database ``db``: in all, of the processes but ``owner_app``, and by
    ``application_name`` (one per process)."""

    def __init__(self, pg: PrivatePostgres, db: str) -> None:
        self.pg, self.db = pg, db
        self.owner_app = ""
        self.peak_total = self.peak_workers = 0
        self.peak_by_app: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psycopg

        conn = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(host="127.0.0.1", port=self.pg.port, user="postgres", dbname="postgres",
                                           autocommit=True, connect_timeout=2)
                rows = conn.execute("select application_name, count(*) from pg_stat_activity "
                                    "where datname = %s and backend_type = 'client backend' group by 1",
                                    (self.db,)).fetchall()
                self.peak_total = max(self.peak_total, sum(n for _, n in rows))
                self.peak_workers = max(self.peak_workers, sum(n for app, n in rows if app != self.owner_app))
                for app, n in rows:
                    self.peak_by_app[app] = max(self.peak_by_app[app], n)
            except psycopg.OperationalError:  # the server is stopped: sample again when it is back
                conn = None
            self._stop.wait(0.1)
        if conn is not None:
            conn.close()

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def trial_states(pg: PrivatePostgres, db: str) -> Counter[str]:
    try:
        out = pg.query("select state, count(*) from trials group by state", db=db)
    except subprocess.CalledProcessError:  # the tables are not made yet
        return Counter()
    return Counter({s: int(n) for s, n in (line.split("|") for line in out.splitlines() if line)})


def wait_until(pred: Callable[[], bool], proc: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s  # bounds a hang only
    while not pred():
        assert proc.poll() is None, "the sweep ended before the condition"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


# --------------------------------------------------------------------------- the retry helper


def test_a_call_during_a_stop_succeeds_after_the_restart_and_fails_past_the_bound(
        pg: PrivatePostgres, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    _, url = fresh_db(pg)
    storage = ResilientRDBStorage(url)
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    capfd.readouterr()

    pg.stop()
    down = time.monotonic()
    restart = threading.Timer(3.0, pg.start)
    restart.start()
    try:
        trial.set_user_attr("k", 1)  # blocks through the outage
        study.tell(trial, 0.5)
    finally:
        restart.join()
    waited = time.monotonic() - down
    err = capfd.readouterr().err
    assert 3.0 <= waited < 3.0 + dbretry.MAX_DELAY_S * 1.2 + 5, waited
    assert err.count("database unreachable: ") == 1 and err.count("database back after ") == 1, err
    assert "Connection refused" in err or "shutting down" in err or "closed" in err, err
    done = study.get_trials()
    assert [(t.state, t.values, t.user_attrs) for t in done] == [(TrialState.COMPLETE, [0.5], {"k": 1})]

    monkeypatch.setenv(RETRY_ENV, "2")
    pg.stop()
    start = time.monotonic()
    with pytest.raises(LoraError) as caught:
        study.ask()
    gave_up = time.monotonic() - start
    assert 2.0 <= gave_up < 2.0 + 10, gave_up  # at its bound, not the default 600 s (10 s: a loaded machine)
    message = str(caught.value)
    assert "\n" not in message and "unreachable for 2 s" in message and f"{RETRY_ENV}=2" in message, message
    start = time.monotonic()
    with pytest.raises(LoraError):  # the same outage, already past its bound: no second wait
        study.get_trials()
    assert time.monotonic() - start < 2.0  # less than the bound: it did not wait through another one
    pg.start()
    assert len(study.get_trials()) == 1  # answers again: the outage is over
    assert capfd.readouterr().err.count("database back after ") == 1


def test_a_commit_whose_reply_is_lost_is_not_repeated(pg: PrivatePostgres) -> None:
    """The commit goes through, then the call fails as if the connection dropped before the reply (raised
    from SQLAlchemy's after_commit hook): each retried call must find its own work instead of redoing it."""
    _, url = fresh_db(pg)
    storage = ResilientRDBStorage(url)
    study = optuna.create_study(study_name="s", storage=storage)
    lost: list[int] = [0]
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
        return [(t.number, t.state.name) for t in study.get_trials()]

    lost[0] = 1
    fresh = study.ask()  # a new trial: created once, not twice
    assert lost[0] == 0 and states() == [(0, "RUNNING")]
    lost[0] = 1
    study.enqueue_trial({"x": 0.25})  # queued once
    assert lost[0] == 0 and states() == [(0, "RUNNING"), (1, "WAITING")]
    lost[0] = 1
    queued = study.ask()  # claims the queued trial: it is ours, no other trial is made
    assert lost[0] == 0 and queued.number == 1 and states() == [(0, "RUNNING"), (1, "RUNNING")]
    assert queued.suggest_float("x", 0, 1) == 0.25
    lost[0] = 1
    study.tell(fresh, 1.0)  # finished once, without "already finished"
    lost[0] = 1
    study.tell(queued, state=TrialState.PRUNED)
    assert lost[0] == 0
    trials = study.get_trials()
    assert [(t.number, t.state, t.values) for t in trials] == [(0, TrialState.COMPLETE, [1.0]),
                                                                (1, TrialState.PRUNED, None)]
    # the tokens the retries found are in the rows (RDBStorage's own read shows them), not in what the storage
    # returns (tests/test_storage_contract.py)
    assert not any(key in t.system_attrs for t in trials for key in (CREATE_TOKEN_ATTR, CLAIM_TOKEN_ATTR))
    assert all(optuna.storages.RDBStorage.get_trial(storage, t._trial_id).system_attrs[CREATE_TOKEN_ATTR]
               for t in trials)
    assert storage.claim_token(trials[1]._trial_id) and storage.claim_token(trials[0]._trial_id) is None


# --------------------------------------------------------------------------- plain URLs


def test_the_plain_postgresql_url_opens_the_storage_with_psycopg_3(pg: PrivatePostgres, tmp_path: Path) -> None:
    """(``mlflow server --backend-store-uri postgresql://...`` with psycopg 3 alone: test_multi_machine.py.)"""
    name, url = fresh_db(pg)
    assert url.startswith("postgresql://")  # no +driver
    config = load_sweep_config(REPO / "examples" / "demo-sweep.yaml",
                               [f"tracking.home={tmp_path}", f"search.storage={url}"])
    storage = open_storage(config)
    assert isinstance(storage, ResilientRDBStorage) and storage.engine.dialect.driver == "psycopg"
    pool = storage.engine.pool
    assert (pool.size(), pool._max_overflow, pool._pre_ping) == (dbretry.POOL_SIZE, 0, True)
    study = optuna.create_study(study_name="plain", storage=storage)
    study.tell(study.ask(), 1.0)
    assert pg.query("select count(*) from trials where state = 'COMPLETE'", db=name) == "1"
    apps = pg.query(f"select distinct application_name from pg_stat_activity where datname = '{name}'")
    assert apps == f"lora-sweep pid {os.getpid()}"


# --------------------------------------------------------------------------- sweeps


def test_a_postgresql_restart_in_the_middle_of_a_sweep_loses_and_repeats_nothing(
        tiny_model_dir: Path, tiny_data_file: Path, empty_store: Path, tmp_path: Path, pg: PrivatePostgres) -> None:
    db, url = fresh_db(pg)
    home = seeded_home(tmp_path, empty_store)
    path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, home, rank=[1, 2, 4], seeds=2, n_trials=6,
                       storage=url, train={"steps": 40, "eval_every": 20})
    owner = cli("run", str(path), "--workers", "2", env=cli_env(tmp_path))
    try:
        before: Counter[str] = Counter()

        def training() -> bool:  # a trial is done and others are training
            nonlocal before
            before = trial_states(pg, db)
            return before["COMPLETE"] >= 1 and before["RUNNING"] >= 1

        wait_until(training, owner)
        pg.stop()
        down = time.monotonic()
        time.sleep(OUTAGE_S)
        pg.start()
        outage_s = time.monotonic() - down
        out = owner.communicate(timeout=600)[0].decode()
    finally:
        if owner.poll() is None:
            owner.kill()
    assert owner.returncode == 0, out[-3000:]
    print(f"\noutage {outage_s:.1f} s; trials when it began: {dict(before)}")
    print("\n".join(line for line in out.splitlines() if "database " in line))
    lines = out.splitlines()
    unreachable = [line for line in lines if "database unreachable: " in line]
    back = [line for line in lines if "database back after " in line]
    assert any(line.startswith("[worker ") for line in unreachable), out[-3000:]
    assert len(back) >= 1 and len(back) == len(unreachable), "\n".join(unreachable + back)
    assert before["COMPLETE"] < 6  # the outage came in the middle of the sweep

    study = optuna.load_study(study_name="tiny-sweep", storage=url)
    trials = study.get_trials()
    counts = Counter(t.state for t in trials)
    done = planned(study)  # (configuration, seed) -> how many COMPLETE or PRUNED trials ran it
    print(f"trials {len(trials)}: {dict(Counter(t.state.name for t in trials))}; duplicates "
          f"{sum(n - 1 for n in done.values())}; lost {6 - len(done)}")
    print(out[-6000:])
    for t in trials:  # the table a failure is diagnosed from
        print(f"  #{t.number} {t.state.name} {t.params} seed {t.user_attrs.get('seed_index')} "
              f"pid {t.user_attrs.get(WORKER_ATTR, {}).get('pid')} queued {'fixed_params' in t.system_attrs} "
              f"claimed {CLAIM_TOKEN_ATTR in t.system_attrs} {t.datetime_start} {t.datetime_complete}")
    assert counts == {TrialState.COMPLETE: 6}, counts  # nothing failed, stuck RUNNING or left WAITING
    assert len(done) == 6 and set(done.values()) == {1}  # each (configuration, seed) exactly once
    parent, children = mlflow_runs(home)
    assert parent.info.status == "FINISHED"
    assert sorted(int(r.data.params["optuna.trial_number"]) for r in children) == list(range(6))
    assert {r.info.status for r in children} == {"FINISHED"}
    assert len({t.user_attrs[WORKER_ATTR]["pid"] for t in trials}) == 2


def test_six_workers_stay_within_their_connections(tiny_model_dir: Path, tiny_data_file: Path,
                                                   empty_store: Path, tmp_path: Path, pg: PrivatePostgres) -> None:
    db, url = fresh_db(pg)
    home = seeded_home(tmp_path, empty_store)
    path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, home, rank=[1, 2, 4], seeds=2, n_trials=6,
                       storage=url, train={"steps": 10, "eval_every": 10})
    with Watch(pg, db) as watch:
        owner = cli("run", str(path), "--workers", "6", env=cli_env(tmp_path))
        watch.owner_app = f"lora-sweep pid {owner.pid}"
        try:
            out = owner.communicate(timeout=600)[0].decode()
        finally:
            if owner.poll() is None:
                owner.kill()
    assert owner.returncode == 0, out[-3000:]
    owner_app = f"lora-sweep pid {owner.pid}"
    workers = {app: n for app, n in watch.peak_by_app.items() if app != owner_app}
    print(f"\npeak connections: {watch.peak_total} in all (max_connections {MAX_CONNECTIONS}), "
          f"{watch.peak_workers} of the six workers; by process {dict(watch.peak_by_app)}")
    assert "database unreachable" not in out and "too many clients" not in out, out[-3000:]
    # every connection is named after its process (the look-ups by name too): six workers besides the owner
    assert len(workers) == 6 and all(app.startswith("lora-sweep pid ") for app in workers), watch.peak_by_app
    assert max(workers.values()) <= CONNECTIONS_PER_PROCESS
    assert watch.peak_by_app[owner_app] <= CONNECTIONS_PER_PROCESS
    assert 6 <= watch.peak_workers <= 6 * CONNECTIONS_PER_PROCESS, watch.peak_workers
    assert watch.peak_total <= MAX_CONNECTIONS
    study = optuna.load_study(study_name="tiny-sweep", storage=url)
    assert Counter(t.state for t in study.get_trials()) == {TrialState.COMPLETE: 6}
    assert sorted(planned(study).values()) == [1] * 6
