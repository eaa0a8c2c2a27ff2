"""Tests of ``lora-sweep status`` and ``lora-sweep ui`` against one real tiny sweep.

The sweep (run once for the module) is a grid of three learning rates of the tiny BERT of
``test_train``: 1e30 makes the loss NaN within two steps (trial 0 FAIL), 3e-2 learns (trial 1 COMPLETE, the
best), 1e-9 leaves the model where it started and the median pruner stops it at its first evaluation
(trial 2 PRUNED). Nothing is mocked; nothing touches the network.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import optuna
import pytest
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from support import seeded_home, write_sweep
from transformers.utils import logging as hf_logging

from sweeps.cli.main import main
from sweeps.config.sweep import load_sweep_config
from sweeps.data import prepare as sweeps_data
from sweeps.engine.liveness import Worker
from sweeps.engine.loop import run_sweep
from sweeps.engine.space import suggest
from sweeps.engine.study import open_study
from sweeps.engine.trial_table import JSON_KEYS

pytestmark = pytest.mark.usefixtures("isolated")  # hub offline, a private data cache, quiet progress bars


REPO = Path(__file__).resolve().parents[1]
NAME = "tiny-status"


class Sweep:
    def __init__(self, home: Path, yaml_path: Path) -> None:
        self.home, self.yaml_path = home, yaml_path
        self.journal = home / "optuna" / f"{NAME}.journal"

    def study(self, home: Path | None = None) -> optuna.Study:
        path = (home / "optuna" / f"{NAME}.journal") if home else self.journal
        return optuna.load_study(study_name=NAME, storage=optuna.storages.JournalStorage(JournalFileBackend(str(path))))


@pytest.fixture(scope="module")
def sweep(tiny_model_dir: Path, tiny_data_file: Path, empty_store: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sweep]:
    folder = tmp_path_factory.mktemp("status")
    home = seeded_home(folder, empty_store)
    path = write_sweep(folder, tiny_model_dir, tiny_data_file, home, name=NAME, rank=[4],
                                   lr=[1e30, 3e-2, 1e-9], n_trials=2, pruner="median", prune_startup_trials=1)
    with pytest.MonkeyPatch.context() as mp:  # what the function-scoped _isolated does, for the module
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("TRANSFORMERS_VERBOSITY", "error")
        mp.setenv("LORA_SWEEP_CACHE", str(folder / "cache"))
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            result = run_sweep(load_sweep_config(path), include_plotlyjs="cdn")
        finally:
            if bars:
                hf_logging.enable_progress_bar()
            sweeps_data.clear_memory_cache()
    assert result.stopped == "budget"
    made = Sweep(home, path)
    states = [t.state for t in made.study().trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE, TrialState.PRUNED], states
    yield made


def table_rows(out: str) -> dict[int, list[str]]:
    """The trial table's rows by trial number: the cells of each line that starts with a number."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 3 and cells[2].isdigit():
            rows[int(cells[2])] = cells[1:-1]
    return rows


def tree_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- status


def test_status_table_shows_every_trial_and_changes_nothing(sweep: Sweep, capsys: pytest.CaptureFixture[str]) -> None:
    before = tree_files(sweep.home)  # the journal, mlflow.db and the artifacts: byte for byte
    assert main(["status", NAME, "--home", str(sweep.home)]) == 0
    out = capsys.readouterr().out
    assert tree_files(sweep.home) == before

    study = sweep.study()
    assert f"sweep {NAME}" in out and "strategy grid" in out and "accuracy (maximize)" in out
    assert "COMPLETE 1, PRUNED 1, FAIL 1, RUNNING 0, WAITING 0" in out
    assert f"best: trial {study.best_trial.number} ★" in out
    rows = table_rows(out)
    assert sorted(rows) == [0, 1, 2]
    for t in study.trials:
        star, number, state, r, alpha, targets, lr, dropout, seed, _value, _duration, _why, run = rows[t.number]
        assert (number, state, r, alpha, targets, dropout, seed) == (
            str(t.number), t.state.name, "4", "2r", "q,v", "0", "0")
        assert lr == f"{t.params['lr']:.3g}"
        assert run == t.user_attrs["mlflow_run_id"][:8]
        assert (star == "★") == (t.number == study.best_trial.number)
    assert rows[1][9] == f"{study.trials[1].value:.4g}"
    step = max(study.trials[2].intermediate_values)
    assert rows[2][9] == f"pruned {study.trials[2].intermediate_values[step]:.4g} @ step {step}"
    assert rows[0][11].startswith("error: loss became ")  # the attr, then the MLflow run's reason
    assert "note:" not in out


def test_status_json_matches_the_study(sweep: Sweep, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", NAME, "--home", str(sweep.home), "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)  # nothing but the JSON on stdout
    study = sweep.study()
    assert [d["number"] for d in data] == [t.number for t in study.trials]
    for d, t in zip(data, study.trials, strict=True):
        assert tuple(d) == JSON_KEYS
        assert d["state"] == t.state.name
        assert {k: d[k] for k in t.params} == t.params
        assert d["alpha"] is None and d["seed_index"] == t.user_attrs["seed_index"]
        assert d["mlflow_run_id"] == t.user_attrs["mlflow_run_id"]
        assert d["best"] == (t.number == study.best_trial.number)
        assert d["duration_s"] == pytest.approx(t.duration.total_seconds(), abs=1e-3)
        assert d["worker"]["pid"] == t.user_attrs["lora_sweep.worker"]["pid"] and d["stale"] is False
        if t.state == TrialState.COMPLETE:
            assert abs(d["value"] - t.value) <= 1e-12 and d["values"] == pytest.approx(t.values, abs=1e-12)
        else:
            assert d["value"] is None and d["values"] is None
        if t.intermediate_values:
            step = max(t.intermediate_values)
            assert d["last_step"] == step
            assert abs(d["last_intermediate_value"] - t.intermediate_values[step]) <= 1e-12
    fail, complete, pruned = data
    assert fail["fail"] == "error" and fail["error"].startswith("loss became ")
    assert complete["fail"] is None and complete["error"] is None and pruned["error"] is None


def test_status_by_yaml_path(sweep: Sweep, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", str(sweep.yaml_path)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert {n: r[2] for n, r in rows.items()} == {0: "FAIL", 1: "COMPLETE", 2: "PRUNED"}


def test_unknown_sweep_and_unrun_yaml_are_clear_errors(sweep: Sweep, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "no-such-sweep", "--home", str(sweep.home)]) == 2
    err = capsys.readouterr().err
    assert "no sweep named 'no-such-sweep'" in err and f"hint: sweeps there: {NAME}" in err
    other = write_sweep(tmp_path, tmp_path, tmp_path / "x.jsonl", tmp_path / "home", name="never-run")
    assert main(["status", str(other)]) == 2
    assert "sweep 'never-run' has not been run" in capsys.readouterr().err
    assert not (tmp_path / "home").exists()  # nothing created


def test_running_trial_of_a_dead_worker_is_flagged_stale(sweep: Sweep, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "copy"
    (home / "optuna").mkdir(parents=True)
    shutil.copyfile(sweep.journal, home / "optuna" / f"{NAME}.journal")  # no MLflow store in this copy
    dead = subprocess.Popen(["true"])
    dead.wait()
    study = sweep.study(home)
    orphan = study.ask()
    orphan.set_user_attr("lora_sweep.worker", {"host": socket.gethostname(), "pid": dead.pid, "started": "1"})
    alive = study.ask()
    alive.set_user_attr("lora_sweep.worker", Worker.current().as_attr())

    assert main(["status", NAME, "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert "RUNNING 2" in out and "note: no MLflow store at" in out  # degraded, not crashed
    rows = table_rows(out)
    assert rows[orphan.number][2] == f"running (pid {dead.pid} on {socket.gethostname()}) stale?"
    assert rows[alive.number][2] == f"running (pid {os.getpid()} on {socket.gethostname()})"
    assert main(["status", NAME, "--home", str(home), "--json"]) == 0
    data = {d["number"]: d for d in json.loads(capsys.readouterr().out)}
    assert data[orphan.number]["stale"] is True and data[alive.number]["stale"] is False


# --------------------------------------------------------------------------- ui


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=60) as resp:
        return resp.status, resp.read()


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def _sigint_as_in_a_terminal() -> None:
    """The command gets Ctrl-C as in a terminal: a test run started in the background by a script (CI) has
    SIGINT ignored, and a child would inherit that and never see the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the server's processes in /proc")
def test_ui_serves_the_sweeps_store_and_stops_on_ctrl_c(sweep: Sweep) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "ui", NAME, "--home", str(sweep.home),
                             "--port", "0"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_sigint_as_in_a_terminal)
    lines: queue.Queue[str] = queue.Queue()
    errors: list[str] = []  # drained as it comes, so a full pipe can never block the command
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    threading.Thread(target=lambda: [errors.append(line) for line in proc.stderr], daemon=True).start()
    servers: set[int] = set()
    try:
        url = None
        deadline = time.monotonic() + 600  # bounds a hang only: the loop ends when the URL shows
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            match = re.search(r"(http://127\.0\.0\.1:\d+)/#/experiments/(\d+)", line)
            if match:
                url, experiment_id = match.group(1), match.group(2)
        assert url is not None, f"no URL printed; exit {proc.poll()}: {''.join(errors)[-2000:]}"
        assert "Ctrl-C stops it" in lines.get(timeout=120)
        servers = _descendants(proc.pid)
        assert servers, "the MLflow server runs as a child process"

        assert _get(f"{url}/health")[0] == 200
        api = f"{url}/api/2.0/mlflow"
        exp = json.loads(_get(f"{api}/experiments/get-by-name?experiment_name={NAME}")[1])["experiment"]
        assert exp["experiment_id"] == experiment_id
        study = sweep.study()
        parent = json.loads(_get(f"{api}/runs/get?run_id={study.user_attrs['lora_sweep.parent_run_id']}")[1])
        assert parent["run"]["info"]["experiment_id"] == experiment_id  # this very store
        best_run = study.best_trial.user_attrs["mlflow_run_id"]
        status, body = _get(f"{url}/get-artifact?path=config.yaml&run_uuid={best_run}")  # artifacts are served
        assert status == 200 and b"lora:" in body
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=300)  # bounds a hang only: stopping takes seconds
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"lora-sweep ui did not stop on Ctrl-C; its stderr: {''.join(errors)[-2000:]}") from None
        for pid in servers:  # never leave a server behind, even when an assertion failed
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
    assert code == 0
    assert servers and all(_gone(pid) for pid in servers)
    with pytest.raises(OSError):
        _get(f"{url}/health")


def test_ui_port_taken_and_no_store_are_clear_errors(sweep: Sweep, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", NAME, "--home", str(sweep.home), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port 0" in err
    assert main(["ui", "--home", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no MLflow store in" in err and "hint:" in err
    assert not (tmp_path / "empty").exists()


def test_ui_with_a_tracking_server_only_prints_its_url(sweep: Sweep, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # nothing listens there: the experiment cannot be looked up, the URL is printed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["ui", "--set", f"tracking.uri=http://127.0.0.1:{port}"]) == 0
    assert f"http://127.0.0.1:{port}" in capsys.readouterr().out


def test_pareto_front_and_waiting_trials(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A two-objective study told by hand (no training): the front is starred, WAITING trials show their
    enqueued params."""
    home = tmp_path / "home"
    path = write_sweep(tmp_path, tmp_path / "model", tmp_path / "data.jsonl", home, name="pareto",
                                   strategy="random", rank=[2, 4, 8], lr=[1e-3], n_trials=4, pruner="none",
                                   second_objective="trainable_params")
    config = load_sweep_config(path)
    study = open_study(config)
    for value, size in ((0.5, 100.0), (0.7, 300.0), (0.4, 200.0)):  # the third is dominated by the first
        trial = study.ask()
        suggest(trial, config.search)
        trial.set_user_attr("seed_index", 0)
        study.tell(trial, [value, size])
    study.enqueue_trial({"r": 8, "alpha_per_r": 2.0, "targets": "q,v", "lr": 1e-3, "dropout": 0.0},
                        user_attrs={"seed_index": 1})

    assert main(["status", "pareto", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert "objective accuracy (maximize), trainable_params (minimize)" in out
    assert "Pareto front (2 trials):" in out and "COMPLETE 3, PRUNED 0, FAIL 0, RUNNING 0, WAITING 1" in out
    rows = table_rows(out)
    assert [n for n, r in rows.items() if r[0] == "★"] == [0, 1]
    assert rows[1][9:11] == ["0.7", "300"]
    assert rows[3][2:5] == ["WAITING", "8", "2r"] and rows[3][8] == "1"
    assert main(["status", "pareto", "--home", str(home), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["best"] for d in data] == [True, True, False, False]
    assert data[1]["values"] == [0.7, 300.0] and data[3]["state"] == "WAITING" and data[3]["r"] == 8
