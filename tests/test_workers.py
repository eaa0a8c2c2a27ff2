"""Several workers on one sweep: ``run --workers N`` on a journal file, ``run`` plus ``worker`` on a real
PostgreSQL (127.0.0.1:5432, a fresh database per test), a worker killed in the middle of a trial, the
recovery lock, the device plan and the time-left estimate.

Workers are real processes (``python -m sweeps.cli.main worker``) training the tiny BERT of ``test_train``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState
from support import load_study, mlflow_runs, planned, seeded_home, store_uri, write_sweep

from sweeps.cli.main import main
from sweeps.config.sweep import load_sweep_config
from sweeps.engine.progress import estimate_left
from sweeps.engine.recovery import recover, recovery_lock
from sweeps.engine.selection import concurrent_write
from sweeps.engine.space import suggest
from sweeps.engine.study import claim_queued, open_study
from sweeps.engine.workers import THREADS_ENV, WORKER_ENV, device_plan
from sweeps.names import LADDER_ATTR, SEED_INDEX, WORKER_ATTR

pytestmark = pytest.mark.usefixtures("isolated")  # hub offline, a private data cache, quiet progress bars


REPO = Path(__file__).resolve().parents[1]


def cli_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
            "TRANSFORMERS_VERBOSITY": "error", "LORA_SWEEP_CACHE": str(tmp_path / "cache")}


def cli(*args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "sweeps.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def worker_pids(study: optuna.Study) -> set[int]:
    return {int(t.user_attrs[WORKER_ATTR]["pid"]) for t in study.get_trials()
            if WORKER_ATTR in t.user_attrs}


def assert_every_complete_trial_has_its_adapter(home: Path, study: optuna.Study) -> None:
    client = MlflowClient(tracking_uri=store_uri(home))
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        files = {f.path for f in client.list_artifacts(t.user_attrs["mlflow_run_id"], "adapter")}
        assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= files, t.number


# --------------------------------------------------------------------------- end to end


def test_two_workers_share_a_journal_storage(tiny_model_dir: Path, tiny_data_file: Path, empty_store: Path,
                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = seeded_home(tmp_path, empty_store)
    path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, home, rank=[1, 2, 4], seeds=2, n_trials=6)
    assert main(["run", str(path), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 workers: CPU, 1 thread(s) each of 2 cores" in out or "2 workers" in out
    assert "[worker 1/2 pid" in out and "[worker 2/2 pid" in out  # both claimed trials, relayed by the owner

    study = load_study(home)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 6
    assert sorted(planned(study).values()) == [1] * 6  # 3 configurations x 2 seeds, each exactly once
    assert len({key for key, _ in planned(study)}) == 3
    assert len(worker_pids(study)) == 2 and os.getpid() not in worker_pids(study)
    parent, children = mlflow_runs(home)
    assert parent.info.status == "FINISHED"
    assert sorted(int(r.data.params["optuna.trial_number"]) for r in children) == list(range(6))
    assert {r.info.status for r in children} == {"FINISHED"}
    assert sum(r.data.tags.get("lora_sweep.best") == "true" for r in children) == 1
    assert_every_complete_trial_has_its_adapter(home, study)


def test_a_killed_worker_is_restarted_and_its_trial_requeued(tiny_model_dir: Path, tiny_data_file: Path,
                                                             empty_store: Path, tmp_path: Path) -> None:
    home = seeded_home(tmp_path, empty_store)
    path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, home, rank=[1, 2], seeds=2, n_trials=4,
                       train={"steps": 250, "eval_every": 50})
    owner = cli("run", str(path), "--workers", "2", env=cli_env(tmp_path))
    killed = None
    try:
        deadline = time.monotonic() + 600  # bounds a hang only: the kill comes as soon as it can
        journal = home / "optuna" / "tiny-sweep.journal"
        while time.monotonic() < deadline and owner.poll() is None and killed is None:
            with contextlib.suppress(KeyError):
                trials = load_study(home).get_trials(deepcopy=False) if journal.is_file() else []
                running = [t for t in trials if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs]
                if running:
                    killed = running[0]
                    os.kill(int(killed.user_attrs[WORKER_ATTR]["pid"]), signal.SIGKILL)
            time.sleep(0.05)
        out = owner.communicate(timeout=900)[0].decode()
    finally:
        if owner.poll() is None:
            owner.kill()
    assert killed is not None, "no trial ever ran"
    assert owner.returncode == 0, out[-3000:]
    assert "died" in out and "restarting it" in out

    study = load_study(home)
    assert study.trials[killed.number].state == TrialState.FAIL
    assert Counter(t.state for t in study.trials) == {TrialState.COMPLETE: 4, TrialState.FAIL: 1}
    # the killed (configuration, seed) ran again exactly once, by whichever worker asked first
    again = planned(study)
    assert again[(json.dumps(killed.params, sort_keys=True), killed.user_attrs["seed_index"])] == 1
    assert sorted(again.values()) == [1] * 4
    parent, children = mlflow_runs(home)
    assert parent.info.status == "FINISHED"
    # A replacement worker was started and ran to its end: every worker that ends records itself on the
    # parent run (the killed one cannot). Two such records, neither the killed pid: the survivor and the
    # replacement, whether or not the replacement found a trial left to run (the survivor may take them all).
    killed_pid = int(killed.user_attrs[WORKER_ATTR]["pid"])
    ended = {int(k.rsplit(".", 1)[1]) for k in parent.data.tags if k.startswith("lora_sweep.worker.")}
    assert len(ended) == 2 and killed_pid not in ended, parent.data.tags
    assert worker_pids(study) - {killed_pid} <= ended  # trials were run only by the workers that ended
    assert Counter(r.info.status for r in children) == {"FINISHED": 4, "FAILED": 1}
    orphan = next(r for r in children if r.data.tags["optuna.trial_number"] == str(killed.number))
    assert "worker died" in orphan.data.tags["lora_sweep.error"]
    assert_every_complete_trial_has_its_adapter(home, study)


# --------------------------------------------------------------------------- recovery lock


def _stale_study(config) -> optuna.Study:
    """The sweep's study with one trial RUNNING for a worker process that does not exist."""
    study = open_study(config)
    params = {"r": 4, "alpha_per_r": 2.0, "targets": "q,v", "lr": 1e-3, "dropout": 0.0}
    study.enqueue_trial(params, user_attrs={SEED_INDEX: 0})
    claimed = study.ask()  # the enqueued configuration, claimed by a worker that then died
    suggest(claimed, config.search)
    dead = {"host": os.uname().nodename, "pid": 2 ** 22 + 17, "started": "1"}  # above pid_max: never alive
    claimed.set_user_attr(WORKER_ATTR, dead)
    return study


@pytest.mark.parametrize("storage", ["journal", "postgresql"])
def test_recovery_is_serialised(storage: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    sets = [f"tracking.home={tmp_path}", "search.seeds=1"]
    if storage == "postgresql":
        sets.append(f"search.storage={request.getfixturevalue('pg_url')}")
    config = load_sweep_config(REPO / "examples" / "demo-sweep.yaml", sets)
    study = _stale_study(config)
    results: list[tuple[list[int], int]] = []

    def recover_in_a_thread() -> None:
        results.append(recover(study, config))

    with recovery_lock(config, study):  # held here: the two recoveries must wait for it
        threads = [threading.Thread(target=recover_in_a_thread) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        assert results == [] and all(t.is_alive() for t in threads)
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 2
    failed = sorted(n for f, _ in results for n in f)
    assert failed == [0]  # the stale trial was failed once
    assert sorted(n for _, n in results) == [0, 1]  # and its seed re-queued once, not twice
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].user_attrs[SEED_INDEX] == 0


# --------------------------------------------------------------------------- plan and estimate


def test_device_plan_pins_gpus_and_splits_cpu_threads() -> None:
    cpu = device_plan(2, gpus=[], cores=2)
    assert [p[THREADS_ENV] for p in cpu] == ["1", "1"]
    assert all(p["CUDA_VISIBLE_DEVICES"] == "" and p["OMP_NUM_THREADS"] == "1" for p in cpu)
    assert [p[WORKER_ENV] for p in cpu] == ["1/2", "2/2"]
    assert [p[THREADS_ENV] for p in device_plan(3, gpus=[], cores=16)] == ["5", "5", "5"]
    assert [p[THREADS_ENV] for p in device_plan(4, gpus=[], cores=2)] == ["1"] * 4  # never 0
    gpu = device_plan(3, gpus=["0", "1"], cores=16)
    assert [p["CUDA_VISIBLE_DEVICES"] for p in gpu] == ["0", "1", "0"]  # round robin
    assert [p["CUDA_VISIBLE_DEVICES"] for p in device_plan(2, gpus=["3", "5"], cores=16)] == ["3", "5"]


def test_claiming_a_queued_trial_never_creates_one() -> None:
    """Two studies on one storage, as two workers: each queued trial is claimed once, then None."""
    storage = optuna.storages.InMemoryStorage()
    a = optuna.create_study(study_name="q", storage=storage)
    b = optuna.load_study(study_name="q", storage=storage)
    for k in range(3):
        a.enqueue_trial({"x": 0.5}, user_attrs={SEED_INDEX: k})
    claimed = [claim_queued(s) for s in (a, b, a)]
    assert [t.user_attrs[SEED_INDEX] for t in claimed if t is not None] == [0, 1, 2]
    assert claim_queued(b) is None and claim_queued(a) is None
    assert [t.state for t in a.get_trials()] == [TrialState.RUNNING] * 3  # no fourth trial
    assert claimed[1] is not None and claimed[1].suggest_float("x", 0, 1) == 0.5  # the queued params


def test_a_tag_write_that_collides_with_another_workers_is_made_again(tmp_path: Path) -> None:
    """Two workers ending at once both tag the best run: MLflow's SQL store inserts a tag it did not find,
    so one of the two first writes fails on the unique key. Here the collision is made for real: the tag
    row is inserted behind the client's back between its look and its insert."""
    import sqlalchemy
    from mlflow.store.tracking.dbmodels.models import SqlTag

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("clash")).info.run_id
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'mlflow.db'}")
    sneaked: list[int] = []
    real_merge = sqlalchemy.orm.Session.merge

    def merge_after_another(session: Any, instance: Any, **kw: Any) -> Any:  # the other worker wins the race
        merged = real_merge(session, instance, **kw)  # looked, found no row: an INSERT at the commit
        if isinstance(instance, SqlTag) and not sneaked:
            sneaked.append(1)
            with engine.begin() as conn:
                conn.execute(sqlalchemy.text("INSERT INTO tags (key, value, run_uuid) VALUES (:k, 'true', :r)"),
                             {"k": instance.key, "r": instance.run_uuid})
        return merged

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sqlalchemy.orm.Session, "merge", merge_after_another)
        with pytest.raises(Exception, match="UNIQUE constraint failed"):  # what a plain set_tag does
            client.set_tag(run_id, "lora_sweep.best", "true")
        sneaked.clear()
        client.delete_tag(run_id, "lora_sweep.best")
        concurrent_write(lambda: client.set_tag(run_id, "lora_sweep.best", "true"))
    assert sneaked and client.get_run(run_id).data.tags["lora_sweep.best"] == "true"
    with pytest.raises(ValueError, match="not a clash"):  # any other error is not retried
        concurrent_write(lambda: (_ for _ in ()).throw(ValueError("not a clash")))


def test_time_left_estimate() -> None:
    t0 = dt.datetime(2026, 1, 1, 12, 0, 0)
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    assert estimate_left(optuna.create_study(), 10, 1, None) is None  # nothing finished: no estimate
    study = optuna.create_study()
    for seconds in (10, 30, 20):
        trial = optuna.trial.create_trial(params={"x": 0.5}, distributions=dist, value=0.1)
        trial.datetime_start = t0
        trial.datetime_complete = t0 + dt.timedelta(seconds=seconds)
        study.add_trial(trial)
    now = t0.timestamp() + 1000
    assert estimate_left(study, 10, 1, None, now=now) == pytest.approx(7 * 20)  # median 20 s
    assert estimate_left(study, 10, 2, None, now=now) == pytest.approx(7 * 20 / 2)
    assert estimate_left(study, 10, 1, 60.0, now=now) == pytest.approx(60.0)  # capped by the timeout
    assert estimate_left(study, 3, 1, None, now=now) == 0.0
    running = study.ask()  # started 5 s ago: about 15 s to go, and 6 trials still to start
    left = estimate_left(study, 10, 1, None, now=running.datetime_start.timestamp() + 5)
    assert left == pytest.approx(15 + 6 * 20, abs=0.5)


def test_the_ladder_with_two_workers_plans_each_trial_once(tiny_model_dir: Path, tiny_data_file: Path,
                                                           empty_store: Path, tmp_path: Path) -> None:
    """Both workers plan under the sweep lock: each rung's seeds run side by side, no slot twice."""
    home = seeded_home(tmp_path, empty_store)
    ladder = {"r_start": 1, "r_max": 2, "seeds": 2, "max_seeds": 2, "targets": ["q,v", "q,k,v,o"], "calibrate": False}
    path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, home, name="tiny-ladder", strategy="ladder",
                       ladder=ladder, n_trials=20, train={"steps": 120, "eval_every": 40})  # long enough that both start one
    assert main(["run", str(path), "--workers", "2"]) == 0
    study = load_study(home, "tiny-ladder")
    planned_trials = [t for t in study.trials if "lora_sweep.stage" in t.user_attrs]
    slots = Counter((t.user_attrs["lora_sweep.stage"], t.user_attrs["lora_sweep.rung"], t.user_attrs["seed_index"])
                    for t in planned_trials if t.state == TrialState.COMPLETE)
    assert set(slots.values()) == {1} and len(slots) == 6  # r=1, r=2 (stage 1), q,k,v,o (stage 2), 2 seeds each
    assert planned_trials == study.trials  # workers only claim queued trials: none was made up
    assert study.user_attrs[LADDER_ATTR]["done"]
    assert len(worker_pids(study)) == 2
