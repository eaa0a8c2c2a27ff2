"""What an export starts from: the sweep's study, the trial to export, and that trial's MLflow run.

The trial is ``--trial N`` (it must be COMPLETE), else a finished ladder's recommended trial, else the
study's best trial (a Pareto study with more than one best trial needs ``--trial``). Its run is the
one named by the trial's user attr ``mlflow_run_id``, in the sweep's own store (a sqlite store must
exist already), and must have the trial's params and finite ``final_*`` metrics. Everything here only
reads; every failure is a ``LoraError``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from lora_core import LoraError
from sweeps.config.sweep import SweepConfig
from sweeps.names import RUN_ID_ATTR
from sweeps.text import first_line, mask_url

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from optuna.trial import FrozenTrial

    from sweeps.config.trial import TrialConfig

__all__ = ["check_run_matches", "load_study", "logged_metrics", "numbers", "open_client", "pick_trial",
           "trial_run"]


# --------------------------------------------------------------------------- the study and the trial

def load_study(config: SweepConfig) -> optuna.Study:
    """The sweep's study, read only, checked to be the sweep ``config`` describes."""
    from sweeps.engine.readonly import load_study_readonly

    return load_study_readonly(config, same_sweep=True)


def pick_trial(study: optuna.Study, config: SweepConfig, number: int | None) -> FrozenTrial:
    """Trial ``number`` (must be COMPLETE), or the default: a finished ladder's recommended trial (the
    best seed of its recommended configuration), else the best trial (single objective, or a one-trial
    Pareto front)."""
    from optuna.trial import TrialState

    from sweeps.engine.selection import best_trials, ladder_outcome
    from sweeps.engine.study import sweep_objectives

    trials = study.get_trials(deepcopy=False)
    complete = [t.number for t in trials if t.state == TrialState.COMPLETE]
    if number is None:
        recommended = ladder_outcome(study)[1]
        if recommended is not None:
            return study.trials[recommended]
        best = best_trials(study)
        if not best:
            states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(_state_counts(trials).items())) or "none"
            raise LoraError(f"sweep {config.name!r} has no COMPLETE trial to export (trials: {states})",
                            hint="run the sweep further (lora-sweep run), or wait for a trial to finish")
        if len(best) > 1:
            names = ", ".join(sweep_objectives(config))
            raise LoraError(f"sweep {config.name!r} optimises two objectives ({names}); its Pareto-optimal "
                            f"trials are {numbers([t.number for t in best])}",
                            hint="choose one with --trial N")
        return best[0]
    by_number = {t.number: t for t in trials}
    if number not in by_number:
        known = f"0..{max(by_number)}" if by_number else "none"
        raise LoraError(f"sweep {config.name!r} has no trial {number} (its trials: {known})",
                        hint=f"COMPLETE trials: {numbers(complete)}")
    frozen = by_number[number]
    if frozen.state != TrialState.COMPLETE:
        raise LoraError(f"trial {number} of sweep {config.name!r} is {frozen.state.name}; only COMPLETE "
                        "trials have an adapter to export",
                        hint=f"COMPLETE trials: {numbers(complete)}")
    return frozen


def _state_counts(trials: list[FrozenTrial]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def numbers(values: list[int]) -> str:
    """``0, 3, 4``, or ``none``."""
    return ", ".join(str(n) for n in values) if values else "none"


# --------------------------------------------------------------------------- MLflow

def open_client(config: SweepConfig, registry: bool = False) -> MlflowClient:
    """This sweep's store; with ``registry``, its model registry too (never MLflow's global registry URI)."""
    from sweeps.tracking.store import client_for, quiet_mlflow, tracking_uri

    _check_store_exists(config)
    if not registry:
        return client_for(config.tracking)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(config.tracking)
    try:
        with quiet_mlflow():
            return MlflowClient(tracking_uri=uri, registry_uri=uri)
    except MlflowException as exc:
        raise LoraError(f"cannot open the MLflow model registry at {mask_url(uri)}: {first_line(exc)}",
                        hint="check tracking.uri (sqlite:///abs/path.db, http://host:port, ...)") from None


def _check_store_exists(config: SweepConfig) -> None:
    """A sqlite store must exist already: MLflow would create an empty one (and then find no run)."""
    uri = config.tracking.uri
    if uri is None:
        path = Path(config.tracking.home).expanduser().resolve() / "mlflow.db"
    elif uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))  # sqlite:////abs/path or sqlite:///relative/path
        path = path if path.is_absolute() else Path.cwd() / path
    else:
        return
    if not path.is_file():
        raise LoraError(f"no MLflow store at {path}: the sweep's runs are not here",
                        hint="pass --home (or --set tracking.uri=...) where the sweep was run")


def trial_run(client: MlflowClient, config: SweepConfig, frozen: FrozenTrial) -> tuple[str, Run]:
    """The id and the MLflow run of trial ``frozen``."""
    from mlflow.exceptions import MlflowException

    from sweeps.tracking.spool import is_provisional, resolve_run_id
    from sweeps.tracking.store import quiet_mlflow

    run_id = frozen.user_attrs.get(RUN_ID_ATTR)
    if not run_id:
        raise LoraError(f"trial {frozen.number} of sweep {config.name!r} has no MLflow run "
                        f"(user attr {RUN_ID_ATTR})", hint="it was not run by lora-sweep run")
    try:
        with quiet_mlflow():
            if is_provisional(run_id):  # started while the tracking server was down: found by its run-key tag
                exp = client.get_experiment_by_name(config.experiment())
                run_id = resolve_run_id(client, run_id, [exp.experiment_id] if exp else []) or run_id
            run = client.get_run(run_id)
    except MlflowException as exc:
        raise LoraError(f"cannot read MLflow run {run_id} of trial {frozen.number} in "
                        f"{mask_url(client.tracking_uri)}: {first_line(exc)}",
                        hint="the run lives in the sweep's tracking store; point to it with --home or "
                             "--set tracking.uri=...") from None
    return str(run_id), run


def check_run_matches(run: Run, cfg: TrialConfig, number: int) -> None:
    """The run's params must be the trial's (catches a store that belongs to another sweep)."""
    from sweeps.tracking.trial_run import param_value

    expected = {"lora.r": cfg.lora.r, "lora.alpha": cfg.lora.alpha, "lora.targets": cfg.lora.targets,
                "lora.dropout": cfg.lora.dropout, "train.lr": cfg.train.lr, "seed": cfg.seed}
    for key, value in expected.items():
        got = run.data.params.get(key)
        if got != param_value(value):
            raise LoraError(f"MLflow run {run.info.run_id} does not match trial {number}: param {key} is "
                            f"{got!r}, the trial's {param_value(value)!r}",
                            hint="the tracking store holds another sweep's runs; check --home / tracking.uri")


def logged_metrics(run: Run, keys: list[str], number: int) -> dict[str, float]:
    """The run's ``final_<key>`` metrics, each of which must be there and finite."""
    out = {}
    for key in keys:
        value = run.data.metrics.get(f"final_{key}")
        if value is None or not math.isfinite(value):
            raise LoraError(f"MLflow run {run.info.run_id} of trial {number} has no finite final_{key} metric",
                            hint="only COMPLETE trials logged by lora-sweep can be exported")
        out[key] = float(value)
    return out
