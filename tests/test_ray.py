"""``lora-sweep run SWEEP --ray``: the workers as Ray actors on a local Ray instance (started by the run
itself with ``--ray local``, in a temporary folder of its own, and stopped when the run ends).

One sweep of four tiny-BERT trials with two workers covers the whole path: every trial COMPLETE exactly
once, the workers' output relayed line by line with their prefix as it comes (the test reads it live and
kills a worker's process on its first "trial N started" line), and the killed worker restarted with its
trial failed and re-queued. Without ray installed ``--ray`` is a one-line error.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from optuna.trial import TrialState
from support import assert_user_error, load_study, mlflow_runs, planned, seeded_home, write_sweep

from sweeps.cli.main import main
from sweeps.names import WORKER_ATTR

pytestmark = pytest.mark.usefixtures("isolated")  # hub offline, a private data cache, quiet progress bars

REPO = Path(__file__).resolve().parents[1]


def _a_running_trial(home: Path, owner: subprocess.Popen[bytes]) -> tuple[int, int] | None:
    """(worker pid, trial number) of a trial the study shows RUNNING, as soon as there is one (None: the
    sweep ended first). Read from the study, not from the relayed "trial N started" lines: Ray relays a
    worker's output in batches, which on a busy machine came after the worker had run all its trials."""
    journal = home / "optuna" / "tiny-sweep.journal"
    while owner.poll() is None:
        with contextlib.suppress(KeyError):  # KeyError: the journal exists, the study not yet
            for t in (load_study(home).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                      if journal.is_file() else []):
                pid = (t.user_attrs.get(WORKER_ATTR) or {}).get("pid")
                if pid is not None:
                    return int(pid), t.number
        time.sleep(0.05)
    return None


def test_a_sweep_on_ray_runs_each_trial_once_and_restarts_a_killed_worker(
        tiny_model_dir: Path, tiny_data_file: Path, empty_store: Path, tmp_path: Path) -> None:
    home = seeded_home(tmp_path, empty_store)
    path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, home, rank=[1, 2], seeds=2, n_trials=4,
                       train={"steps": 200, "eval_every": 50})
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "TRANSFORMERS_VERBOSITY": "error",
           "LORA_SWEEP_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1", "COLUMNS": "200",
           "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    owner = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "run", str(path), "--ray", "local", "--workers", "2"],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    watchdog = threading.Timer(600, os.killpg, (owner.pid, signal.SIGKILL))  # bounds a hang only
    watchdog.start()
    lines: list[str] = []
    assert owner.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(raw.decode(errors="replace").rstrip()
                                                          for raw in owner.stdout), daemon=True)  # type: ignore[union-attr]
    reader.start()
    killed: tuple[int, int] | None = None  # (pid, trial)
    try:
        killed = _a_running_trial(home, owner)
        if killed is not None:
            os.kill(killed[0], signal.SIGKILL)
        owner.wait(timeout=600)  # bounds a hang only (the watchdog kills it first)
        reader.join(timeout=60)
    finally:
        watchdog.cancel()
        if owner.poll() is None:
            os.killpg(owner.pid, signal.SIGKILL)
            owner.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    out = "\n".join(lines)
    assert owner.returncode == 0, out[-3000:]
    assert killed is not None, f"the sweep ended before a trial was seen RUNNING: {out[-3000:]}"
    pid, number = killed
    found = re.search(rf"^\[worker (\d)/2\] started on \S+ as process {pid}, CPU$", out, re.M)
    assert found, out[-3000:]
    worker = int(found[1])
    assert "2 workers on Ray, 1 node(s): CPU, 1 CPU(s) and thread(s) each" in out
    assert "[worker 1/2 pid" in out and "[worker 2/2 pid" in out  # both workers' event lines, prefixed
    # the owner fails the dead worker's trial, unless the other worker's own recovery got to it first
    assert re.search(rf"^worker {worker} died \(exit code -9\); (failed its trial\(s\) \[\d+\], re-queued them"
                     r"|no trial of it is stale as seen from here .*), restarting it$", out, re.M), out[-3000:]
    assert len(re.findall(rf"^\[worker {worker}/2\] started on ", out, re.M)) == 2  # the replacement

    study = load_study(home)
    [dead] = [t for t in study.trials if t.state == TrialState.FAIL]
    assert dead.user_attrs[WORKER_ATTR]["pid"] == pid and dead.number >= number  # the killed worker's trial
    assert Counter(t.state for t in study.trials) == {TrialState.COMPLETE: 4, TrialState.FAIL: 1}
    assert sorted(planned(study).values()) == [1] * 4  # each (configuration, seed) COMPLETE exactly once
    parent, children = mlflow_runs(home)
    assert parent.info.status == "FINISHED"
    states = Counter(r.info.status for r in children)
    assert states["FINISHED"] == 4 and states["FAILED"] <= 1  # the killed trial's run, if it had begun
    assert sum(r.data.tags.get("lora_sweep.best") == "true" for r in children) == 1


def test_ray_not_installed_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    code = main(["run", "examples/demo-sweep.yaml", "--ray"])
    err = capsys.readouterr().err
    assert_user_error(code, err, "--ray needs the ray package, which is not installed")
    assert "pip install 'lora-sweep[ray]'" in err
