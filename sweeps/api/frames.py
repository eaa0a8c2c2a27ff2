"""A sweep as pandas DataFrames: one row per trial (`trials_frame`), one row per configuration
(`configurations_frame`).

The trials come from the study (`sweeps.engine.trial_table`: state, params, seed, value, ladder stage,
pack, MLflow run id) joined with what each trial's MLflow run logged (`dashboards.collect`: the final and
best validation metrics and the costs) and the test-split figures the sweep's end stored. The
configurations are the report's (`dashboards.records.ConfigStats`: full-length COMPLETE trials grouped by
params; a ladder's shorter calibration trials left out), with their seeds' mean and standard deviation,
their mean costs and, where the sweep stored one, their test figure. A value that does not apply or was
not logged is missing (NaN / None), never made up.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import pandas as pd

from dashboards.records import effective_alpha, same_params

if TYPE_CHECKING:
    from dashboards.records import SweepData
    from sweeps.engine.trial_table import TrialRow

__all__ = ["CONFIG_COLUMNS", "COST_COLUMNS", "TRIAL_COLUMNS", "configurations_frame", "trials_frame"]

# the run's summary metrics that say what a trial cost (bytes, seconds, counts)
COST_COLUMNS = ("trainable_params", "lora_params", "adapter_bytes", "train_s", "eval_s", "wall_s",
                "step_time_s", "tokens_per_s", "peak_memory_bytes", "pack_size")
# the trials frame's leading columns, in this order; ``final_<metric>``, ``best_<metric>`` and ``test_<metric>``
# columns follow ``value``, then the costs, then the rest
TRIAL_COLUMNS = ("number", "state", "best", "stage", "rung", "steps", "r", "alpha", "targets", "lr", "dropout",
                 "seed_index", "seed", "value")
TRIAL_TAIL = ("duration_s", "datetime_start", "datetime_complete", "pack", "mlflow_run_id", "fail_reason")
CONFIG_COLUMNS = ("r", "alpha", "targets", "lr", "dropout", "mean", "std", "seeds", "values", "trials",
                  "trainable_params", "train_s", "peak_memory_bytes", "test_mean", "test_std", "test_seeds",
                  "recommended", "best_quality")


def _metric_columns(data: SweepData) -> list[str]:
    """``final_*`` then ``best_*`` validation metrics, in the order the objective's task logs them."""
    names: dict[str, None] = {}
    for t in data.trials:
        for key in t.metrics:
            if key.startswith(("final_", "best_")) and key != "best_step":
                names.setdefault(key, None)
    finals = sorted(k for k in names if k.startswith("final_"))
    return finals + sorted(k for k in names if k.startswith("best_"))


def _test_figures(data: SweepData) -> dict[int, dict[str, float]]:
    """Each trial's stored test-split metrics (study user attr ``lora_sweep.test``), by trial number."""
    out: dict[int, dict[str, float]] = {}
    for number, entry in ((data.test or {}).get("trials") or {}).items():
        test = entry.get("test") if isinstance(entry, dict) else None
        if isinstance(test, dict) and str(number).isdigit():
            out[int(number)] = {k: float(v) for k, v in test.items() if isinstance(v, (int, float))}
    return out


def trials_frame(data: SweepData, rows: list[TrialRow]) -> pd.DataFrame:
    """One row per trial of the study, in number order (see the module docstring); the objective's name is
    ``frame.attrs["objective"]`` and its direction ``frame.attrs["direction"]``."""
    records = {t.number: t for t in data.trials}
    metrics = _metric_columns(data)
    tests = _test_figures(data)
    test_names = sorted({k for figures in tests.values() for k in figures})
    base_steps = data.config.train.steps
    out: list[dict[str, Any]] = []
    for row in rows:
        record = records.get(row.number)
        logged = record.metrics if record is not None else {}
        params = record.params if record is not None and record.params else {}
        alpha = row.alpha if row.alpha is not None else (
            row.alpha_per_r * row.r if row.alpha_per_r is not None and row.r is not None else None)
        if alpha is None and params:
            alpha = effective_alpha(params)
        item: dict[str, Any] = {
            "number": row.number, "state": row.state, "best": row.best, "stage": row.stage, "rung": row.rung,
            "steps": record.steps if record is not None and record.steps is not None else base_steps,
            "r": row.r, "alpha": alpha, "targets": row.targets, "lr": row.lr, "dropout": row.dropout,
            "seed_index": row.seed_index,
            "seed": data.config.seed + row.seed_index if row.seed_index is not None else None,
            "value": row.value}
        if len(data.study.directions) > 1:
            item["values"] = row.values
        for name in metrics:
            item[name] = logged.get(name, math.nan)
        for name in test_names:
            item[f"test_{name}"] = tests.get(row.number, {}).get(name, math.nan)
        for name in COST_COLUMNS:
            item[name] = logged.get(name, math.nan)
        item.update(duration_s=row.duration_s, datetime_start=row.datetime_start,
                    datetime_complete=row.datetime_complete, pack=row.pack, mlflow_run_id=row.mlflow_run_id,
                    fail_reason=": ".join(p for p in (row.fail, row.error) if p) or None)
        out.append(item)
    columns = [*TRIAL_COLUMNS, *(["values"] if len(data.study.directions) > 1 else []), *metrics,
               *(f"test_{n}" for n in test_names), *COST_COLUMNS, *TRIAL_TAIL]
    frame = pd.DataFrame(out, columns=columns)
    for name in ("stage", "rung", "r", "seed_index", "seed", "steps"):
        frame[name] = frame[name].astype("Int64")
    for name in ("datetime_start", "datetime_complete"):
        frame[name] = pd.to_datetime(frame[name], format="ISO8601")
    frame.attrs.update(objective=data.objective, direction=data.direction, sweep=data.name)
    return frame


def configurations_frame(data: SweepData) -> pd.DataFrame:
    """One row per configuration (see the module docstring), best seed mean first; ``recommended`` and
    ``best_quality`` mark the sweep's two choices."""
    tests = _test_figures(data)
    out: list[dict[str, Any]] = []
    for c in data.configs:
        tested = [tests[t.number][data.objective] for t in c.trials
                  if t.number in tests and data.objective in tests[t.number]]
        mean = sum(tested) / len(tested) if tested else None
        std = (math.sqrt(sum((v - mean) ** 2 for v in tested) / (len(tested) - 1))
               if mean is not None and len(tested) >= 2 else None)
        numbers = {t.number for t in c.trials}

        def chosen(choice: Any, c_params: dict[str, Any] = c.params, c_numbers: set[int] = numbers) -> bool:
            if choice is None:
                return False
            return bool(c_numbers & set(choice.trials)) if choice.trials else same_params(c_params, choice.params)

        out.append({"r": c.r, "alpha": c.alpha, "targets": c.targets,
                    "lr": float(c.params["lr"]) if c.params.get("lr") is not None else None,
                    "dropout": float(c.params["dropout"]) if c.params.get("dropout") is not None else None,
                    "mean": c.mean, "std": c.std, "seeds": c.n, "values": list(c.values),
                    "trials": [t.number for t in c.trials],
                    "trainable_params": c.cost.get("trainable_params"), "train_s": c.cost.get("train_s"),
                    "peak_memory_bytes": c.cost.get("peak_memory_bytes"),
                    "test_mean": mean, "test_std": std, "test_seeds": len(tested) if tested else None,
                    "recommended": chosen(data.recommendation), "best_quality": chosen(data.best_quality)})
    frame = pd.DataFrame(out, columns=list(CONFIG_COLUMNS))
    if len(frame):
        frame = frame.sort_values("mean", ascending=not data.maximize, kind="stable").reset_index(drop=True)
    frame["seeds"] = frame["seeds"].astype("Int64")
    frame["test_seeds"] = frame["test_seeds"].astype("Int64")
    frame.attrs.update(objective=data.objective, direction=data.direction, sweep=data.name)
    return frame
