"""The API's verbs: `run` a sweep, `load` one, `train` one trial.

Each takes what the command line takes (a YAML path, a sweep's name or a plain dict; ``overrides`` for
``--set``; ``home``/``storage`` for ``--home``/``--storage``), runs the same code (`sweeps.api.running`,
`sweeps.api.training`), raises the command line's one-line errors as one exception type
(``sweeps.SweepError``, which is ``lora_core.LoraError``: ``.message`` and ``.hint``), and leaves the
process as it found it (`sweeps.api.state.kept_process_state`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from sweeps.api.records import TrialResult, trial_result_of
from sweeps.api.resolve import ConfigLike, Overrides, is_stored_ref, sweep_config, trial_config
from sweeps.api.state import kept_process_state
from sweeps.api.sweep import Sweep

if TYPE_CHECKING:
    from rich.console import Console

    from sweeps.config.sweep import SweepConfig
    from sweeps.engine.progress import SweepResult

__all__ = ["load", "run", "train"]


def run(config: ConfigLike = None, *, home: str | os.PathLike[str] | None = None, storage: str | None = None,
        workers: int = 1, overrides: Overrides = None, register: str | None = None, quiet: bool = False,
        trust_stored_config: bool = False) -> Sweep:
    """Run a sweep, or resume it, and return it: ``lora-sweep run`` from Python.

    Args:
        config: a sweep YAML path, the name of a sweep already started (looked up under ``home`` or in
            ``storage``), a dict with the YAML's schema, or None for the built-in ladder demo.
        home: the sweeps' folder (``tracking.home``; default ``lora-sweeps`` under the working directory).
        storage: the Optuna storage URL (``search.storage``; default ``$LORA_SWEEP_STORAGE``, else a journal
            file under ``home``).
        workers: worker processes on this machine (0: none here, follow workers started elsewhere).
        overrides: ``--set`` values: ``["lora.r=16", ...]`` or ``{"search.n_trials": 8, ...}``.
        register: register the recommended (else best) adapter in the MLflow model registry under this name.
        quiet: print nothing (by default the live status line and the outcome, as the command prints them;
            in Jupyter the status line is an output updated in place).
        trust_stored_config: let a config read back from a named sweep's study turn on
            ``model.trust_remote_code`` or load a model that is not on this machine.

    Returns:
        The `Sweep`; ``sweep.stopped`` says why it stopped. A KeyboardInterrupt (Ctrl-C, the notebook's stop
        button) during the trials ends the running trial (re-queued, and its MLflow run KILLED) and returns
        with ``stopped == "interrupted"``; calling ``run`` again resumes.

    Raises:
        SweepError: a problem the user can fix (a bad config, a target that adapts nothing, a changed
            sweep, an unreadable storage), with the command line's message and hint.

    Example:
        >>> sweep = sweeps.run("examples/ladder-demo.yaml", overrides={"train.steps": 30})
        >>> sweep.recommendation
    """
    from sweeps.api.display import make_console
    from sweeps.api.interrupt import terminate_as_interrupt
    from sweeps.api.running import check_workers, start_sweep

    with kept_process_state():
        resolved = sweep_config(config, overrides, home=home, storage=storage,
                                trust_stored_config=trust_stored_config)
        check_workers(workers, False)
        console = make_console(quiet)
        with terminate_as_interrupt():  # SIGTERM/SIGHUP end the running trial as Ctrl-C does (main thread)
            result = start_sweep(resolved, console, workers=workers, register=register, epilogue=_epilogue)
    return Sweep(resolved, result=result)


def _epilogue(config: SweepConfig, result: SweepResult, console: Console) -> None:
    """What to do next, in Python (the command line prints the shell commands instead)."""
    if result.stopped == "interrupted":
        console.print("interrupted: the running trial ended and goes back in the queue; call sweeps.run again to "
                      "resume", highlight=False)
    elif result.best:
        console.print("next: sweep.trials, sweep.configurations, sweep.recommendation, sweep.figures(), "
                      "sweep.export(DIR)", highlight=False)


def load(name_or_path: ConfigLike, *, home: str | os.PathLike[str] | None = None, storage: str | None = None,
         overrides: Overrides = None, trust_stored_config: bool = False) -> Sweep:
    """A sweep already run or running, read-only: ``lora-sweep status`` from Python.

    Args:
        name_or_path: the sweep's name (its study holds its config) or its YAML path (or a dict).
        home, storage: where a sweep named by name is (as for `run`).
        overrides: ``--set`` values (e.g. ``{"tracking.uri": "http://host:5000"}``).
        trust_stored_config: as for `run`; without it ``export``, ``report`` and ``figures`` of a sweep
            named by name refuse a stored config that would run remote code or download a model.

    Returns:
        The `Sweep`. Nothing is created or written: a sweep that was never run is an error.

    Raises:
        SweepError: the sweep does not exist or its storage cannot be read.

    Example:
        >>> sweep = sweeps.load("ladder-demo", home="lora-sweeps")
        >>> sweep.trials.head()
    """
    from sweeps.engine.readonly import load_study_readonly

    with kept_process_state():
        resolved = sweep_config(name_or_path, overrides, home=home, storage=storage, trust_stored_config=True)
        load_study_readonly(resolved)  # it exists, now: an error here rather than at the first look
    return Sweep(resolved, stored=is_stored_ref(name_or_path) and not trust_stored_config)


def train(config: ConfigLike = None, overrides: Overrides = None, *, quiet: bool = False) -> TrialResult:
    """Train one tracked trial (an MLflow run): ``lora-sweep train`` from Python.

    Args:
        config: a trial YAML path, a dict with its schema, or None for the built-in default
            (``examples/default.yaml``).
        overrides: ``--set`` values: ``["lora.r=16"]`` or ``{"lora.r": 16, "lora.targets": "q,k,v,o"}``.
        quiet: print nothing (by default the progress and the summary table).

    Returns:
        The `TrialResult`: state, metrics, costs, the MLflow run id and the trained model.

    Raises:
        SweepError: a bad config or a target that adapts nothing (before the MLflow run exists).

    Example:
        >>> result = sweeps.train(overrides={"train.steps": 50})
        >>> result.final_metrics, result.run_id
    """
    from sweeps.api.display import make_console
    from sweeps.api.interrupt import terminate_as_interrupt
    from sweeps.api.training import train_trial

    with kept_process_state():
        resolved = trial_config(config, overrides)
        with terminate_as_interrupt():
            trial, run_id = train_trial(resolved, make_console(quiet))
    return trial_result_of(trial, run_id)
