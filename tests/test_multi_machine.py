"""The topology of a sweep over several machines, on loopback: an ``mlflow server`` on PostgreSQL with
proxied artifacts (workers upload adapters through the server), the Optuna study on PostgreSQL (a
private cluster, the plain ``postgresql://`` URLs users type), and three workers that each run in their
own working directory, ``--home`` and data cache, sharing nothing local. ``status``, ``report`` and
``export`` then run from a fourth home that reads only the two servers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState
from services import MlflowServer, PrivatePostgres
from support import write_sweep

from sweeps.cli.main import main
from sweeps.names import RUN_ID_ATTR, SEED_INDEX

pytestmark = pytest.mark.usefixtures("isolated")

NAME = "spread"


def _env(machine: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
            "TRANSFORMERS_VERBOSITY": "error", "LORA_SWEEP_CACHE": str(machine / "cache")}


def _cli(machine: Path, *args: str) -> subprocess.Popen[bytes]:
    machine.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "sweeps.cli", *args], cwd=machine, env=_env(machine),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture
def servers(tmp_path: Path):
    pg = PrivatePostgres()
    server = None
    try:
        pg.create_database("optuna")
        pg.create_database("mlflow")
        server = MlflowServer(tmp_path / "server", pg.url("mlflow"))  # the plain URL: psycopg 3
        server.start()
        yield pg, server
    finally:
        if server is not None:
            server.stop()
        pg.close()


def test_three_workers_in_three_homes_and_a_fourth_home_that_reads_only_the_servers(
        tiny_model_dir: Path, tiny_data_file: Path, tmp_path: Path, servers, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    pg, server = servers
    storage = pg.url("optuna")
    machines = [tmp_path / f"machine{i}" for i in range(5)]  # the owner's, three workers', and a reader's
    machines[0].mkdir()
    path = write_sweep(machines[0], tiny_model_dir, tiny_data_file, machines[0] / "home", name=NAME,
                       rank=[1, 2, 4], seeds=2, n_trials=6, storage=storage, train={"steps": 20, "eval_every": 10})
    path.write_text(path.read_text().replace("  home:", f"  uri: {server.url}\n  home:"))

    # the owner opens and follows the sweep (it trains nothing); three workers, started at once, wait for it
    procs = [_cli(machines[0], "run", str(path), "--workers", "0", "--home", str(machines[0] / "home"))]
    procs += [_cli(m, "worker", NAME, "--wait", "300", "--storage", storage, "--home", str(m / "home"))
              for m in machines[1:4]]
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=900)[0].decode())
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, out in zip(procs, outs, strict=True):
        assert proc.returncode == 0, out[-3000:]

    study = optuna.load_study(study_name=NAME, storage=storage)
    states = Counter(t.state for t in study.trials)
    assert states[TrialState.COMPLETE] == 6 and set(states) <= {TrialState.COMPLETE, TrialState.FAIL}
    done = Counter((json.dumps(t.params, sort_keys=True), t.user_attrs[SEED_INDEX])
                   for t in study.trials if t.state == TrialState.COMPLETE)
    assert sorted(done.values()) == [1] * 6  # 3 configurations x 2 seeds, each exactly once: 0 duplicates
    pids = Counter(int(t.user_attrs["lora_sweep.worker"]["pid"]) for t in study.trials
                   if t.state == TrialState.COMPLETE)
    assert len(pids) >= 2, "the trials were shared between workers"

    client = MlflowClient(tracking_uri=server.url)
    exp = client.get_experiment_by_name(NAME)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    trial_runs = {r.info.run_id: r for r in runs if r.data.tags.get("lora_sweep.kind") == "trial"}
    for t in study.trials:
        if t.state != TrialState.COMPLETE:
            continue
        run = trial_runs[t.user_attrs[RUN_ID_ATTR]]
        assert run.info.status == "FINISHED"
        files = {f.path for f in client.list_artifacts(run.info.run_id, "adapter")}
        assert "adapter/adapter_model.safetensors" in files
    # each worker found the sweep by name and recorded on the parent run what it ran
    parent = next(r for r in runs if r.data.tags.get("lora_sweep.kind") == "sweep")
    assert parent.info.status == "FINISHED"
    for pid, n in pids.items():
        record = parent.data.tags[f"lora_sweep.worker.{os.uname().nodename}.{pid}"]
        assert record.startswith(f"{n} trials,"), record
    # the adapters went through the server into its artifact store, not into a worker's home
    stored = list(server.artifacts.rglob("adapter_model.safetensors"))
    assert len(stored) == 6
    for m in machines[:4]:
        assert not list(m.rglob("adapter_model.safetensors")), m
        assert not (m / "home" / "mlflow.db").exists()

    # the reader's commands run in this process (in its own working directory, home and cache): they
    # share nothing local with the machines above either, and save three interpreter start-ups
    fourth = machines[4]
    fourth.mkdir()
    monkeypatch.chdir(fourth)
    monkeypatch.setenv("LORA_SWEEP_CACHE", str(fourth / "cache"))
    common = ["--storage", storage, "--home", str(fourth / "home")]
    for args in (["status", NAME, *common], ["report", NAME, *common, "--out", str(fourth / "report.html")],
                 ["export", NAME, *common, "--out", str(fourth / "best")]):
        code = main(args)
        out = capsys.readouterr()
        assert code == 0, f"{args[0]}: {out.out[-2000:]}{out.err[-2000:]}"
    assert (fourth / "report.html").stat().st_size > 10_000
    assert (fourth / "best" / "adapter_model.safetensors").is_file()
    assert not (fourth / "home" / "mlflow.db").exists()  # it read the server, it made no store of its own
