"""One tracked trial, printed: the path behind ``lora-sweep train`` and ``sweeps.train``.

`train_trial` checks the targets against the model, opens the MLflow run (a crash from then on leaves a
FAILED run carrying the error), trains with a progress display, logs the result and the adapter, and
prints the summary table. In a terminal (and a pipe) the progress is rich's bar, as before; in Jupyter a
line updated in place through IPython's display handle (`sweeps.api.display.live_status`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from sweeps.api.display import live_status
from sweeps.config.trial import TrialConfig
from sweeps.text import mask_url

if TYPE_CHECKING:
    from sweeps.training.trainer import Trial

__all__ = ["summary_table", "train_trial"]

ProgressHook = Callable[[int, int, "float | None"], None]


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def summary_table(trial: Trial, run_id: str) -> Table:
    r = trial.result
    cfg = trial.config
    what = f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha:g} on {','.join(cfg.lora.targets)}" if cfg.lora.enabled \
        else "head only (no LoRA)"
    table = Table(title=f"{cfg.name}: {cfg.model.name} on {cfg.data.name or cfg.data.files}, {what}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("state", r.state + (f" ({r.reason})" if r.reason else ""))
    for key, value in r.final_metrics.items():
        table.add_row(f"validation {key} (final)", f"{value:.4f}")
    table.add_row(f"best validation {r.objective}", f"{r.best_metrics.get(r.objective, float('nan')):.4f} at step {r.best_step}")
    if trial.data is not None and trial.data.majority_rate is not None:
        table.add_row("majority-class rate (validation)", f"{trial.data.majority_rate:.4f}")
    table.add_row("trainable parameters", f"{r.trainable_params:,} ({r.trainable_fraction:.3%} of the model)")
    table.add_row("adapter size", _human_bytes(r.adapter_bytes))
    table.add_row("steps", f"{r.steps_done} x batch {cfg.train.batch_size} x accum {cfg.train.grad_accum}")
    table.add_row("step time (median)", f"{r.step_time_s:.3f} s")
    table.add_row("throughput", f"{r.tokens_per_s:,.0f} tokens/s")
    table.add_row("peak memory", f"{_human_bytes(r.peak_memory_bytes)} ({r.memory_kind.replace('_', ' ')})")
    table.add_row("time: train / eval / total", f"{r.train_s:.1f} s / {r.eval_s:.1f} s / {r.wall_s:.1f} s")
    table.add_row("MLflow run", run_id)
    return table


@contextlib.contextmanager
def _progress(console: Console, steps: int) -> Iterator[ProgressHook]:
    """The trial's progress: rich's bar, or in Jupyter (or quiet) a line updated in place."""
    if console.is_jupyter or console.quiet:
        with live_status(console, Text("preparing data and model")) as redraw:
            def on_line(step: int, total: int, loss: float | None) -> None:
                redraw(Text(f"training {step}/{total} · loss {'-' if loss is None else f'{loss:.4f}'}"))

            yield on_line
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("preparing data and model", total=steps, loss="-")

        def on_bar(step: int, total: int, loss: float | None) -> None:
            progress.update(task, completed=step, description="training",
                            loss=f"{loss:.4f}" if loss is not None else "-")

        yield on_bar


def train_trial(config: TrialConfig, console: Console) -> tuple[Trial, str]:
    """Run the trial inside its MLflow run and print the summary. Returns (the trial, its MLflow run id).

    Raises:
        LoraError: a target set that adapts nothing (before the MLflow run exists), or a problem of the
            data or the model the trial met.
    """
    from sweeps.models.inspect import check_targets
    from sweeps.tracking.store import tracking_uri
    from sweeps.tracking.trial_run import TrialRun
    from sweeps.training.trainer import run_trial

    check_targets(config)  # a target that adapts nothing is refused before the MLflow run exists
    uri = mask_url(tracking_uri(config.tracking))  # printed below: never its password
    with TrialRun.start(config.tracking, config) as run:
        with _progress(console, config.train.steps) as on_progress:
            trial = run_trial(config, progress=on_progress)
        run.log_trial(trial)
    console.print(summary_table(trial, run.run_id))
    where = uri if not uri.startswith("sqlite:///") else f"{uri} (artifacts in {Path(config.tracking.home).resolve() / 'artifacts'})"
    console.print(f"tracked in {where}")
    console.print(f"open the MLflow UI: mlflow ui --backend-store-uri {uri}")
    return trial, run.run_id
