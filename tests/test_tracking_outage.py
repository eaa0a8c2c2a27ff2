"""A tracking server that goes down loses nothing and stops nothing: the spool of MLflow writes
(sweeps.tracking.spool), against a real ``mlflow server`` that the tests kill and restart.

The outage here is 12 s with MLflow's retries at their defaults: the spool's sender makes one
attempt at a time (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` in the worker), so any outage longer than one
request already exercises it; bench/outage.py measures the 5-minute case.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from services import MlflowServer
from support import write_sweep

from sweeps.names import RUN_ID_ATTR
from sweeps.tracking.spool import PROVISIONAL_PREFIX, RUN_KEY_TAG, Spool, classify, resolve_run_id

pytestmark = pytest.mark.usefixtures("isolated")

REPO = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
            "TRANSFORMERS_VERBOSITY": "error", "LORA_SWEEP_CACHE": str(tmp_path / "cache"), **extra}


def _cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "sweeps.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _study(home: Path, name: str) -> optuna.Study:
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(home / "optuna" / f"{name}.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def _wait_running(home: Path, name: str, number: int, timeout_s: float = 300, with_run: bool = False) -> None:
    """Until trial ``number`` is RUNNING (``with_run``: and has made its MLflow run, spooled or sent)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            trials = _study(home, name).get_trials(deepcopy=False)
        except (KeyError, FileNotFoundError, ValueError):
            trials = []
        if any(t.number == number and t.state == TrialState.RUNNING
               and (not with_run or RUN_ID_ATTR in t.user_attrs) for t in trials):
            return
        time.sleep(0.1)
    raise AssertionError(f"trial {number} never ran")


def _runs(url: str, experiment: str) -> tuple[MlflowClient, list]:
    client = MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def _points(client: MlflowClient, run) -> dict[str, int]:
    return {key: len(client.get_metric_history(run.info.run_id, key))
            for key in ("train_loss", "val_accuracy", "val_eval_loss")}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """One server for the module (each test names its own sweeps, and leaves the server up)."""
    root = tmp_path_factory.mktemp("server")
    srv = MlflowServer(root, f"sqlite:///{root / 'mlflow.db'}")
    srv.start()
    yield srv
    srv.stop()


def _sweep(tmp_path: Path, tiny_model_dir: Path, tiny_data_file: Path, name: str, url: str, home: Path) -> Path:
    path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, home, name=name, rank=[1, 2, 4, 8], n_trials=4,
                       train={"steps": 30, "eval_every": 15})
    doc = path.read_text().replace(f"home: {home}", f"home: {home}\n  uri: {url}")
    path.write_text(doc)
    return path


# --------------------------------------------------------------------------- end to end

def test_an_outage_in_the_middle_of_a_trial_loses_nothing_and_stops_nothing(
        tiny_model_dir: Path, tiny_data_file: Path, tmp_path: Path, server: MlflowServer) -> None:
    env = _env(tmp_path)
    # one trial of the same sweep without an outage: what a complete history looks like
    base_home = tmp_path / "base"
    base = _sweep(tmp_path, tiny_model_dir, tiny_data_file, "calm", server.url, base_home)
    proc = _cli("run", str(base), "--set", "search.n_trials=1", env=env, cwd=tmp_path)
    out = proc.communicate(timeout=900)[0].decode()
    assert proc.returncode == 0, out[-3000:]

    home = tmp_path / "home"
    path = _sweep(tmp_path, tiny_model_dir, tiny_data_file, "stormy", server.url, home)
    proc = _cli("run", str(path), env=env, cwd=tmp_path)
    try:
        _wait_running(home, "stormy", 1)
        time.sleep(0.5)
        server.stop()  # SIGKILL: the trial in progress loses its server
        # training goes on while the server is down: the server stays down until trial 1 has ended and
        # trial 2 has started (a sweep that waited for its server would never get there; the wait bounds a hang)
        _wait_running(home, "stormy", 2)
        study = _study(home, "stormy")
        done_during = [t.number for t in study.get_trials(states=(TrialState.COMPLETE,))]
        server.start()
        out = proc.communicate(timeout=900)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert 1 in done_during, f"trial 1 did not finish during the outage: {done_during}"
    assert "MLflow tracking server unreachable" in out and "MLflow tracking server back after" in out, out[-2000:]

    study = _study(home, "stormy")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4  # no trial lost, none failed

    client, runs = _runs(server.url, "stormy")
    _, calm_runs = _runs(server.url, "calm")
    trials = [r for r in runs if r.data.tags.get("lora_sweep.kind") == "trial"]
    parent = [r for r in runs if r.data.tags.get("lora_sweep.kind") == "sweep"]
    assert len(trials) == 4 and len(parent) == 1
    assert {r.info.status for r in trials} == {"FINISHED"} and parent[0].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent[0].info.run_id}
    calm_points = _points(client, next(r for r in calm_runs if r.data.tags.get("lora_sweep.kind") == "trial"))
    for run in trials:
        assert _points(client, run) == calm_points, run.info.run_name
        files = {f.path for f in client.list_artifacts(run.info.run_id, "adapter")}
        assert "adapter/adapter_model.safetensors" in files
        assert run.info.end_time >= run.info.start_time
    # trial 1 ended while the server was down: its run carries its true end time, not the replay's
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in trials}
    t1 = study.trials[1]
    assert abs(by_number[1].info.end_time / 1000 - t1.datetime_complete.timestamp()) < 5
    # the Optuna study points to every run, provisional ids resolving through their key tag
    exp_ids = [parent[0].info.experiment_id]
    assert {resolve_run_id(client, t.user_attrs[RUN_ID_ATTR], exp_ids) for t in study.trials} == \
        {r.info.run_id for r in trials}
    assert list((home / "spool").glob("*.sqlite")) == []  # nothing left in the spool


def test_a_worker_killed_while_the_server_is_down_replays_its_spool_when_it_restarts(
        tiny_model_dir: Path, tiny_data_file: Path, tmp_path: Path, server: MlflowServer) -> None:
    env = _env(tmp_path)
    home = tmp_path / "home"
    path = _sweep(tmp_path, tiny_model_dir, tiny_data_file, "killed", server.url, home)
    proc = _cli("run", str(path), env=env, cwd=tmp_path)
    try:
        _wait_running(home, "killed", 0)
        server.stop()
        # trials 0 and 1 ended with the server down; trial 2 has made its run (in the spool): killing it
        # before that would leave no run to fail, which is not what this test is about
        _wait_running(home, "killed", 2, with_run=True)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = [t.number for t in _study(home, "killed").trials if t.state == TrialState.RUNNING]
    assert len(killed) == 1
    spools = list((home / "spool").glob("*.sqlite"))
    assert len(spools) == 1
    left = Spool.adopt(spools[0])
    assert left is not None and left.pending() > 0
    unsent = left.pending()
    left.close(remove_if_empty=False)

    server.start()
    proc = _cli("run", str(path), env=env, cwd=tmp_path)  # the restarted worker: same home
    out = proc.communicate(timeout=900)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    assert f"replaying {unsent} MLflow writes left in" in out

    study = _study(home, "killed")
    states = [t.state for t in study.trials]
    assert states.count(TrialState.FAIL) == 1 and states[killed[0]] == TrialState.FAIL  # re-queued
    assert states.count(TrialState.COMPLETE) == 4
    _client, runs = _runs(server.url, "killed")
    trials = [r for r in runs if r.data.tags.get("lora_sweep.kind") == "trial"]
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in trials}
    assert sorted(by_number) == [0, 1, 2, 3, 4]  # 4 configurations + the killed trial's
    ranks = sorted(t.params["r"] for t in study.trials if t.state == TrialState.COMPLETE)
    assert ranks == [1, 2, 4, 8]  # the killed trial's configuration ran again, each exactly once
    assert by_number[0].info.status == by_number[1].info.status == "FINISHED"  # sent after the restart
    assert by_number[killed[0]].info.status == "FAILED"  # the killed one, failed by recovery
    assert {r.info.status for n, r in by_number.items() if n != killed[0]} == {"FINISHED"}
    assert list((home / "spool").glob("*.sqlite")) == []


def test_a_sweep_that_ends_during_an_outage_keeps_its_writes_for_sync(
        tiny_model_dir: Path, tiny_data_file: Path, tmp_path: Path, server: MlflowServer) -> None:
    env = _env(tmp_path, LORA_SWEEP_DRAIN_TIMEOUT_S="3")
    home = tmp_path / "home"
    path = _sweep(tmp_path, tiny_model_dir, tiny_data_file, "late", server.url, home)
    proc = _cli("run", str(path), env=env, cwd=tmp_path)
    try:
        _wait_running(home, "late", 3)
        server.stop()
        out = proc.communicate(timeout=900)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "MLflow writes could not be sent and are kept in" in out and "lora-sweep sync --home" in out
    assert len(list((home / "spool").glob("*.sqlite"))) == 1

    sync = subprocess.run([sys.executable, "-m", "sweeps.cli", "sync", "--home", str(home), "--timeout", "5"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert sync.returncode == 1 and "still unsent" in sync.stdout  # the server is still down
    server.start()
    sync = subprocess.run([sys.executable, "-m", "sweeps.cli", "sync", "--home", str(home)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert sync.returncode == 0, sync.stdout + sync.stderr
    assert "sent" in sync.stdout
    _, runs = _runs(server.url, "late")
    assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 5
    assert list((home / "spool").glob("*.sqlite")) == []


# --------------------------------------------------------------------------- the spool itself

def test_the_spool_keeps_writes_in_order_across_processes(tmp_path: Path) -> None:
    spool = Spool.create(tmp_path, "http://127.0.0.1:1")
    for i in range(3):
        spool.append("log_batch", {"run_id": "r", "metrics": [["m", float(i), 0, i]], "params": [], "tags": []})
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "a.txt").write_text("x")
    spool.append("log_artifacts", {"run_id": "r", "artifact_path": None}, folder)
    assert not folder.exists()  # moved into the spool before the write counts as made
    assert Spool.adopt(spool.path) is None  # its owner is alive
    head = spool.head()
    assert head is not None and head.args["metrics"][0][1] == 0.0 and not head.maybe_sent
    spool.done(head)
    spool.close()  # the owner ends (dies) with 3 writes unsent
    adopted = Spool.adopt(spool.path)
    assert adopted is not None and adopted.pending() == 3
    head = adopted.head()
    assert head is not None and head.maybe_sent and head.args["metrics"][0][1] == 1.0
    adopted.done(head)
    adopted.bury(adopted.head(), "refused")
    last = adopted.head()
    assert last is not None and last.op == "log_artifacts"
    assert (adopted.files_of(last) / "a.txt").read_text() == "x"
    adopted.done(last)
    assert adopted.pending() == 0 and adopted.buried() == 1
    adopted.close()
    assert spool.path.exists()  # a buried write keeps its spool on disk


def test_failed_sends_are_told_apart() -> None:
    from mlflow.exceptions import MlflowException

    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError:
            raise MlflowException("API request to http://x failed with exception ...") from None
    except MlflowException as exc:
        refused = exc
    refused.__context__ = ConnectionRefusedError(111, "Connection refused")
    assert classify(refused) == (False, False)  # transient, not applied
    assert classify(MlflowException("API request to http://x failed with timeout exception")) == (False, True)
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    assert classify(MlflowException("bad", error_code=INVALID_PARAMETER_VALUE)) == (True, False)
    assert PROVISIONAL_PREFIX and RUN_KEY_TAG == "lora_sweep.run_key"
    assert json.loads(json.dumps(float("nan"))) != 0  # NaN metrics survive the spool's JSON


def test_recovery_finds_a_dead_workers_run_that_is_still_in_its_spool(tmp_path: Path) -> None:
    """A worker killed between creating its trial's run and recording the run's id: the run is found in
    the spool the next process adopted (the server, down, has not seen it), so recovery can end it."""
    from types import SimpleNamespace

    from support import free_port

    from sweeps.engine.recovery import _orphan_run_ids
    from sweeps.tracking.spool_client import SpoolingClient

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: the server is down
    dead = Spool.create(tmp_path, url)
    for number in (2, 3):
        tags = {"optuna.study_name": "s", "optuna.trial_number": str(number), RUN_KEY_TAG: f"key{number}"}
        dead.append("create_run", {"experiment_id": "1", "start_time": 0, "tags": tags, "run_name": f"t{number}",
                                   "key": f"key{number}"})
    dead.close()
    client = SpoolingClient(url, tmp_path, echo=lambda _: None)
    try:
        config = SimpleNamespace(experiment=lambda: "s")
        trial = SimpleNamespace(number=2, user_attrs={})
        assert _orphan_run_ids(client, config, "s", trial) == [f"{PROVISIONAL_PREFIX}key2"]
    finally:
        assert client.close(timeout_s=0) == 2  # nothing could be sent: both writes stay on disk
