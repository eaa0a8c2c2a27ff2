"""``lora-sweep train``: one tracked trial with a progress bar and a summary table."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from sweeps.config.trial import TrialConfig, load_trial_config
from sweeps.models.inspect import check_targets
from sweeps.text import mask_url
from sweeps.tracking.store import tracking_uri
from sweeps.tracking.trial_run import TrialRun
from sweeps.training.trainer import Trial, run_trial


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


def train(config_path: str | None, overrides: list[str], console: Console | None = None) -> tuple[Trial, str]:
    """Validate the config, run the trial inside its MLflow run, print the summary. Returns (trial, run id)."""
    console = console or Console()
    config: TrialConfig = load_trial_config(config_path, overrides)
    check_targets(config)  # a target that adapts nothing is refused before the MLflow run exists
    uri = mask_url(tracking_uri(config.tracking))  # printed below: never its password
    with TrialRun.start(config.tracking, config) as run:
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("preparing data and model", total=config.train.steps, loss="-")

            def on_progress(step: int, total: int, loss: float | None) -> None:
                progress.update(task, completed=step, description="training",
                                loss=f"{loss:.4f}" if loss is not None else "-")

            trial = run_trial(config, progress=on_progress)
        run.log_trial(trial)
    console.print(summary_table(trial, run.run_id))
    where = uri if not uri.startswith("sqlite:///") else f"{uri} (artifacts in {Path(config.tracking.home).resolve() / 'artifacts'})"
    console.print(f"tracked in {where}")
    console.print(f"open the MLflow UI: mlflow ui --backend-store-uri {uri}")
    return trial, run.run_id
