"""``lora-sweep run``: run or resume a sweep with a one-line live status; at the end the best trial, and the
chosen configurations' validation figure beside their held-out test figure (`sweeps.engine.holdout`)."""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from lora_core import LoraError
from sweeps.cli.stored import resolve_args
from sweeps.config.ref import DEFAULT_HOME
from sweeps.config.sweep import SweepConfig
from sweeps.engine.loop import run_sweep
from sweeps.engine.progress import SweepProgress, SweepResult
from sweeps.engine.workers import THREADS_ENV, WORKER_ENV
from sweeps.models.inspect import check_targets
from sweeps.names import PARENT_ATTR
from sweeps.secrets import STORAGE_ENV, has_credentials
from sweeps.text import first_line, mask_url
from sweeps.tracking.store import shown_uri

if TYPE_CHECKING:
    from sweeps.engine.ray_launch import RayOptions

_MIN_REFRESH_S = 0.25  # step updates faster than this are not redrawn
_WAIT_POLL_S = 2.0     # worker --wait: how often the storage is asked whether the sweep is open
MAX_LOCAL_WORKERS = 256  # worker processes `run --workers N` starts on this machine
MAX_RAY_WORKERS = 4096
MAX_RAY_CPUS = 1024
MAX_WAIT_S = 7 * 24 * 3600.0


def _fmt(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _params(params: dict[str, object]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def status_line(p: SweepProgress) -> Text:
    done = p.complete + p.pruned
    text = Text()
    text.append(f"{done}/{p.budget} done" if not p.ladder else f"{done}/≤{p.budget} done", style="bold")
    text.append(f" · {p.complete} complete · {p.pruned} pruned · {p.failed} failed")
    if p.running is not None:
        text.append(f" · running #{p.running} step {p.step}/{p.steps} ({_params(p.running_params)} "
                    f"seed {p.running_seed})")
    if p.workers > 1 or (p.running_total and p.running is None):
        text.append(f" · {p.running_total} running")
    if p.best_value is not None:
        text.append(f" · best {p.objective} {p.best_value:.4f} (#{p.best_number})", style="green")
    text.append(f" · {_duration(p.elapsed_s)} elapsed")
    if p.eta_s is not None:
        text.append(f" · ~{_duration(p.eta_s)} left")
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


def ladder_table(result: SweepResult) -> Table:
    """The ladder's recommendation and best-quality configuration, as seed means."""
    record = result.ladder or {}
    margin = record.get("margin")
    table = Table(title=f"sweep {result.study_name}: the ladder's recommendation"
                        + (f" (margin {margin:g})" if isinstance(margin, (int, float)) else ""))
    table.add_column("")
    table.add_column("params")
    table.add_column(f"{result.objectives[0]} mean ± std", justify="right")
    table.add_column("seeds", justify="right")
    table.add_column("trainable params", justify="right")
    table.add_column("trials")
    for label, key in (("recommended", "recommendation"), ("best quality", "best_quality")):
        rec = record.get(key)
        if not rec:
            continue
        std = f" ± {rec['std']:.4f}" if rec.get("std") is not None else ""
        params = rec.get("trainable_params")
        table.add_row(label, _params(rec["params"]), f"{rec['mean']:.4f}{std}", str(rec.get("n", "")),
                      f"{params:,.0f}" if params is not None else "-", ",".join(map(str, rec.get("trials", []))))
    return table


def held_out_table(result: SweepResult) -> Table | None:
    """The chosen configurations' validation figure (what chose them) beside their test figure (held out)."""
    from sweeps.engine.holdout import ROLE_LABELS, figures_text

    record = result.test.record if result.test is not None else None
    if not record or not record.get("choices"):
        return None
    objective = record["objective"]
    table = Table(title=f"sweep {result.study_name}: the test split ({record['rows']} held-out rows, read once "
                        "after the last decision)")
    table.add_column("")
    table.add_column("params")
    table.add_column("trials")
    table.add_column(f"validation {objective} (chose it; biased up)", justify="right")
    table.add_column(f"test {objective} (unbiased)", justify="right")
    for role, choice in record["choices"].items():
        table.add_row(ROLE_LABELS.get(role, role), _params(choice["params"]), ",".join(map(str, choice["trials"])),
                      figures_text(choice["validation"]), figures_text(choice["test"]))
    return table


def _print_test(result: SweepResult, console: Console) -> None:
    test = result.test
    if test is None:
        return
    table = held_out_table(result)
    if table is not None:
        console.print(table)
        console.print("validation: the split every decision was taken on (mean ± std over seeds); test: the held-out "
                      "split, read only after the last decision and never used to decide", highlight=False)
    if test.note:
        console.print(f"test split: {test.note}", highlight=False)


def run(args: argparse.Namespace) -> int:
    """``lora-sweep run``: exit 0 when the sweep stopped by budget or timeout, 130 on Ctrl-C."""
    ray = None
    if args.ray is not None:
        from sweeps.engine.ray_launch import RayOptions, require_ray

        require_ray()
        if args.sweep is None and args.ray.endswith((".yaml", ".yml")):  # `run --ray SWEEP.yaml`: not an address
            args.sweep, args.ray = args.ray, ""
        ray = RayOptions(address=args.ray or None, workers=args.workers, cpus=args.ray_cpus)
        if args.ray_cpus < 1:
            raise LoraError(f"--ray-cpus must be >= 1, got {args.ray_cpus}")
    config = resolve_args(args)
    workers = 1 if args.workers is None else args.workers
    if workers < (1 if ray else 0):
        raise LoraError(f"--workers must be >= {1 if ray else 0}, got {args.workers}",
                        hint="0 (without --ray): this process only opens the sweep and follows it")
    limit = MAX_RAY_WORKERS if ray else MAX_LOCAL_WORKERS
    if workers > limit:
        raise LoraError(f"--workers must be <= {limit}" + (" on Ray" if ray else " on one machine")
                        + f", got {workers}", hint="each worker is a process with its own model copy"
                        + ("" if ray else "; for more, start lora-sweep worker on other machines"))
    if args.ray_cpus > MAX_RAY_CPUS:
        raise LoraError(f"--ray-cpus must be <= {MAX_RAY_CPUS}, got {args.ray_cpus}")
    if args.register:
        from sweeps.export.registry import check_model_name

        check_model_name(args.register)  # before hours of training, not after
    check_targets(config)  # every target set adapts a layer of the model: before a study, run or data cache exists
    console = Console()
    _plan_warnings(config, console)
    result = run_config(config, console, workers=workers, ray=ray)
    if args.register and result.stopped != "interrupted":
        from sweeps.export.registry import register_best

        if len(result.best) == 1 or result.recommended_trial is not None:
            register_best(config, args.register, echo=console.print)  # default: the ladder's recommendation
        else:
            raise LoraError(f"--register {args.register}: " + ("no trial completed" if not result.best else
                            f"a Pareto study has {len(result.best)} best trials"),
                            hint="register one with: lora-sweep export SWEEP --trial N --out DIR --register NAME")
    return 130 if result.stopped == "interrupted" else 0


def _plan_warnings(config: SweepConfig, console: Console) -> None:
    """The memory warnings of the plan ``lora-sweep plan`` saved for this sweep (if it did)."""
    from sweeps.engine.plan import fit_warnings, load_plan

    saved = load_plan(config, warn=lambda line: console.print(line, style="yellow", markup=False, highlight=False))
    for line in fit_warnings(saved) if saved else []:
        console.print(f"[yellow]{line}[/] (from lora-sweep plan)", highlight=False)


def worker(args: argparse.Namespace) -> int:
    """``lora-sweep worker SWEEP``: join the sweep and run trials until its budget is spent."""
    config = _opened_sweep(args)
    check_targets(config)
    threads = os.environ.get(THREADS_ENV)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    label = os.environ.get(WORKER_ENV)
    if label:  # started by `run --workers N`: plain event lines, the owner draws the status
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        pid = os.getpid()

        def on_event(p: SweepProgress) -> None:
            if p.event:
                print(f"[worker {label} pid {pid}] {p.event}", flush=True)

        result = run_sweep(config, progress=on_event, owner=False)
        return 130 if result.stopped == "interrupted" else 0
    result = run_config(config, owner=False)
    return 130 if result.stopped == "interrupted" else 0


def _opened_sweep(args: argparse.Namespace) -> SweepConfig:
    """The sweep ``worker`` names; with ``--wait``, once ``run`` has opened it (its study holds the config
    and the MLflow parent run's id, so a worker never opens a second parent run), polling until then."""
    if not 0 <= (args.wait or 0.0) <= MAX_WAIT_S:
        raise LoraError(f"--wait must be in 0 .. {MAX_WAIT_S:.0f} seconds, got {args.wait:g}",
                        hint="how long to wait for the sweep to be opened; 0: fail at once")
    deadline = time.monotonic() + max(0.0, args.wait or 0.0)
    while True:
        try:
            config = resolve_args(args)
            if not args.wait:
                return config
            from sweeps.engine.readonly import load_study_readonly

            if PARENT_ATTR in load_study_readonly(config).user_attrs:
                return config
            error = LoraError(f"sweep {config.name!r} has not been opened: its study has no MLflow parent run yet",
                              hint="open it with: lora-sweep run SWEEP.yaml --workers 0 --storage URL")
        except LoraError as exc:
            error = exc
        if time.monotonic() >= deadline:
            raise error
        time.sleep(_WAIT_POLL_S)


def run_config(config: SweepConfig, console: Console | None = None, *, workers: int = 1,
               owner: bool = True, ray: RayOptions | None = None) -> SweepResult:
    """Run the sweep with a live status line; print the outcome, the export and the UI commands."""
    console = console or Console()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    console.print(f"sweep [bold]{config.name}[/]: {config.model.name} on {config.data.name or config.data.files}, "
                  f"{config.search.strategy}, {config.search.budget()} trials"
                  + (f", timeout {config.search.timeout:g} s" if config.search.timeout else "")
                  + (", workers on Ray" if ray else f", {workers} workers" if workers > 1 else
                     ", no workers here" if workers == 0 else ""))
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

        def say(line: str) -> None:
            console.print(line, markup=False, highlight=False)

        if ray is not None:
            from sweeps.engine.ray_launch import run_ray_workers

            result = run_ray_workers(config, ray, progress=on_progress, say=say)
        elif workers != 1:
            from sweeps.engine.workers import run_workers

            result = run_workers(config, workers, progress=on_progress, say=say)
        else:
            result = run_sweep(config, progress=on_progress, owner=owner)
    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(result.states.items()))
    console.print(f"stopped: {result.stopped}; study trials: {counts or 'none'}")
    if result.ladder and result.ladder.get("recommendation"):
        console.print(ladder_table(result))
        if len(result.best) == 1:
            b = result.best[0]
            console.print(f"best trial: #{b.number} {result.objectives[0]} {b.values[0]:.4f} ({_params(b.params)}, "
                          f"seed {b.seed_index}), the best seed of the best-quality configuration",
                          highlight=False)
    elif result.best:
        console.print(best_table(result))
    else:
        console.print("no trial completed yet")
    if result.recommendation_why:
        console.print(f"recommendation: {result.recommendation_why}", highlight=False, markup=False)
    _print_test(result, console)
    if workers == 1 and ray is None:
        console.print(f"this run: {result.trials_run} trials in {result.wall_s:.1f} s; sweep overhead "
                      f"{result.overhead_s:.1f} s ({result.overhead_fraction:.1%}) outside training and "
                      "evaluation" + (f" (and {result.test_s:.1f} s on the test split)" if result.test_s else ""))
    else:
        console.print(f"this run: {result.wall_s:.1f} s with " + ("workers on Ray" if ray else f"{workers} workers" if workers else
                                                               "workers started elsewhere"))
    console.print(f"Optuna study {result.study_name!r} in {mask_url(result.storage)}")
    console.print(f"MLflow experiment {result.experiment!r} in {shown_uri(config.tracking)}, "
                  f"parent run {result.parent_run_id}")
    where = sweep_locator(config)
    if owner and result.stopped != "interrupted" and result.best:
        report_path = _build_report(config, console)
        if report_path is not None:
            console.print(f"report:  {report_path}  (open it in a browser; also on the MLflow parent run)",
                          highlight=False, soft_wrap=True)
    if result.recommended_trial is not None:
        console.print("export the recommended adapter:  "
                      + f"lora-sweep export {where} --out {config.name}-best   (trial {result.recommended_trial})",
                      highlight=False, soft_wrap=True)
    elif result.best:
        trial = "" if len(result.best) == 1 else f" --trial {result.best[0].number}"
        console.print("export the best adapter:  " + f"lora-sweep export {where}{trial} --out {config.name}-best",
                      highlight=False, soft_wrap=True)
    console.print(f"trial table:  lora-sweep status {where}", highlight=False, soft_wrap=True)
    from sweeps.cli.ui import sweep_runs_url

    url = sweep_runs_url(config)  # the runs table that lora-sweep ui opens on
    console.print(f"browse in MLflow:  lora-sweep ui {where}" + (f"   (runs: {url})" if url else ""),
                  highlight=False, soft_wrap=True)
    return result


def _build_report(config: SweepConfig, console: Console) -> Path | None:
    """The sweep's HTML report; a failure is reported in one line (the sweep itself is done and kept)."""
    from dashboards.report import build_report

    try:
        with console.status("writing the report"):
            return build_report(config)
    except Exception as exc:
        text = first_line(exc)
        console.print(f"[yellow]warning:[/] the report could not be written: {text}; the sweep is complete; "
                      f"retry with: lora-sweep report {sweep_locator(config)}", highlight=False)
        return None


def sweep_locator(config: SweepConfig) -> str:
    """How to name this sweep on the command line from the current directory (shell-quoted)."""
    import shlex

    parts = [config.name]
    home = Path(config.tracking.home).expanduser().resolve()
    if home != Path(DEFAULT_HOME).resolve():
        parts += ["--home", str(home)]
    storage = config.search.storage
    if storage and has_credentials(storage):  # never print a password: name the variable that hands it over
        return " ".join(shlex.quote(p) for p in parts) + f' --storage "${STORAGE_ENV}"'
    if storage:
        parts += ["--storage", storage]
    return " ".join(shlex.quote(p) for p in parts)
