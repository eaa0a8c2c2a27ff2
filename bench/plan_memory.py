"""``lora-sweep plan``'s peak-memory forecast against what real trials log, side by side on one machine.

The configurations the built-in ladder demo runs (by default r=1, 2, 4 on q,v, and r=1 on q,k,v,o and on
all-linear; ``--configs`` for others) become a grid sweep with everything else the demo's own (model, data,
60 steps of batch 32, one evaluation at the end; alpha 1, the learning rate the demo calibrates to, one
seed). In a fresh home, ``lora-sweep plan`` runs on it, then ``lora-sweep run``; for each configuration
the bench prints the plan's forecast, the ``peak_memory_bytes`` its trial logged to MLflow, and their ratio.
On a CPU both are the process's peak resident memory (`sweeps.training.runtime`: ``trial_peak_rss``).

``--time-demo-plan`` also times ``lora-sweep plan`` on the built-in demo itself (its 12 configurations),
and ``--baseline DIR`` the same command from another checkout (with its own ``.venv``) just before: the
plan's own run time before and after a change, under the same load.

    python bench/plan_memory.py --time-demo-plan --baseline ../main --out bench/results/plan-memory-cpu-2core.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, lora_sweep

REPO = Path(__file__).resolve().parents[1]
NAME = "plan-memory"
DEFAULT_CONFIGS = ["1:q,v", "2:q,v", "4:q,v", "1:q,k,v,o", "1:all-linear"]


def sweep_file(folder: Path, pairs: list[tuple[int, str]]) -> Path:
    """The demo with a grid of ``pairs`` in place of its ladder (one seed each, nothing pruned)."""
    from sweeps.config.sweep import DEMO

    doc: dict[str, Any] = copy.deepcopy(DEMO)
    doc["name"] = NAME
    doc["search"] = {"strategy": "grid", "configs": [{"r": r, "targets": t} for r, t in pairs], "alpha": 1.0,
                     "lr": [1.0e-2], "dropout": [0.0], "seeds": 1, "n_trials": len(pairs), "pruner": "none"}
    path = folder / f"{NAME}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def cli(repo: Path, args: list[str]) -> tuple[subprocess.CompletedProcess[str], float]:
    """``lora-sweep ARGS`` with ``repo``'s own interpreter: (the finished process, its wall seconds)."""
    python = repo / ".venv" / "bin" / "python"
    return lora_sweep(args, repo, str(python) if python.exists() else None)


def logged_peaks(home: Path) -> dict[tuple[int, str], list[float]]:
    """``peak_memory_bytes`` as each COMPLETE trial logged it to MLflow, per (rank, targets)."""
    from mlflow import MlflowClient

    journal = home / "optuna" / f"{NAME}.journal"
    study = optuna.load_study(study_name=NAME, storage=JournalStorage(JournalFileBackend(str(journal))))
    client = MlflowClient(tracking_uri=f"sqlite:///{home.resolve() / 'mlflow.db'}")
    out: dict[tuple[int, str], list[float]] = {}
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "COMPLETE" and "mlflow_run_id" in t.user_attrs:
            metrics = client.get_run(t.user_attrs["mlflow_run_id"]).data.metrics
            out.setdefault((int(t.params["r"]), str(t.params["targets"])), []).append(float(metrics["peak_memory_bytes"]))
    return out


def time_demo_plan(repo: Path, folder: Path) -> dict[str, Any]:
    """``lora-sweep plan`` on the built-in demo from ``repo``: its wall time and the time it reports itself."""
    home = folder / f"demo-plan-{len(list(folder.iterdir()))}"
    _, wall = cli(repo, ["plan", "--home", str(home)])
    plan = json.loads((home / "plans" / "ladder-demo.json").read_text())
    return {"repo": str(repo), "wall_s": round(wall, 1), "plan_own_s": round(plan["probe_s"], 1),
            "peaks_mib": {f"r={c['r']} {c['targets']}": round(c["peak_memory_bytes"] / 2**20) for c in plan["configs"]}}


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{platform.machine()} CPU ({model}), {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def main() -> int:
    from sweeps.config.sweep import DEMO

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="RANK:TARGETS pairs (default: the demo's)")
    ap.add_argument("--time-demo-plan", action="store_true", help="also time lora-sweep plan on the built-in demo")
    ap.add_argument("--baseline", type=Path, help="a checkout whose demo plan is timed first (before a change)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    pairs = [(int(c.split(":", 1)[0]), c.split(":", 1)[1]) for c in args.configs]
    load_before = os.getloadavg()
    timings = []
    with tempfile.TemporaryDirectory(prefix="bench-plan-memory-") as tmp:
        folder = Path(tmp)
        if args.baseline is not None:
            timings.append({"which": "baseline", **time_demo_plan(args.baseline.resolve(), folder)})
        if args.time_demo_plan or args.baseline is not None:
            timings.append({"which": "this checkout", **time_demo_plan(REPO, folder)})
        home = folder / "home"
        path = sweep_file(folder, pairs)
        _, plan_wall = cli(REPO, ["plan", str(path), "--home", str(home)])
        plan = json.loads((home / "plans" / f"{NAME}.json").read_text())
        _, run_wall = cli(REPO, ["run", str(path), "--home", str(home)])
        logged = logged_peaks(home)
    rows = []
    for c in plan["configs"]:
        seen = logged.get((int(c["r"]), str(c["targets"])))
        if not seen:
            continue
        peak = max(seen)
        rows.append({"config": f"r={c['r']} {c['targets']}", "memory_kind": c["memory_kind"],
                     "forecast_mib": round(c["peak_memory_bytes"] / 2**20), "logged_mib": round(peak / 2**20),
                     "ratio": round(c["peak_memory_bytes"] / peak, 3)})
    result = {"bench": "plan_memory", "machine": machine(), "python": platform.python_version(),
              "torch": torch.__version__, "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
              "steps_per_trial": DEMO["train"]["steps"], "configs": rows,
              "worst_ratio_off_by": max((abs(r["ratio"] - 1) for r in rows), default=None),
              "memory_growth_mib": round(plan.get("memory_growth_bytes", 0) / 2**20), "plan_notes": plan["notes"],
              "plan_wall_s": round(plan_wall, 1), "plan_own_s": round(plan["probe_s"], 1), "run_wall_s": round(run_wall, 1),
              "demo_plan_timings": timings}
    result["demo_plan_ratios"] = demo_plan_ratios(result)
    return emit(result, args.out)


def demo_plan_ratios(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each timed demo plan's forecast over what the grid's trials logged, for the configurations both have."""
    logged = {row["config"]: row["logged_mib"] for row in result["configs"]}
    return {t["which"]: {k: round(v / logged[k], 3) for k, v in t["peaks_mib"].items() if k in logged}
            for t in result["demo_plan_timings"]}


if __name__ == "__main__":
    raise SystemExit(main())
