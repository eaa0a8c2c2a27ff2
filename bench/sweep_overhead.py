"""A sweep's own overhead: wall time minus the time inside trial training and evaluation.

Runs of a sweep (default: the built-in demo, what ``lora-sweep run`` runs with no argument), each in
a fresh home so nothing resumes, in one invocation:

* ``cli``: the real command in a subprocess, timed from process start to exit, so the overhead
  includes Python start-up and imports, data loading, model loading, Optuna and MLflow (a fresh
  MLflow store: its tables are created on the first run);
* ``reloaded`` and ``cached``, in this process, side by side after a warm-up (a one-trial, two-step
  sweep, so neither pays the process's first imports): the driver loading the base model from disk
  for every trial (the state before the cache), and the driver as shipped (the base model loaded
  once per worker and deep-copied per trial). Both runs sample the same trials (same sampler seed)
  and must give identical metrics: the cache changes time, not results. ``--compare-sweep`` runs
  these two on another sweep file (a shorter one keeps the bench short).

Train and eval times are the trials' own ``train_s`` and ``eval_s`` (logged to MLflow). The data
and model caches on disk are warm (a first run on a fresh machine also converts the model and
collects the data set once; that is set-up, not sweep overhead). Prints JSON.

Usage: python bench/sweep_overhead.py [--out FILE.json] [--parts cli,reloaded,cached] [--sweep FILE]
       [--compare-sweep FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import optuna
import torch
from mlflow import MlflowClient

from bench.common import emit
from sweeps.config.sweep import load_sweep_config
from sweeps.engine.loop import run_sweep
from sweeps.models.cache import BaseModelCache
from sweeps.models.load import LoadedModel, load_model
from sweeps.tracking.store import tracking_uri

REPO = Path(__file__).resolve().parents[1]


class ReloadEveryTrial(BaseModelCache):
    """What the driver did before the cache: a fresh ``from_pretrained`` for every trial."""

    def get(self, name_or_path: str, task, num_labels=None, dtype="auto", device="auto",
            trust_remote_code=False) -> LoadedModel:
        return load_model(name_or_path, task, num_labels=num_labels, dtype=dtype, device=device,
                          trust_remote_code=trust_remote_code)


def trial_times(home: Path, sweep: str | None) -> dict:
    config = load_sweep_config(sweep, [f"tracking.home={home}"])
    client = MlflowClient(tracking_uri=tracking_uri(config.tracking))
    exp = client.get_experiment_by_name(config.experiment())
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=1000)
            if r.data.tags.get("lora_sweep.kind") == "trial"]
    by_number = {int(r.data.params["optuna.trial_number"]): r for r in runs}
    return {"trials": len(runs),
            "train_s": sum(r.data.metrics.get("train_s", 0.0) for r in runs),
            "eval_s": sum(r.data.metrics.get("eval_s", 0.0) for r in runs),
            "states": [by_number[n].data.tags.get("lora_sweep.state") for n in sorted(by_number)],
            "accuracy": [by_number[n].data.metrics.get("final_accuracy") for n in sorted(by_number)]}


def summarise(wall: float, times: dict) -> dict:
    overhead = wall - times["train_s"] - times["eval_s"]
    return {"wall_s": round(wall, 2), "train_s": round(times["train_s"], 2), "eval_s": round(times["eval_s"], 2),
            "overhead_s": round(overhead, 2), "overhead_fraction": round(overhead / wall, 4),
            "trials": times["trials"], "states": times["states"], "accuracy": times["accuracy"]}


def run_cli(home: Path, sweep: str | None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sweeps.cli", "run", *([sweep] if sweep else []),
                           "--home", str(home)], cwd=home.parent, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"lora-sweep run failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return summarise(wall, trial_times(home, sweep))


def run_in_process(home: Path, models: BaseModelCache, sweep: str | None, extra: list[str] | None = None) -> dict:
    config = load_sweep_config(sweep, [f"tracking.home={home}", *(extra or [])])
    t0 = time.perf_counter()
    result = run_sweep(config, models=models)
    wall = time.perf_counter() - t0
    out = summarise(wall, trial_times(home, sweep))
    out["driver_overhead_fraction"] = round(result.overhead_fraction, 4)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--parts", default="cli,reloaded,cached")
    ap.add_argument("--sweep", help="sweep YAML (default: the built-in demo)")
    ap.add_argument("--compare-sweep", help="sweep YAML for the reloaded/cached pair (default: --sweep)")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out: dict = {"hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
                 "sweep": args.sweep or "the built-in demo", "compare_sweep": args.compare_sweep or args.sweep
                 or "the built-in demo", "results": {}}
    pair_sweep = args.compare_sweep or args.sweep
    with tempfile.TemporaryDirectory() as tmp:
        if {"cached", "reloaded"} & set(parts):  # warm-up: imports, data and model caches, MLflow tables
            warm = Path(tmp) / "warm-up" / "lora-sweeps"
            warm.parent.mkdir(parents=True)
            run_in_process(warm, BaseModelCache(), pair_sweep, ["search.n_trials=1", "train.steps=2",
                                                                 "train.eval_every=2", "search.seeds=1"])
        for part in parts:
            home = Path(tmp) / part / "lora-sweeps"
            home.parent.mkdir(parents=True)
            if part == "cli":
                res = run_cli(home, args.sweep)
            elif part == "cached":
                res = run_in_process(home, BaseModelCache(), pair_sweep)
            elif part == "reloaded":
                res = run_in_process(home, ReloadEveryTrial(), pair_sweep)
            else:
                raise SystemExit(f"unknown part {part!r}")
            out["results"][part] = res
            print(f"# {part}: wall {res['wall_s']:.1f} s, overhead {res['overhead_s']:.1f} s "
                  f"({res['overhead_fraction']:.1%})", file=sys.stderr)
    res = out["results"]
    if "cached" in res and "reloaded" in res:
        out["cached_vs_reloaded"] = {
            "overhead_ratio": round(res["cached"]["overhead_s"] / res["reloaded"]["overhead_s"], 3),
            "wall_ratio": round(res["cached"]["wall_s"] / res["reloaded"]["wall_s"], 3),
            "same_trials_and_metrics": res["cached"]["states"] == res["reloaded"]["states"]
            and res["cached"]["accuracy"] == res["reloaded"]["accuracy"]}
    return emit(out, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
