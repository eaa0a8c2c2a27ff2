"""A sweep's study read into rows, one per trial (what ``lora-sweep status`` shows and ``--json`` prints).

Only reads the study (through Optuna's public API) and, when given, what the tracking store says
about the trials' runs; every value that does not apply is None.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sweeps.names import FAIL_ATTR, PACK_ATTR, RUN_ID_ATTR, RUNG_ATTR, SEED_INDEX, STAGE_ATTR, WORKER_ATTR

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from sweeps.tracking.sweep_runs import RunInfo, TrackingView

__all__ = ["JSON_KEYS", "TrialRow", "sweep_rows"]

# the keys of every object of ``status --json``, in this order
JSON_KEYS = ("number", "state", "best", "r", "alpha", "alpha_per_r", "targets", "lr", "dropout", "seed_index",
             "value", "values", "last_step", "last_intermediate_value", "datetime_start", "datetime_complete",
             "duration_s", "fail", "error", "mlflow_run_id", "worker", "stale", "stage", "rung", "pack")


@dataclass
class TrialRow:
    """One trial as ``status`` shows it; :meth:`as_json` gives the ``--json`` object."""

    number: int
    state: str
    best: bool = False
    r: int | None = None
    alpha: float | None = None
    alpha_per_r: float | None = None
    targets: str | None = None
    lr: float | None = None
    dropout: float | None = None
    seed_index: int | None = None
    value: float | None = None
    values: list[float] | None = None
    last_step: int | None = None
    last_intermediate_value: float | None = None
    datetime_start: str | None = None
    datetime_complete: str | None = None
    duration_s: float | None = None
    fail: str | None = None
    error: str | None = None
    mlflow_run_id: str | None = None
    worker: dict[str, Any] | None = None
    stale: bool = False
    stage: int | None = None        # a ladder's stage (0 lr calibration, 1 rank ladder, 2 wider target sets)
    rung: int | None = None
    pack: str | None = None         # packed trials: "<host>:<pid>:<n>", the same for trials that trained together

    def as_json(self) -> dict[str, Any]:
        return {key: _finite(getattr(self, key)) for key in JSON_KEYS}


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _params(t: FrozenTrial) -> dict[str, Any]:
    if t.params:
        return dict(t.params)
    return dict(t.system_attrs.get("fixed_params") or {})  # a WAITING trial: what was enqueued


def sweep_rows(study: optuna.Study, tracking: TrackingView | None = None, now: float | None = None) -> list[TrialRow]:
    """Every trial of the study, in number order."""
    from optuna.trial import TrialState

    from sweeps.engine.liveness import Worker, is_stale
    from sweeps.engine.selection import best_trials

    now_ts = time.time() if now is None else now
    me = Worker.current()
    best = {t.number for t in best_trials(study)}
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        p = _params(t)
        row = TrialRow(number=t.number, state=t.state.name, best=t.number in best)
        row.r = int(p["r"]) if "r" in p else None
        row.alpha = float(p["alpha"]) if "alpha" in p else None
        row.alpha_per_r = float(p["alpha_per_r"]) if "alpha_per_r" in p else None
        row.targets = str(p["targets"]) if "targets" in p else None
        row.lr = float(p["lr"]) if "lr" in p else None
        row.dropout = float(p["dropout"]) if "dropout" in p else None
        seed = t.user_attrs.get(SEED_INDEX)
        row.seed_index = int(seed) if seed is not None else None
        if STAGE_ATTR in t.user_attrs:
            row.stage, row.rung = int(t.user_attrs[STAGE_ATTR]), int(t.user_attrs[RUNG_ATTR])
        if t.state == TrialState.COMPLETE and t.values:
            row.values = [float(v) for v in t.values]
            row.value = row.values[0]
        if t.intermediate_values:
            row.last_step = max(t.intermediate_values)
            row.last_intermediate_value = float(t.intermediate_values[row.last_step])
        if t.datetime_start:
            row.datetime_start = t.datetime_start.isoformat()
            end = t.datetime_complete.timestamp() if t.datetime_complete else now_ts
            row.duration_s = max(0.0, end - t.datetime_start.timestamp())
        if t.datetime_complete:
            row.datetime_complete = t.datetime_complete.isoformat()
        row.fail = t.user_attrs.get(FAIL_ATTR)
        row.pack = t.user_attrs.get(PACK_ATTR)
        row.mlflow_run_id = t.user_attrs.get(RUN_ID_ATTR)
        run: RunInfo | None = None
        if tracking is not None:
            run = tracking.by_id.get(row.mlflow_run_id or "") or tracking.by_trial.get(t.number)
        if run is not None:
            row.mlflow_run_id = row.mlflow_run_id or run.run_id
            if t.state == TrialState.FAIL:
                row.error = run.error
        worker = t.user_attrs.get(WORKER_ATTR)
        if isinstance(worker, dict):
            row.worker = {"host": worker.get("host"), "pid": worker.get("pid")}
        if t.state == TrialState.RUNNING:
            row.stale = is_stale(t, me, now_ts)
        rows.append(row)
    return rows
