"""Running a sweep, printed: the one path behind ``lora-sweep run`` and ``sweeps.run``.

`start_sweep` checks what can be checked before anything trains (the worker count, a registry name,
every target set against the model, the saved plan's memory warnings), runs or resumes the sweep with a
live status line (`sweeps.api.display`), prints the outcome (the best trial or the ladder's recommendation,
the test split's figures, the overhead), writes the report, and registers the adapter when asked. The
command line adds only its argument parsing (``--ray``) and its exit code; the Python API adds only the
call's process-state guard and the `Sweep` it returns. So a sweep run from a notebook and from a shell is
the same sweep: the same study, MLflow runs and report.

A KeyboardInterrupt (Ctrl-C, a notebook's stop button) during the trials ends the running trial as FAIL
(re-queued by the next run) and its MLflow run KILLED (`sweeps.engine.loop`); the result then says
``stopped == "interrupted"`` and no report is written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

from lora_core import LoraError
from sweeps.api.display import best_table, fmt_params, ladder_table, live_status, print_test, status_line
from sweeps.config.ref import DEFAULT_HOME
from sweeps.config.sweep import SweepConfig
from sweeps.secrets import STORAGE_ENV, has_credentials
from sweeps.text import first_line, mask_url

if TYPE_CHECKING:
    from sweeps.engine.progress import SweepProgress, SweepResult
    from sweeps.engine.ray_launch import RayOptions

__all__ = ["MAX_LOCAL_WORKERS", "MAX_RAY_WORKERS", "Epilogue", "check_workers", "run_config", "start_sweep",
           "sweep_locator"]

Epilogue = Callable[[SweepConfig, "SweepResult", Console], None]

_MIN_REFRESH_S = 0.25  # step updates faster than this are not redrawn
MAX_LOCAL_WORKERS = 256  # worker processes `run --workers N` starts on this machine
MAX_RAY_WORKERS = 4096


def check_workers(workers: int, ray: bool) -> None:
    """``--workers`` (``workers=``) within its limits, in the command line's words."""
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise LoraError(f"--workers must be a whole number, got {workers!r}")
    if workers < (1 if ray else 0):
        raise LoraError(f"--workers must be >= {1 if ray else 0}, got {workers}",
                        hint="0 (without --ray): this process only opens the sweep and follows it")
    limit = MAX_RAY_WORKERS if ray else MAX_LOCAL_WORKERS
    if workers > limit:
        raise LoraError(f"--workers must be <= {limit}" + (" on Ray" if ray else " on one machine")
                        + f", got {workers}", hint="each worker is a process with its own model copy"
                        + ("" if ray else "; for more, start lora-sweep worker on other machines"))


def start_sweep(config: SweepConfig, console: Console, *, workers: int = 1, ray: RayOptions | None = None,
                register: str | None = None, epilogue: Epilogue | None = None) -> SweepResult:
    """Check, run (or resume) and print the sweep as ``lora-sweep run`` does (see the module docstring).
    ``epilogue(config, result, console)`` prints what to do next (the command line: shell commands; the
    API: Python calls) after the outcome and the report's path, before a registration's lines.

    Raises:
        LoraError: a problem the user can fix, before any trial (or, with ``register``, at the end).
    """
    from sweeps.models.inspect import check_targets

    if register:
        from sweeps.export.registry import check_model_name

        check_model_name(register)  # before hours of training, not after
    check_targets(config)  # every target set adapts a layer of the model: before a study, run or data cache exists
    _plan_warnings(config, console)
    result = run_config(config, console, workers=workers, ray=ray)
    if epilogue is not None:
        epilogue(config, result, console)
    if register and result.stopped != "interrupted":
        from sweeps.export.registry import register_best

        if len(result.best) == 1 or result.recommended_trial is not None:
            register_best(config, register, echo=console.print)  # default: the ladder's recommendation
        else:
            raise LoraError(f"--register {register}: " + ("no trial completed" if not result.best else
                            f"a Pareto study has {len(result.best)} best trials"),
                            hint="register one with: lora-sweep export SWEEP --trial N --out DIR --register NAME")
    return result


def _plan_warnings(config: SweepConfig, console: Console) -> None:
    """The memory warnings of the plan ``lora-sweep plan`` saved for this sweep (if it did)."""
    from sweeps.engine.plan import fit_warnings, load_plan

    saved = load_plan(config, warn=lambda line: console.print(line, style="yellow", markup=False, highlight=False))
    for line in fit_warnings(saved) if saved else []:
        console.print(f"[yellow]{line}[/] (from lora-sweep plan)", highlight=False)


def run_config(config: SweepConfig, console: Console | None = None, *, workers: int = 1,
               owner: bool = True, ray: RayOptions | None = None) -> SweepResult:
    """Run the sweep with a live status line; print the outcome and (the owner, a sweep not interrupted,
    with a COMPLETE trial) write the report and print its path."""
    import optuna

    from sweeps.engine.loop import run_sweep

    console = console or Console()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    console.print(f"sweep [bold]{config.name}[/]: {config.model.name} on {config.data.name or config.data.files}, "
                  f"{config.search.strategy}, {config.search.budget()} trials"
                  + (f", timeout {config.search.timeout:g} s" if config.search.timeout else "")
                  + (", workers on Ray" if ray else f", {workers} workers" if workers > 1 else
                     ", no workers here" if workers == 0 else ""))
    last_draw = 0.0
    with live_status(console, Text("preparing data")) as redraw:
        def on_progress(p: SweepProgress) -> None:
            nonlocal last_draw
            if p.event and not p.event.endswith("started"):
                console.print(p.event)
            now = time.monotonic()
            if p.event or now - last_draw >= _MIN_REFRESH_S:
                redraw(status_line(p))
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
    _print_outcome(config, result, console, workers=workers, ray=ray is not None)
    if owner and result.stopped != "interrupted" and result.best:
        report_path = _build_report(config, console)
        if report_path is not None:
            console.print(f"report:  {report_path}  (open it in a browser; also on the MLflow parent run)",
                          highlight=False, soft_wrap=True)
    return result


def _print_outcome(config: SweepConfig, result: SweepResult, console: Console, *, workers: int, ray: bool) -> None:
    from sweeps.tracking.store import shown_uri

    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(result.states.items()))
    console.print(f"stopped: {result.stopped}; study trials: {counts or 'none'}")
    if result.ladder and result.ladder.get("recommendation"):
        console.print(ladder_table(result))
        if len(result.best) == 1:
            b = result.best[0]
            console.print(f"best trial: #{b.number} {result.objectives[0]} {b.values[0]:.4f} ({fmt_params(b.params)}, "
                          f"seed {b.seed_index}), the best seed of the best-quality configuration",
                          highlight=False)
    elif result.best:
        console.print(best_table(result))
    else:
        console.print("no trial completed yet")
    if result.recommendation_why:
        console.print(f"recommendation: {result.recommendation_why}", highlight=False, markup=False)
    print_test(result, console)
    if workers == 1 and not ray:
        console.print(f"this run: {result.trials_run} trials in {result.wall_s:.1f} s; sweep overhead "
                      f"{result.overhead_s:.1f} s ({result.overhead_fraction:.1%}) outside training and "
                      "evaluation" + (f" (and {result.test_s:.1f} s on the test split)" if result.test_s else ""))
    else:
        console.print(f"this run: {result.wall_s:.1f} s with " + ("workers on Ray" if ray else f"{workers} workers"
                                                               if workers else "workers started elsewhere"))
    console.print(f"Optuna study {result.study_name!r} in {mask_url(result.storage)}")
    console.print(f"MLflow experiment {result.experiment!r} in {shown_uri(config.tracking)}, "
                  f"parent run {result.parent_run_id}")


def _build_report(config: SweepConfig, console: Console) -> Path | None:
    """The sweep's HTML report; a failure is reported in one line (the sweep itself is done and kept)."""
    from dashboards.report import build_report

    try:  # a spinner in a terminal; in Jupyter a line updated in place (rich's spinner there needs ipywidgets)
        with live_status(console, Text("writing the report")) if console.is_jupyter else \
                console.status("writing the report"):
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
