"""The built-in ladder demo, run for real, against what ``lora-sweep plan`` predicted, and with fixed
against adaptive seeds; all in one run, one after the other on the same machine.

1. ``lora-sweep plan`` (the built-in demo) in a fresh home, then ``lora-sweep run`` in the same home:
   for each configuration the probe's step time and peak memory against the median the demo's trials
   logged (``step_time_s``, ``peak_memory_bytes``), the predicted wall time against the demo's, and the
   plan's own time as a fraction of the demo's.
2. The demo again in another fresh home with ``search.ladder.max_seeds`` equal to ``seeds`` (2: every
   comparison decided at two seeds, as before adaptive seeds). For both runs: the trials spent per
   stage, the wall time, every ladder decision with the seeds it used, the chosen rank and the
   recommendation.

    python bench/demo_runs.py --out bench/results/demo-runs-cpu-2core.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, lora_sweep

REPO = Path(__file__).resolve().parents[1]
STAGE_ATTR, LADDER_ATTR = "lora_sweep.stage", "lora_sweep.ladder"


def cli(command: str, home: Path, sets: list[str]) -> tuple[subprocess.CompletedProcess[str], float]:
    """``lora-sweep COMMAND`` on the built-in demo in ``home``: (the finished process, its wall seconds)."""
    args = [command, "--home", str(home)]
    for s in sets:
        args += ["--set", s]
    return lora_sweep(args, REPO)


def load(home: Path) -> optuna.Study:
    journal = home / "optuna" / "ladder-demo.journal"
    return optuna.load_study(study_name="ladder-demo", storage=JournalStorage(JournalFileBackend(str(journal))))


def plan_vs_demo(home: Path, plan_wall: float, demo_wall: float) -> dict[str, Any]:
    """Each probed configuration against the medians the demo's trials logged for it."""
    from mlflow import MlflowClient

    plan = json.loads((home / "plans" / "ladder-demo.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{home.resolve() / 'mlflow.db'}")
    logged: dict[tuple[int, str], dict[str, list[float]]] = {}
    for t in load(home).get_trials(deepcopy=False):
        if t.state.name != "COMPLETE" or "mlflow_run_id" not in t.user_attrs:
            continue
        metrics = client.get_run(t.user_attrs["mlflow_run_id"]).data.metrics
        key = (int(t.params["r"]), str(t.params["targets"]))
        for name in ("step_time_s", "peak_memory_bytes"):
            if name in metrics:
                logged.setdefault(key, {}).setdefault(name, []).append(float(metrics[name]))
    table = []
    for c in plan["configs"]:
        seen = logged.get((int(c["r"]), str(c["targets"])))
        if not seen:
            continue  # a configuration the ladder did not reach
        step, peak = statistics.median(seen["step_time_s"]), statistics.median(seen["peak_memory_bytes"])
        table.append({"config": f"r={c['r']} {c['targets']}", "trials": len(seen["step_time_s"]),
                      "step_ms_plan": round(c["step_time_s"] * 1000, 1), "step_ms_demo": round(step * 1000, 1),
                      "step_ratio": round(c["step_time_s"] / step, 3),
                      "peak_mib_plan": round(c["peak_memory_bytes"] / 2**20), "peak_mib_demo": round(peak / 2**20),
                      "peak_ratio": round(c["peak_memory_bytes"] / peak, 3)})
    return {"configs": table, "plan_wall_s": round(plan_wall, 1), "plan_own_s": round(plan["probe_s"], 1),
            "demo_wall_s": round(demo_wall, 1), "plan_fraction_of_demo": round(plan_wall / demo_wall, 4),
            "predicted_wall_s": round(plan["predicted_wall_s"], 1), "predicted_trials": plan["max_trials"],
            "worst_step_ratio": max((abs(row["step_ratio"] - 1) for row in table), default=None),
            "worst_peak_ratio": max((abs(row["peak_ratio"] - 1) for row in table), default=None)}


def time_split(trials: list[Any], started: float, wall: float) -> dict[str, float]:
    """Where the demo's wall time went: before its first trial (start-up, data, model), in its trials
    (training as the trials logged it, the rest of each trial: evaluation, tracking, Optuna), between
    trials, and after its last (the test split's evaluation, the report)."""
    done = [t for t in trials if t.datetime_start and t.datetime_complete]
    if not done:
        return {}
    first = min(t.datetime_start.timestamp() for t in done) - started
    last = max(t.datetime_complete.timestamp() for t in done) - started
    in_trials = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done)
    train = sum(float((t.user_attrs.get("lora_sweep.cost") or {}).get("train_s", 0.0)) for t in done)
    return {"before_first_trial_s": round(first, 1), "in_trials_s": round(in_trials, 1),
            "of_which_train_s": round(train, 1), "between_trials_s": round(last - first - in_trials, 1),
            "after_last_trial_s": round(wall - last, 1)}


def run_demo(home: Path, sets: list[str]) -> dict[str, Any]:
    started = time.time()
    proc, wall = cli("run", home, sets)
    study = load(home)
    trials = study.get_trials(deepcopy=False)
    record = study.user_attrs.get(LADDER_ATTR) or {}
    per_stage = Counter(str(t.user_attrs.get(STAGE_ATTR)) for t in trials if t.state.name == "COMPLETE")
    decisions = [{"stage": d.get("stage"), "kind": d.get("kind"), "text": d.get("text"),
                  **{k: (d.get("evidence") or {}).get(k) for k in ("verdict", "seeds", "seeds_given")
                     if k in (d.get("evidence") or {})}}
                 for d in record.get("decisions") or []]
    return {"settings": sets or ["(the demo's own)"], "wall_s": round(wall, 1), "trials": len(trials),
            "states": dict(Counter(t.state.name for t in trials)), "complete_per_stage": dict(sorted(per_stage.items())),
            "chosen_rank": record.get("chosen_rank"), "recommendation": record.get("recommendation"),
            "best_quality": record.get("best_quality"), "decisions": decisions,
            "ladder_lines": [line for line in proc.stdout.splitlines() if "ladder:" in line],
            "time_split": time_split(trials, started, wall)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plan-only", action="store_true",
                    help="part 1 only: the plan against the adaptive demo (no fixed-seed demo)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        home = Path(tmp) / "adaptive"
        _, plan_wall = cli("plan", home, [])
        adaptive = run_demo(home, [])
        planned = plan_vs_demo(home, plan_wall, adaptive["wall_s"])
        fixed = None if args.plan_only else run_demo(Path(tmp) / "fixed", ["search.ladder.max_seeds=2"])
    result = {"bench": "demo_runs", "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
              "plan_vs_demo": planned, "adaptive_seeds": adaptive}
    if fixed is not None:
        result.update(fixed_seeds=fixed, trials_ratio=round(adaptive["trials"] / fixed["trials"], 3),
                      wall_ratio=round(adaptive["wall_s"] / fixed["wall_s"], 3))
    return emit(result, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
