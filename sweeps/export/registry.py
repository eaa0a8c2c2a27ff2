"""Registering a trial's adapter in the MLflow model registry (``export --register``, ``run --register``).

The model version's source is the run's artifact URI ``<run artifact_uri>/adapter`` with ``run_id``
set (the form MLflow's server accepts for a source inside the run's artifact root; a ``runs:/`` URI
would work too but is stored unresolved). Registering the same run again reuses its version. The
alias ``best`` points at the version when the trial is the sweep's best (or on its Pareto front, or a
ladder's recommended trial), else the alias ``trial-N`` is set. No model is loaded here:
``lora-sweep export`` is what re-checks an adapter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_core import LoraError
from sweeps.config.sweep import SweepConfig
from sweeps.export import Echo
from sweeps.export.source import load_study, open_client, pick_trial, trial_run
from sweeps.names import OBJECTIVE_TAG, SEED_INDEX, SEED_INDEX_TAG, SWEEP_TAG, TRIAL_NUMBER_TAG
from sweeps.text import first_line, fmt_value, mask_url

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from optuna.trial import FrozenTrial

__all__ = ["BEST_ALIAS", "Registered", "check_model_name", "echo_registered", "register", "register_best"]

BEST_ALIAS = "best"
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


@dataclass
class Registered:
    """A model version in the MLflow model registry (what ``register_best`` returns)."""

    name: str
    version: str
    alias: str
    source: str
    run_id: str
    trial: int
    created: bool             # False: the run was already registered under ``name``; that version is reused


def check_model_name(name: str) -> None:
    """Refuse a registered model name early (``lora-sweep run --register`` can check it before the sweep)."""
    if not _MODEL_NAME.fullmatch(name) or len(name) > 256:
        raise LoraError(f"registered model name {name!r} must be letters, digits, '_', '.' or '-'",
                        hint="e.g. --register minilm-pydoc-lora")


def register_best(config: SweepConfig, name: str, trial: int | None = None, echo: Echo | None = None) -> Registered:
    """Register the adapter of trial ``trial`` (default: the sweep's best) as a version of model ``name``.

    Creates the registered model if needed; reuses the version of the same run if there is one; sets
    alias ``best`` (or ``trial-N`` for a trial that is not the best; a ladder's recommended trial is
    its best). No model is loaded: the source
    is the run's logged adapter artifact (``lora-sweep export`` is the command that re-checks it).

    Raises:
        LoraError: a bad name, the trial cannot be exported (see :func:`pick_trial`), its run has no
            adapter artifact, or the registry refuses.
    """
    from sweeps.tracking.store import quiet_mlflow

    check_model_name(name)
    study = load_study(config)
    frozen = pick_trial(study, config, trial)
    client = open_client(config, registry=True)
    _, run = trial_run(client, config, frozen)
    with quiet_mlflow():
        registered = register(client, config, study, frozen, run, name)
    if echo is not None:
        echo_registered(registered, echo)
    return registered


def register(client: MlflowClient, config: SweepConfig, study: optuna.Study, frozen: FrozenTrial, run: Run,
             name: str) -> Registered:
    """Create (or reuse) the model version of ``run``'s adapter under ``name`` and set its alias."""
    from mlflow.exceptions import MlflowException

    from sweeps.engine.selection import best_trials, ladder_outcome
    from sweeps.tracking.artifacts import ADAPTER_DIR

    run_id = run.info.run_id
    try:
        if not client.list_artifacts(run_id, ADAPTER_DIR):
            raise LoraError(f"run {run_id} of trial {frozen.number} has no adapter artifact",
                            hint="only COMPLETE LoRA trials log an adapter; pick another trial")
        _ensure_registered_model(client, name, config)
        existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        source = f"{run.info.artifact_uri.rstrip('/')}/{ADAPTER_DIR}"
        if existing:
            version = min(existing, key=lambda v: int(v.version))
            created = False
        else:
            objective = config.search.objective_name(config.model.task)
            tags = {SWEEP_TAG: config.name, TRIAL_NUMBER_TAG: str(frozen.number),
                    SEED_INDEX_TAG: str(frozen.user_attrs.get(SEED_INDEX, 0)),
                    OBJECTIVE_TAG: objective, f"final_{objective}": repr(float(frozen.values[0]))}
            description = (f"LoRA adapter (PEFT format) of trial {frozen.number} of sweep {config.name}: "
                           f"{objective} {frozen.values[0]:.6g}; params "
                           + ", ".join(f"{k}={fmt_value(v)}" for k, v in frozen.params.items()))
            version = client.create_model_version(name, source, run_id=run_id, tags=tags, description=description)
            created = True
        best = frozen.number in {t.number for t in best_trials(study)} | {ladder_outcome(study)[1]}
        alias = BEST_ALIAS if best else f"trial-{frozen.number}"
        client.set_registered_model_alias(name, alias, str(version.version))
    except MlflowException as exc:
        raise LoraError(f"cannot register run {run_id} as model {name!r} in {mask_url(client.tracking_uri)}: "
                        f"{first_line(exc)}", hint="check the model name and that the store has a model registry "
                                                   "(sqlite, postgresql or an MLflow server)") from None
    return Registered(name, str(version.version), alias, str(version.source), run_id, frozen.number, created)


def _ensure_registered_model(client: MlflowClient, name: str, config: SweepConfig) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(name, tags={SWEEP_TAG: config.name},
                                       description=f"LoRA adapters exported by lora-sweep (sweep {config.name})")
    except MlflowException as exc:  # created meanwhile by another process
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def echo_registered(reg: Registered, echo: Echo) -> None:
    """One line: the model, its version and alias, and the version's source."""
    how = "registered as new" if reg.created else "already registered as"
    echo(f"{how} model {reg.name!r} version {reg.version}; alias {reg.alias!r} -> version {reg.version} "
         f"(models:/{reg.name}@{reg.alias}; source {reg.source})")
