"""``lora-sweep status SWEEP [--json]``: every trial of a sweep, as a table or as JSON.

``status`` only reads: the study is loaded, never created (a sweep that was never run is an error), the
tracking store is opened only if it exists, and nothing is written to either. The fail reasons of
MLflow runs (tags ``lora_sweep.error`` / ``lora_sweep.reason``) are shown when the tracking store can
be read; when it cannot, a one-line note says so and the rest of the table is still printed.

``status --json`` prints a JSON list with one object per trial, in trial-number order, and nothing
else on stdout. Every object has the keys of :data:`sweeps.engine.trial_table.JSON_KEYS`; a value that
does not apply is null.

The rows come from :mod:`sweeps.engine.trial_table`, the MLflow side from :mod:`sweeps.tracking.sweep_runs`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import time
from typing import TYPE_CHECKING

from sweeps.cli.stored import resolve_args
from sweeps.config.sweep import SweepConfig
from sweeps.engine.trial_table import TrialRow, sweep_rows
from sweeps.names import PARENT_ATTR
from sweeps.text import mask_url
from sweeps.tracking.sweep_runs import TrackingView, read_tracking

if TYPE_CHECKING:
    import optuna
    from rich.console import Console

__all__ = ["load_study", "print_status", "recommendation_line", "status"]

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
STAR = "★"


def load_study(config: SweepConfig) -> optuna.Study:
    """The sweep's study, read only (never created)."""
    from sweeps.engine.readonly import load_study_readonly

    return load_study_readonly(config)


# --------------------------------------------------------------------------- formatting

def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _alpha(row: TrialRow) -> str:
    if row.alpha_per_r is not None:
        return f"{row.alpha_per_r:g}r"
    return "-" if row.alpha is None else f"{row.alpha:g}"


def _state(row: TrialRow) -> str:
    if row.state != "RUNNING":
        return row.state
    if row.worker:
        text = f"running (pid {row.worker.get('pid')} on {row.worker.get('host')})"
    else:
        text = "running (no worker yet)"
    return text + (" stale?" if row.stale else "")


def _objective_value(name: str, value: float) -> str:
    return f"{value:,.0f}" if name == "trainable_params" and math.isfinite(value) else f"{value:.4g}"


def _value_cells(row: TrialRow, objectives: list[str]) -> list[str]:
    if row.values:
        return [_objective_value(o, v) for o, v in zip(objectives, row.values, strict=False)]
    if row.last_step is not None and row.state in ("PRUNED", "RUNNING"):
        what = "pruned" if row.state == "PRUNED" else "now"
        first = f"{what} {_num(row.last_intermediate_value, 4)} @ step {row.last_step}"
        return [first] + ["-"] * (len(objectives) - 1)
    return ["-"] * len(objectives)


def _why(row: TrialRow) -> str:
    parts = [p for p in (row.fail, row.error) if p]
    return ": ".join(parts) if parts else ""


def _elapsed(rows: list[TrialRow], now: float) -> float | None:
    starts = [dt.datetime.fromisoformat(r.datetime_start).timestamp() for r in rows if r.datetime_start]
    if not starts:
        return None
    if any(r.state == "RUNNING" for r in rows):
        end = now
    else:
        ends = [dt.datetime.fromisoformat(r.datetime_complete).timestamp() for r in rows if r.datetime_complete]
        end = max(ends) if ends else now
    return max(0.0, end - min(starts))


def _params_text(row: TrialRow) -> str:
    return (f"r={row.r} alpha={_alpha(row)} targets={row.targets} lr={_num(row.lr)} dropout={_num(row.dropout)} "
            f"seed_index={row.seed_index}")


def print_status(console: Console, config: SweepConfig, study: optuna.Study, rows: list[TrialRow],
                 tracking: TrackingView, now: float) -> None:
    from rich.table import Table

    from sweeps.engine.study import storage_label

    task = config.model.task
    objectives = [config.search.objective_name(task)]
    if config.search.second_objective:
        objectives.append(config.search.second_objective)
    directions = [d.name.lower() for d in study.directions]
    counts = {s: 0 for s in STATES}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    star = STAR if (console.encoding or "").lower().startswith("utf") else "*"
    data = config.data.name or config.data.files
    console.print(f"sweep [bold]{config.name}[/]: {config.model.name} on {data}")
    console.print(f"  strategy {config.search.strategy}, objective "
                  + ", ".join(f"{o} ({d})" for o, d in zip(objectives, directions, strict=False))
                  + f", budget {config.search.budget()} trials"
                  + (f" (n_trials {config.search.n_trials})" if config.search.n_trials != config.search.budget() else ""))
    console.print(f"  storage {storage_label(config)}")
    done = counts["COMPLETE"] + counts["PRUNED"]
    console.print(f"  {done}/{config.search.budget()} done: " + ", ".join(f"{s} {counts[s]}" for s in STATES)
                  + f"; elapsed {_duration(_elapsed(rows, now))}")
    best = [r for r in rows if r.best]
    if not best:
        console.print("  best: no trial completed yet")
    elif len(directions) == 1:
        b = best[0]
        console.print(f"  best: trial {b.number} {star}  {objectives[0]} {b.value:.6g}  ({_params_text(b)})",
                      style="green")
    else:
        console.print(f"  Pareto front ({len(best)} trials):", style="green")
        for b in best:
            values = ", ".join(f"{o} {v:,.0f}" if o == "trainable_params" else f"{o} {v:.6g}"
                               for o, v in zip(objectives, b.values or [], strict=False))
            console.print(f"    trial {b.number} {star}  {values}  ({_params_text(b)})", style="green")
    parent = study.user_attrs.get(PARENT_ATTR)
    console.print(f"  MLflow: experiment {tracking.experiment!r}"
                  + (f" (id {tracking.experiment_id})" if tracking.experiment_id else "")
                  + f" in {mask_url(tracking.uri)}" + (f", parent run {parent}" if parent else ""))
    if tracking.note:
        console.print(f"  note: {tracking.note}", style="yellow")

    table = Table(title=f"sweep {config.name}: {len(rows)} trials", title_justify="left")
    table.add_column("", no_wrap=True)  # the best marker
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True)
    ladder = any(row.stage is not None for row in rows)
    if ladder:
        table.add_column("stage:rung", justify="right", no_wrap=True)
    # Packed trials: the packs numbered in order of their first trial (p1, p2...); trials that trained together share one.
    packs = {p: n for n, p in enumerate(dict.fromkeys(row.pack for row in rows if row.pack), start=1)}
    if packs:
        table.add_column("pack", justify="right", no_wrap=True)
    for name in ("r", "alpha", "targets", "lr", "dropout", "seed"):
        table.add_column(name, justify="left" if name == "targets" else "right", no_wrap=True)
    for name in objectives:
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("duration", justify="right", no_wrap=True)
    table.add_column("fail reason", overflow="fold")
    table.add_column("MLflow run", no_wrap=True)
    styles = {"COMPLETE": "", "PRUNED": "dim", "FAIL": "red", "RUNNING": "cyan", "WAITING": "dim"}
    for row in rows:
        state = _state(row)
        stage = [] if not ladder else ["-" if row.stage is None else f"{row.stage}:{row.rung}"]
        pack = [] if not packs else ["-" if row.pack is None else f"p{packs[row.pack]}"]
        table.add_row(star if row.best else "", str(row.number), state, *stage, *pack,
                      "-" if row.r is None else str(row.r), _alpha(row), row.targets or "-", _num(row.lr),
                      _num(row.dropout), "-" if row.seed_index is None else str(row.seed_index),
                      *_value_cells(row, objectives), _duration(row.duration_s), _why(row),
                      (row.mlflow_run_id or "-")[:8],
                      style="yellow" if row.stale else ("bold green" if row.best else styles.get(row.state, "")))
    console.print(table)


# --------------------------------------------------------------------------- status

def status(args: argparse.Namespace) -> int:
    """``lora-sweep status SWEEP [--json]``: every trial of the sweep; exit 0."""
    config = resolve_args(args, loads_model=False)
    study = load_study(config)
    tracking = read_tracking(config)
    now = time.time()
    rows = sweep_rows(study, tracking, now)
    if getattr(args, "json", False):
        if tracking.note:
            print(f"note: {tracking.note}", file=sys.stderr)
        sys.stdout.write(json.dumps([r.as_json() for r in rows], indent=2, allow_nan=False) + "\n")
        sys.stdout.flush()
        return 0
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:  # a pipe or a file: do not squeeze the table into 80 columns
        console = Console(highlight=False, width=max(console.width, 200))
    print_status(console, config, study, rows, tracking, now)
    line = recommendation_line(config)
    if line:
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    return 0


def recommendation_line(config: SweepConfig) -> str | None:
    """``recommended: r=2 alpha=8 targets=q,v ... accuracy 0.8123 ± 0.0100 over 2 seeds (trials 4,5; its best
    seed: trial 4)``: the Python API's ``Sweep.recommendation`` (the report's and ``sweeps.load``'s), or
    None when there is none yet (or it cannot be read: the table above stands alone)."""
    from sweeps.api.display import fmt_params
    from sweeps.api.sweep import Sweep

    try:
        rec = Sweep(config).recommendation
    except Exception:
        return None
    if rec is None or rec.mean is None:
        return None
    std = f" ± {rec.std:.4f}" if rec.std is not None else ""
    seeds = f"{rec.n} seed{'s' if rec.n != 1 else ''}"
    best_seed = f"; its best seed: trial {rec.trial}" if rec.trial is not None else ""
    how = "the ladder's" if rec.source == "ladder" else "by the margin rule"
    return (f"  recommended ({how}): {fmt_params(rec.params)}  {rec.objective} {rec.mean:.4f}{std} over {seeds} "
            f"(trials {','.join(map(str, rec.trials))}{best_seed})")
