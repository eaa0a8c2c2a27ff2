"""``lora-sweep run``: run or resume a sweep with a one-line live status and the best trial at the end."""

from __future__ import annotations

import argparse
import logging
import time

import optuna
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from sweeps.driver import SweepProgress, SweepResult, run_sweep
from sweeps.sweep_config import SweepConfig
from sweeps.sweep_ref import resolve_sweep
from sweeps.tracking import tracking_uri

_MIN_REFRESH_S = 0.25  # step updates faster than this are not redrawn


def _fmt(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _params(params: dict[str, object]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def status_line(p: SweepProgress) -> Text:
    done = p.complete + p.pruned
    text = Text()
    text.append(f"{done}/{p.budget} done", style="bold")
    text.append(f" · {p.complete} complete · {p.pruned} pruned · {p.failed} failed")
    if p.running is not None:
        text.append(f" · running #{p.running} step {p.step}/{p.steps} ({_params(p.running_params)} "
                    f"seed {p.running_seed})")
    if p.best_value is not None:
        text.append(f" · best {p.objective} {p.best_value:.4f} (#{p.best_number})", style="green")
    return text


def best_table(result: SweepResult) -> Table:
    table = Table(title=f"sweep {result.study_name}: best trial" + ("s (Pareto front)" if len(result.best) > 1 else ""))
    table.add_column("trial", justify="right")
    for name in result.objectives:
        table.add_column(name, justify="right")
    table.add_column("params")
    table.add_column("seed index", justify="right")
    table.add_column("MLflow run")
    for b in result.best:
        table.add_row(str(b.number), *[f"{v:.4g}" for v in b.values], _params(b.params), str(b.seed_index),
                      b.run_id or "-")
    return table


def run(args: argparse.Namespace) -> int:
    """``lora-sweep run``: exit 0 when the sweep stopped by budget or timeout, 130 on Ctrl-C."""
    config = resolve_sweep(args.sweep, args.set or [], home=args.home, storage=args.storage)
    result = run_config(config)
    return 130 if result.stopped == "interrupted" else 0


def worker(args: argparse.Namespace) -> int:
    """``lora-sweep worker SWEEP``: join the sweep and run trials until its budget is spent."""
    config = resolve_sweep(args.sweep, args.set or [], home=args.home, storage=args.storage)
    result = run_config(config)
    return 130 if result.stopped == "interrupted" else 0


def run_config(config: SweepConfig, console: Console | None = None) -> SweepResult:
    console = console or Console()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    console.print(f"sweep [bold]{config.name}[/]: {config.model.name} on {config.data.name or config.data.files}, "
                  f"{config.search.strategy}, {config.search.budget()} trials"
                  + (f", timeout {config.search.timeout:g} s" if config.search.timeout else ""))
    last_draw = 0.0
    with Live(Text("preparing data"), console=console, transient=True, auto_refresh=False) as live:
        def on_progress(p: SweepProgress) -> None:
            nonlocal last_draw
            if p.event and not p.event.endswith("started"):
                console.print(p.event)
            now = time.monotonic()
            if p.event or now - last_draw >= _MIN_REFRESH_S:
                live.update(status_line(p), refresh=True)
                last_draw = now

        result = run_sweep(config, progress=on_progress)
    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(result.states.items()))
    console.print(f"stopped: {result.stopped}; study trials: {counts or 'none'}")
    if result.best:
        console.print(best_table(result))
    else:
        console.print("no trial completed yet")
    console.print(f"this run: {result.trials_run} trials in {result.wall_s:.1f} s; sweep overhead "
                  f"{result.overhead_s:.1f} s ({result.overhead_fraction:.1%}) outside training and evaluation")
    console.print(f"Optuna study {result.study_name!r} in {result.storage}")
    uri = tracking_uri(config.tracking)
    console.print(f"MLflow experiment {result.experiment!r}, parent run {result.parent_run_id}: "
                  f"mlflow ui --backend-store-uri {uri}")
    return result
