"""``lora-sweep export``: a trial's adapter as a checked PEFT directory with a model card; model registration.

    $ lora-sweep export my-sweep.yaml --out best-adapter            # the best trial
    $ lora-sweep export my-sweep --home runs --trial 3 --out t3 --merged --register my-lora

What export does, in order (any failure raises ``LoraError`` before anything is written to ``--out``):

1. picks the trial: ``--trial N`` (it must be COMPLETE), else the study's best trial; a Pareto study
   with more than one best trial needs ``--trial``;
2. reads the trial's MLflow run (user attr ``mlflow_run_id``) and downloads its ``adapter/``
   artifact into a temporary folder (sqlite store or tracking server alike);
3. rebuilds the trial's config (``driver.trial_config``), loads the base model with the trial's LoRA
   layout injected as a reference, loads the downloaded adapter strictly with ``lora_core`` next to
   it and checks that both have the same adapted modules, saved modules (the classification head),
   shapes and scaling; then re-evaluates the validation split (prepared with the sweep's base seed,
   as the sweep did) and refuses unless the objective and ``eval_loss`` match the run's logged
   ``final_*`` metrics within ``TOLERANCE``;
4. builds the output in a hidden sibling folder (``.DIR.*.tmp``): the adapter files exactly as
   logged (``adapter_config.json``, ``adapter_model.safetensors``), the tokenizer, ``README.md`` (a
   Hugging Face style model card) and, with ``--merged``, ``merged/`` (the base model with the
   adapter folded in, ``save_pretrained`` safetensors + tokenizer, checked to give the same metric);
   ``--register`` then registers the run's adapter artifact in the MLflow model registry; finally the
   folder is renamed to ``DIR`` in one step.

Registration (:func:`register_best`, also used by ``lora-sweep run --register NAME``): the model
version's source is the run's artifact URI ``<run artifact_uri>/adapter`` with ``run_id`` set (the
form MLflow's server accepts for a source inside the run's artifact root; a ``runs:/`` URI would
work too but is stored unresolved). Registering the same run again reuses its version. The alias
``best`` points at the version when the trial is the sweep's best (or on its Pareto front), else the
alias ``trial-N`` is set.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_core import LoraError
from lora_core.io import current_umask
from sweeps.config.ref import resolve_sweep
from sweeps.config.sweep import SweepConfig

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from optuna.trial import FrozenTrial
    from torch import nn

    from sweeps.config.trial import TrialConfig
    from sweeps.data.prepare import PreparedData

__all__ = ["TOLERANCE", "ExportResult", "Registered", "check_model_name", "export", "export_trial", "load_study",
           "pick_trial", "register_best"]

TOLERANCE = 1e-4            # absolute: reproduced vs logged validation metric
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
CARD_FILE = "README.md"
MERGED_DIR = "merged"
BEST_ALIAS = "best"
_REF, _LOADED = "reference", "export"   # adapter names on the model while checking
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
# Built-in aliases whose converted directory is the hub model unchanged (for the card's base_model).
_HUB_IDS = {"minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}

Echo = Callable[[str], None]


# --------------------------------------------------------------------------- results

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


@dataclass
class ExportResult:
    out: Path
    trial: int
    run_id: str
    objective: str
    logged: dict[str, float]
    reproduced: dict[str, float]
    merged: Path | None = None
    merged_metrics: dict[str, float] = field(default_factory=dict)
    registered: Registered | None = None


# --------------------------------------------------------------------------- the command

def export(args: argparse.Namespace) -> int:
    """``lora-sweep export SWEEP --out DIR [--trial N] [--merged] [--register NAME]``: 0, or LoraError (exit 2)."""
    config = resolve_sweep(args.sweep, args.set or [], home=args.home, storage=args.storage)
    export_trial(config, args.out, trial=args.trial, merged=args.merged, register=args.register)
    return 0


def export_trial(config: SweepConfig, out: str | os.PathLike[str], *, trial: int | None = None,
                 merged: bool = False, register: str | None = None, echo: Echo = print) -> ExportResult:
    """Export trial ``trial`` (default: the best) of sweep ``config`` to directory ``out``; see the module docstring.

    Raises:
        LoraError: ``out`` is not empty, the sweep or trial cannot be exported (unknown, not
            COMPLETE, Pareto without a trial), its run or adapter is missing or does not load
            strictly, or the re-evaluated metric differs from the logged one. Nothing is written then.
    """
    from sweeps.engine import driver
    from sweeps.tracking.store import download_adapter, quiet_mlflow

    dest = _check_out(out)
    if register is not None:
        check_model_name(register)
    study = load_study(config)
    frozen = pick_trial(study, config, trial)
    objective = config.search.objective_name(config.model.task)
    seed_index = int(frozen.user_attrs.get(driver.SEED_INDEX, 0))
    cfg = driver.trial_config(config, frozen.params, seed_index)
    client = _client(config)
    run_id, run = _trial_run(client, config, frozen)
    _check_run_matches(run, cfg, frozen.number)
    compared = [objective] + (["eval_loss"] if objective != "eval_loss" else [])
    logged = _logged(run, compared, frozen.number)
    best = frozen.number in {t.number for t in driver.best_trials(study)}
    echo(f"sweep {config.name}: trial {frozen.number}{' (best)' if best else ''}, "
         f"{' '.join(f'{k}={_fmt(v)}' for k, v in frozen.params.items())}, seed {cfg.seed}; MLflow run {run_id}")

    staging, created = _staging_dir(dest)
    try:
        with tempfile.TemporaryDirectory(prefix="lora-sweep-export-") as tmp:
            adapter_dir = download_adapter(config.tracking, run_id, Path(tmp) / "adapter")
            data = driver.prepare_sweep_data(config)
            loaded, model = _load_checked(cfg, data, adapter_dir, run_id, frozen.number)
            generate = cfg.model.task == "causal-lm" and objective == "exact_match"
            reproduced = _evaluate(model, data, cfg, loaded.tokenizer, generate)
            _compare(reproduced, logged, frozen.number, "adapter", echo)
            counts = _counts(model)
            for name in ADAPTER_FILES:
                shutil.copyfile(adapter_dir / name, staging / name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded.tokenizer.save_pretrained(str(staging))
        result = ExportResult(dest, frozen.number, run_id, objective, logged, reproduced)
        if merged:
            result.merged = dest / MERGED_DIR
            result.merged_metrics = _write_merged(model, loaded, data, cfg, staging / MERGED_DIR, logged,
                                                  frozen.number, generate, echo)
        card = model_card(config, cfg, frozen, run, data, counts, result, best=best,
                          tracking=_mask(client.tracking_uri), storage=driver.storage_label(config))
        (staging / CARD_FILE).write_text(card, encoding="utf-8")
        if register is not None:
            with quiet_mlflow():
                result.registered = _register(_client(config, registry=True), config, study, frozen, run, register)
            _echo_registered(result.registered, echo)
        staging.chmod(0o777 & ~current_umask())
        try:
            staging.replace(dest)  # one rename; onto an empty directory too (POSIX), never onto a non-empty one
        except OSError as exc:
            raise LoraError(f"cannot move the export into {dest}: {exc.strerror or exc}",
                            hint="something was written there meanwhile; pass a new directory") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(created)
        raise
    echo(f"exported trial {frozen.number} to {dest}" + (f" (merged model in {result.merged})" if merged else ""))
    return result


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
    client = _client(config, registry=True)
    _, run = _trial_run(client, config, frozen)
    with quiet_mlflow():
        registered = _register(client, config, study, frozen, run, name)
    if echo is not None:
        _echo_registered(registered, echo)
    return registered


# --------------------------------------------------------------------------- the study and the trial

def load_study(config: SweepConfig) -> optuna.Study:
    """The sweep's study, read only, checked to be the sweep ``config`` describes."""
    from sweeps.engine.driver import load_study_readonly

    return load_study_readonly(config, same_sweep=True)


def pick_trial(study: optuna.Study, config: SweepConfig, number: int | None) -> FrozenTrial:
    """Trial ``number`` (must be COMPLETE), or the default: a finished ladder's recommended trial (the
    best seed of its recommended configuration), else the best trial (single objective, or a one-trial
    Pareto front)."""
    from optuna.trial import TrialState

    from sweeps.engine import driver

    trials = study.get_trials(deepcopy=False)
    complete = [t.number for t in trials if t.state == TrialState.COMPLETE]
    if number is None:
        recommended = driver.ladder_outcome(study)[1]
        if recommended is not None:
            return study.trials[recommended]
        best = driver.best_trials(study)
        if not best:
            states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(_state_counts(trials).items())) or "none"
            raise LoraError(f"sweep {config.name!r} has no COMPLETE trial to export (trials: {states})",
                            hint="run the sweep further (lora-sweep run), or wait for a trial to finish")
        if len(best) > 1:
            names = ", ".join(driver.sweep_objectives(config))
            raise LoraError(f"sweep {config.name!r} optimises two objectives ({names}); its Pareto-optimal "
                            f"trials are {_numbers([t.number for t in best])}",
                            hint="choose one with --trial N")
        return best[0]
    by_number = {t.number: t for t in trials}
    if number not in by_number:
        known = f"0..{max(by_number)}" if by_number else "none"
        raise LoraError(f"sweep {config.name!r} has no trial {number} (its trials: {known})",
                        hint=f"COMPLETE trials: {_numbers(complete)}")
    frozen = by_number[number]
    if frozen.state != TrialState.COMPLETE:
        raise LoraError(f"trial {number} of sweep {config.name!r} is {frozen.state.name}; only COMPLETE "
                        "trials have an adapter to export",
                        hint=f"COMPLETE trials: {_numbers(complete)}")
    return frozen


def _state_counts(trials: list[FrozenTrial]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def _numbers(numbers: list[int]) -> str:
    return ", ".join(str(n) for n in numbers) if numbers else "none"


# --------------------------------------------------------------------------- MLflow

def _client(config: SweepConfig, registry: bool = False) -> MlflowClient:
    """This sweep's store; with ``registry``, its model registry too (never MLflow's global registry URI)."""
    from sweeps.tracking.store import client_for, tracking_uri

    _check_store_exists(config)
    if not registry:
        return client_for(config.tracking)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from sweeps.tracking.store import quiet_mlflow

    uri = tracking_uri(config.tracking)
    try:
        with quiet_mlflow():
            return MlflowClient(tracking_uri=uri, registry_uri=uri)
    except MlflowException as exc:
        raise LoraError(f"cannot open the MLflow model registry at {_mask(uri)}: {_first_line(exc)}",
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


def _trial_run(client: MlflowClient, config: SweepConfig, frozen: FrozenTrial) -> tuple[str, Run]:
    from mlflow.exceptions import MlflowException

    from sweeps.engine import driver
    from sweeps.tracking.store import quiet_mlflow

    run_id = frozen.user_attrs.get(driver.RUN_ID_ATTR)
    if not run_id:
        raise LoraError(f"trial {frozen.number} of sweep {config.name!r} has no MLflow run "
                        f"(user attr {driver.RUN_ID_ATTR})", hint="it was not run by lora-sweep run")
    try:
        with quiet_mlflow():
            run = client.get_run(run_id)
    except MlflowException as exc:
        raise LoraError(f"cannot read MLflow run {run_id} of trial {frozen.number} in {_mask(client.tracking_uri)}: "
                        f"{_first_line(exc)}",
                        hint="the run lives in the sweep's tracking store; point to it with --home or "
                             "--set tracking.uri=...") from None
    return run_id, run


def _check_run_matches(run: Run, cfg: TrialConfig, number: int) -> None:
    """The run's params must be the trial's (catches a store that belongs to another sweep)."""
    from sweeps.tracking.store import param_value

    expected = {"lora.r": cfg.lora.r, "lora.alpha": cfg.lora.alpha, "lora.targets": cfg.lora.targets,
                "lora.dropout": cfg.lora.dropout, "train.lr": cfg.train.lr, "seed": cfg.seed}
    for key, value in expected.items():
        got = run.data.params.get(key)
        if got != param_value(value):
            raise LoraError(f"MLflow run {run.info.run_id} does not match trial {number}: param {key} is "
                            f"{got!r}, the trial's {param_value(value)!r}",
                            hint="the tracking store holds another sweep's runs; check --home / tracking.uri")


def _logged(run: Run, keys: list[str], number: int) -> dict[str, float]:
    out = {}
    for key in keys:
        value = run.data.metrics.get(f"final_{key}")
        if value is None or not math.isfinite(value):
            raise LoraError(f"MLflow run {run.info.run_id} of trial {number} has no finite final_{key} metric",
                            hint="only COMPLETE trials logged by lora-sweep can be exported")
        out[key] = float(value)
    return out


def _register(client: MlflowClient, config: SweepConfig, study: optuna.Study, frozen: FrozenTrial, run: Run,
              name: str) -> Registered:
    """Create (or reuse) the model version of ``run``'s adapter under ``name`` and set its alias."""
    from mlflow.exceptions import MlflowException

    from sweeps.engine import driver
    from sweeps.tracking.store import ADAPTER_DIR

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
            tags = {"lora_sweep.sweep": config.name, "optuna.trial_number": str(frozen.number),
                    "lora_sweep.seed_index": str(frozen.user_attrs.get(driver.SEED_INDEX, 0)),
                    "lora_sweep.objective": objective, f"final_{objective}": repr(float(frozen.values[0]))}
            description = (f"LoRA adapter (PEFT format) of trial {frozen.number} of sweep {config.name}: "
                           f"{objective} {frozen.values[0]:.6g}; params "
                           + ", ".join(f"{k}={_fmt(v)}" for k, v in frozen.params.items()))
            version = client.create_model_version(name, source, run_id=run_id, tags=tags, description=description)
            created = True
        best = frozen.number in {t.number for t in driver.best_trials(study)} | {driver.ladder_outcome(study)[1]}
        alias = BEST_ALIAS if best else f"trial-{frozen.number}"
        client.set_registered_model_alias(name, alias, str(version.version))
    except MlflowException as exc:
        raise LoraError(f"cannot register run {run_id} as model {name!r} in {_mask(client.tracking_uri)}: "
                        f"{_first_line(exc)}", hint="check the model name and that the store has a model registry "
                                                    "(sqlite, postgresql or an MLflow server)") from None
    return Registered(name, str(version.version), alias, version.source, run_id, frozen.number, created)


def _ensure_registered_model(client: MlflowClient, name: str, config: SweepConfig) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(name, tags={"lora_sweep.sweep": config.name},
                                       description=f"LoRA adapters exported by lora-sweep (sweep {config.name})")
    except MlflowException as exc:  # created meanwhile by another process
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _echo_registered(reg: Registered, echo: Echo) -> None:
    how = "registered as new" if reg.created else "already registered as"
    echo(f"{how} model {reg.name!r} version {reg.version}; alias {reg.alias!r} -> version {reg.version} "
         f"(models:/{reg.name}@{reg.alias}; source {reg.source})")


def check_model_name(name: str) -> None:
    """Refuse a registered model name early (``lora-sweep run --register`` can check it before the sweep)."""
    if not _MODEL_NAME.fullmatch(name) or len(name) > 256:
        raise LoraError(f"registered model name {name!r} must be letters, digits, '_', '.' or '-'",
                        hint="e.g. --register minilm-pydoc-lora")


# --------------------------------------------------------------------------- the model

def _load_checked(cfg: TrialConfig, data: PreparedData, adapter_dir: Path, run_id: str, number: int) -> tuple[Any, nn.Module]:
    """The base model with the downloaded adapter loaded strictly and checked against the trial's layout.

    The trial's LoRA config is injected (with the modules_to_save ``trainer.build_model`` picks) as a
    reference adapter; the downloaded one is loaded beside it with ``lora_core.load_adapter`` (strict
    about keys and shapes against its own config) and must adapt the same modules with the same
    shapes and scaling and save the same modules (the classification head). The reference is then
    deleted.
    """
    import lora_core
    from sweeps.models.heads import saved_modules
    from sweeps.models.load import load_model

    loaded = load_model(cfg.model.name, cfg.model.task, num_labels=data.num_labels, dtype=cfg.model.dtype,
                        device=cfg.model.device, trust_remote_code=cfg.model.trust_remote_code)
    model = loaded.model
    saved = saved_modules(model, cfg.model.task, cfg.lora.modules_to_save)  # as the trainer chooses them
    lora_core.inject(model, cfg.lora_config(modules_to_save=saved), name=_REF)
    lora_core.load_adapter(model, adapter_dir, name=_LOADED)
    ref, got = lora_core.adapter_info(model, _REF), lora_core.adapter_info(model, _LOADED)
    where = f"the adapter of run {run_id} does not match trial {number}'s config"
    for kind, want, have in (("LoRA on", ref.paths, got.paths), ("modules_to_save", ref.saved_paths, got.saved_paths)):
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        if missing or extra:
            detail = "; ".join(part for part in (f"missing {kind} {', '.join(missing)}" if missing else "",
                                                 f"unexpected {kind} {', '.join(extra)}" if extra else "") if part)
            raise LoraError(f"{where}: {detail}", hint="the artifact was changed or belongs to another trial")
    ref_w, got_w = lora_core.lora_weights(model, _REF), lora_core.lora_weights(model, _LOADED)
    for path, w in ref_w.items():
        g = got_w[path]
        if (g.lora_A.shape, g.lora_B.shape, g.roles) != (w.lora_A.shape, w.lora_B.shape, w.roles):
            raise LoraError(f"{where}: {path} has A {tuple(g.lora_A.shape)}, B {tuple(g.lora_B.shape)}; the trial's "
                            f"r={w.r} needs A {tuple(w.lora_A.shape)}, B {tuple(w.lora_B.shape)}",
                            hint="the artifact was changed or belongs to another trial")
        if not math.isclose(g.scaling, w.scaling, rel_tol=1e-6):
            raise LoraError(f"{where}: {path} scales by {g.scaling:g}, the trial's alpha/r gives {w.scaling:g}",
                            hint="the artifact's adapter_config.json was changed")
    lora_core.delete_adapter(model, _REF)
    lora_core.set_active_adapter(model, _LOADED)
    return loaded, model


def _evaluate(model: nn.Module, data: PreparedData, cfg: TrialConfig, tokenizer: Any, generate: bool) -> dict[str, float]:
    from sweeps.training.evaluate import evaluate

    return evaluate(model, data, "validation", cfg, tokenizer, generate=generate)


def _compare(reproduced: dict[str, float], logged: dict[str, float], number: int, what: str, echo: Echo,
             tolerance: float = TOLERANCE) -> None:
    worst = None
    for key, want in logged.items():
        got = reproduced.get(key, math.nan)
        diff = abs(got - want) if math.isfinite(got) else math.inf
        echo(f"validation {key} ({what}): reproduced {got:.6f}, logged {want:.6f} (|diff| {diff:.1e})")
        if diff > tolerance and worst is None:
            worst = (key, got, want, diff)
    if worst is not None:
        key, got, want, diff = worst
        raise LoraError(f"the {what} of trial {number} gives validation {key} {got:.6f}, its run logged {want:.6f} "
                        f"(|diff| {diff:.2g} > {tolerance:g}); refusing to export",
                        hint="the artifact was changed, or the base model, data, device or library versions differ "
                             "from the sweep's; nothing was written")


def _counts(model: nn.Module) -> dict[str, Any]:
    import lora_core
    from lora_core.analysis import parameter_count

    counts = parameter_count(model, _LOADED)
    info = lora_core.adapter_info(model, _LOADED)
    return {"trainable": counts.trainable, "lora": counts.lora, "saved": counts.saved_modules, "base": counts.base,
            "fraction": counts.fraction, "modules": list(info.paths), "saved_paths": list(info.saved_paths)}


def _write_merged(model: nn.Module, loaded: Any, data: PreparedData, cfg: TrialConfig, folder: Path,
                  logged: dict[str, float], number: int, generate: bool, echo: Echo) -> dict[str, float]:
    """Merge the adapter into the base weights, check the metric, and save_pretrained (safetensors) + tokenizer."""
    import torch

    import lora_core

    lora_core.merge_and_unload(model, _LOADED)
    if data.task == "classification" and data.label_names:
        model.config.id2label = dict(enumerate(data.label_names))
        model.config.label2id = {n: i for i, n in enumerate(data.label_names)}
    metrics = _evaluate(model, data, cfg, loaded.tokenizer, generate)
    exact = next(model.parameters()).dtype in (torch.float32, torch.float64)
    if exact:
        _compare(metrics, logged, number, "merged model", echo)
    else:  # merged into 16-bit weights: rounding moves the numbers a little; report, do not refuse
        for key, want in logged.items():
            echo(f"validation {key} (merged model, {str(loaded.dtype).removeprefix('torch.')} weights): "
                 f"{metrics.get(key, math.nan):.6f}, logged {want:.6f}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(folder), safe_serialization=True)
        loaded.tokenizer.save_pretrained(str(folder))
    return metrics


# --------------------------------------------------------------------------- the model card

def _base_model_id(name: str) -> str:
    return _HUB_IDS.get(name, name)


def _pipeline(task: str) -> str:
    return "text-classification" if task == "classification" else "text-generation"


def model_card(config: SweepConfig, cfg: TrialConfig, frozen: FrozenTrial, run: Run, data: PreparedData,
               counts: dict[str, Any], result: ExportResult, *, best: bool, tracking: str, storage: str) -> str:
    """``README.md`` for the exported directory: YAML front matter (Hugging Face model card style) + text."""
    import yaml

    from sweeps.models.load import builtin_aliases

    task = cfg.model.task
    base = _base_model_id(cfg.model.name)
    objective = result.objective
    lo = cfg.lora
    front = {"library_name": "peft", "base_model": base, "pipeline_tag": _pipeline(task),
             "tags": ["lora", "peft", "lora-sweep"],
             "model-index": [{"name": f"{config.name}-trial-{frozen.number}", "results": [{
                 "task": {"type": _pipeline(task)},
                 "dataset": {"name": _data_name(cfg), "type": _data_name(cfg), "split": "validation"},
                 "metrics": [{"type": k, "value": round(v, 6), "name": f"validation {k}"}
                             for k, v in result.reproduced.items() if k in result.logged]}]}]}
    auto = "AutoModelForSequenceClassification" if task == "classification" else "AutoModelForCausalLM"
    labels = f", num_labels={data.num_labels}" if task == "classification" else ""
    builtin = cfg.model.name in builtin_aliases()
    task_text = (f"classification, {data.num_labels} labels: {', '.join(data.label_names or [])}"
                 if task == "classification" else "causal language modelling (loss on the completion tokens)")
    sizes = data.sizes()
    why = f"the best trial by {objective}" if best else f"trial {frozen.number} (chosen with --trial)"
    metric_rows = "\n".join(
        f"| {k} | {result.reproduced[k]:.6f} | {result.logged[k]:.6f} | {abs(result.reproduced[k] - result.logged[k]):.1e} |"
        for k in result.logged)
    others = ", ".join(f"{k} {v:.6f}" for k, v in result.reproduced.items() if k not in result.logged)
    merged_line = ""
    if result.merged is not None:
        shown = ", ".join(f"{k} {result.merged_metrics[k]:.6f}" for k in result.logged if k in result.merged_metrics)
        merged_line = (f"\nThe merged model in `{MERGED_DIR}/` (adapter folded into the base weights; plain "
                       f"`{auto}.from_pretrained`) gives {shown}.\n")
    base_note = ""
    if builtin:
        base_note = (f"\nThe base is lora-sweep's built-in `{cfg.model.name}`; `sweeps.models.load_model("
                     f"\"{cfg.model.name}\", ...)` loads exactly the weights the adapter was trained on.")
        if cfg.model.name not in _HUB_IDS:
            base_note += " Its weights are converted (see `lora-sweep` docs), so load it that way, not from the hub."
    peft_base = base if not builtin or cfg.model.name in _HUB_IDS else cfg.model.name
    versions = {k.removeprefix("version."): v for k, v in sorted(run.data.params.items()) if k.startswith("version.")}
    text = f"""---
{yaml.safe_dump(front, sort_keys=False).rstrip()}
---

# {config.name}, trial {frozen.number}: LoRA adapter for {base}

A LoRA adapter found by lora-sweep: {why} of the sweep `{config.name}`, checked at export: it
loads strictly and reproduces the validation metric its MLflow run logged.

## Model and data

| | |
|---|---|
| base model | `{cfg.model.name}`{f" ({base})" if base != cfg.model.name else ""} |
| task | {task_text} |
| data | {data.source} |
| examples | train {sizes['train']}, validation {sizes['validation']}, test {sizes['test']} (max_length {cfg.data.max_length}, split seed {config.seed}) |
{base_note}

## LoRA

| | |
|---|---|
| r | {lo.r} |
| alpha | {lo.alpha:g} (scaling {('alpha/sqrt(r)' if lo.rslora else 'alpha/r')} = {(lo.alpha / math.sqrt(lo.r) if lo.rslora else lo.alpha / lo.r):g}) |
| targets | {', '.join(lo.targets)} ({len(counts['modules'])} modules) |
| dropout | {lo.dropout:g} |
| modules_to_save | {', '.join(counts['saved_paths']) or 'none'} |
| trainable parameters | {counts['trainable']:,} ({f"{counts['lora']:,} LoRA + {counts['saved']:,} in saved modules; " if counts['saved'] else ""}{counts['fraction']:.3%} of the base's {counts['base']:,}) |
| training | {cfg.train.steps} steps, batch {cfg.train.batch_size} x {cfg.train.grad_accum}, lr {cfg.train.lr:g} ({cfg.train.schedule}), seed {cfg.seed} |

## Metrics (validation split)

| metric | reproduced at export | logged by the trial | abs. difference |
|---|---|---|---|
{metric_rows}
{f"{chr(10)}Also at export: {others}.{chr(10)}" if others else ""}{merged_line}
## Provenance

| | |
|---|---|
| sweep | `{config.name}` ({config.search.strategy}, objective {objective}, {config.search.objective_direction(task)}) |
| study storage | `{storage}` |
| trial | {frozen.number} (seed index {frozen.user_attrs.get('seed_index', 0)}, seed {cfg.seed}) |
| params | {', '.join(f'{k}={_fmt(v)}' for k, v in frozen.params.items())} |
| MLflow run | `{run.info.run_id}` in `{tracking}` (experiment `{config.experiment()}`) |
| exported | {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} with lora-sweep {_version('lora-sweep')} |
| trained with | {', '.join(f'{k} {v}' for k, v in versions.items())} |

## Use with PEFT

```python
from transformers import {auto}, AutoTokenizer
from peft import PeftModel
base = {auto}.from_pretrained("{peft_base}"{labels})
model = PeftModel.from_pretrained(base, "path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```

`model.merge_and_unload()` folds the adapter into the base weights.

## Use with lora_core

```python
import lora_core
from sweeps.models.load import load_model
base = load_model("{cfg.model.name}", "{task}"{labels}).model
model = lora_core.load_adapter(base, "path/to/this/folder")   # strict: every key, every shape
```
"""
    return re.sub(r"\n{3,}", "\n\n", text)


def _data_name(cfg: TrialConfig) -> str:
    if cfg.data.name:
        return cfg.data.name + (f"/{cfg.data.config}" if cfg.data.config else "")
    files = cfg.data.files
    if isinstance(files, dict):
        return ", ".join(Path(v).name for v in files.values())
    return Path(str(files)).name


# --------------------------------------------------------------------------- small helpers

def _check_out(out: str | os.PathLike[str]) -> Path:
    dest = Path(out).expanduser().resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise LoraError(f"cannot export to {dest}: it exists and is not an empty directory",
                        hint="pass a new directory (or remove the old export first)")
    return dest


def _staging_dir(dest: Path) -> tuple[Path, list[Path]]:
    """A hidden folder beside ``dest`` (same file system: the final rename is atomic), and the parent
    folders created for it (removed again if the export fails)."""
    created = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()][::-1]
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)), created
    except OSError as exc:
        _remove_empty(created)
        raise LoraError(f"cannot write in {dest.parent}: {exc.strerror or exc}", hint="pass a writable --out") from None


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _mask(uri: str) -> str:
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", uri)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
