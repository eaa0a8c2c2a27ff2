"""A tracking-server outage in the middle of a sweep, against the same sweep without one, in one run.

Starts a real ``mlflow server`` (sqlite backend, ``--artifacts-destination``: workers upload through it)
and runs one sweep on the built-in model and data twice, each from the command line in a fresh home:
``calm`` with the server up throughout, and ``outage`` with the server SIGKILLed once trial 1 has
started and restarted ``--outage`` seconds later (default 300: past MLflow's own HTTP retry budget).
MLflow's client settings are left at their defaults. Prints JSON: the outage, trials per state,
duplicates, each sweep's total trial time (the trials' ``train_s``) and wall time with their ratio,
metric points per metric of every trial run against the calm sweep's, the runs' final statuses, and
what was left in the spool.

Usage: python bench/outage.py [--outage 300] [--seeds 5] [--steps 40] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import optuna
import yaml
from mlflow import MlflowClient
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from services import MlflowServer

from bench.common import emit


def sweep_file(folder: Path, name: str, url: str, seeds: int, steps: int) -> Path:
    doc = {"name": name, "seed": 0,
           "model": {"name": "minilm-l6", "device": "cpu"},
           "data": {"name": "pydoc-topics", "max_length": 64},
           "lora": {"targets": ["q", "v"]},
           "train": {"steps": steps, "eval_every": steps // 2, "batch_size": 16, "lr": 0.01},
           "tracking": {"home": str(folder / name / "home"), "uri": url},
           "search": {"strategy": "grid", "rank": [1, 2, 4, 8], "alpha": "2r", "targets": ["q,v"], "lr": [0.01],
                      "dropout": [0.0], "seeds": seeds, "n_trials": 4 * seeds, "pruner": "none"}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def study_of(folder: Path, name: str) -> optuna.Study:
    journal = folder / name / "home" / "optuna" / f"{name}.journal"
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(JournalFileBackend(str(journal))))


def running(folder: Path, name: str, number: int) -> bool:
    try:
        return any(t.number == number and t.state == TrialState.RUNNING
                   for t in study_of(folder, name).get_trials(deepcopy=False))
    except (KeyError, FileNotFoundError, ValueError):
        return False


def summary(folder: Path, name: str, client: MlflowClient) -> dict:
    study = study_of(folder, name)
    states = Counter(t.state.name for t in study.trials)
    done = Counter((json.dumps(t.params, sort_keys=True), t.user_attrs.get("seed_index"))
                   for t in study.trials if t.state == TrialState.COMPLETE)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    trials = [r for r in runs if r.data.tags.get("lora_sweep.kind") == "trial"]
    points = Counter()
    for r in trials:
        for key in ("train_loss", "val_accuracy", "val_eval_loss"):
            points[key] += len(client.get_metric_history(r.info.run_id, key))
    spool = list((folder / name / "home" / "spool").glob("*.sqlite"))
    return {"trials": dict(states), "duplicates": sum(n - 1 for n in done.values()),
            "configurations_complete": len(done),
            "total_trial_s": sum(t.user_attrs["lora_sweep.cost"]["train_s"] for t in study.trials
                                 if t.state == TrialState.COMPLETE),
            "run_statuses": dict(Counter(r.info.status for r in runs)),
            "metric_points": dict(points), "spool_files_left": len(spool)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage", type=float, default=300.0)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "TRANSFORMERS_VERBOSITY": "error"}
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):  # MLflow's defaults
        env.pop(key, None)
    result: dict = {"machine": f"{platform.node()} {os.cpu_count()} cores", "outage_requested_s": args.outage}
    with tempfile.TemporaryDirectory(prefix="lora-sweep-outage-") as tmp:
        folder = Path(tmp)
        server = MlflowServer(folder / "server", f"sqlite:///{folder / 'server' / 'mlflow.db'}")
        server.start()
        try:
            client = MlflowClient(tracking_uri=server.url)
            for name in ("calm", "outage"):
                path = sweep_file(folder, name, server.url, args.seeds, args.steps)
                t0 = time.monotonic()
                proc = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "run", str(path)], cwd=folder, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                if name == "outage":
                    while not running(folder, name, 1) and proc.poll() is None:
                        time.sleep(0.2)
                    server.stop()
                    down = time.monotonic()
                    time.sleep(args.outage)
                    done_meanwhile = sum(t.state == TrialState.COMPLETE for t in study_of(folder, name).trials)
                    server.start()
                    result["outage_s"] = round(time.monotonic() - down, 1)
                    result["trials_completed_during_outage"] = done_meanwhile
                out = proc.communicate()[0].decode()
                wall = time.monotonic() - t0
                if proc.returncode != 0:
                    print(out[-4000:], file=sys.stderr)
                    return 1
                result[name] = {"wall_s": round(wall, 1), "exit_code": proc.returncode, **summary(folder, name, client),
                                "spool_lines": [ln for ln in out.splitlines() if "MLflow" in ln][:6]}
        finally:
            server.stop()
    calm, storm = result["calm"], result["outage"]
    result["total_trial_time_ratio"] = round(storm["total_trial_s"] / calm["total_trial_s"], 3)
    result["wall_ratio"] = round(storm["wall_s"] / calm["wall_s"], 3)
    result["metric_points_equal"] = storm["metric_points"] == calm["metric_points"]
    return emit(result, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
