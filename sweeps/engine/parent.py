"""The sweep's MLflow parent run: opened or found again, the workers' records, the ladder's decisions,
and its end."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

import optuna
import yaml

from sweeps.config.sweep import SweepConfig
from sweeps.engine.liveness import Worker
from sweeps.engine.progress import SweepResult
from sweeps.engine.study import storage_label, sweep_objectives
from sweeps.names import (
    CHOSEN_RANK_TAG,
    DIRECTION_TAG,
    KIND_TAG,
    LADDER_DONE_TAG,
    OBJECTIVE_TAG,
    PARENT_ATTR,
    STOPPED_TAG,
    STORAGE_TAG,
    STRATEGY_TAG,
    STUDY_NAME_TAG,
    SWEEP_TAG,
    WORKER_TAG_PREFIX,
)
from sweeps.text import first_line
from sweeps.tracking.store import artifact_location, ensure_experiment, quiet_mlflow, shown_uri
from sweeps.tracking.trial_run import param_value, trial_params

if TYPE_CHECKING:
    from mlflow import MlflowClient


log = logging.getLogger(__name__)


def _parent_params(config: SweepConfig) -> dict[str, str]:
    params = trial_params(config.base_trial())
    for key, value in dataclasses.asdict(config.search).items():
        params[f"search.{key}"] = param_value(value)
    params["search.storage"] = storage_label(config)
    return params


def open_parent_run(study: optuna.Study, config: SweepConfig, client: MlflowClient) -> str:
    """The sweep's parent run: found again from the study's user attrs (set RUNNING again), or created."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    run_id = study.user_attrs.get(PARENT_ATTR)
    experiment_id = ensure_experiment(client, config.experiment(), artifact_location(config.tracking))
    if run_id:
        try:
            with quiet_mlflow():
                run = client.get_run(run_id)
                if run.info.lifecycle_stage != "deleted":
                    client.update_run(run_id, status="RUNNING")
                    return run_id
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":  # the server is down: keep the run (writes spool)
                log.warning("could not read the sweep's parent run %s (%s); going on with it", run_id,
                            first_line(exc))
                with quiet_mlflow():
                    client.update_run(run_id, status="RUNNING")
                return str(run_id)
            log.warning("the sweep's parent run %s is gone from %s; starting a new one", run_id,
                        shown_uri(config.tracking))
    tags = {KIND_TAG: "sweep", SWEEP_TAG: config.name, STUDY_NAME_TAG: config.name,
            STORAGE_TAG: storage_label(config), STRATEGY_TAG: config.search.strategy,
            OBJECTIVE_TAG: ",".join(sweep_objectives(config)),
            DIRECTION_TAG: ",".join(config.search.directions(config.model.task))}
    with quiet_mlflow():
        run = client.create_run(experiment_id, tags=tags, run_name=config.name)
        run_id = run.info.run_id
        params = [Param(k, v) for k, v in _parent_params(config).items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i:i + 100], synchronous=True)
        client.log_text(run_id, yaml.safe_dump(config.stored_dict(), sort_keys=False), "sweep.yaml")
    study.set_user_attr(PARENT_ATTR, run_id)
    return run_id


def end_parent(client: MlflowClient, run_id: str, status: str, result: SweepResult) -> None:
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    metrics = [Metric("last_run_wall_s", result.wall_s, now, 0),
               Metric("last_run_overhead_s", result.overhead_s, now, 0),
               Metric("last_run_overhead_fraction", result.overhead_fraction, now, 0)]
    try:
        with quiet_mlflow():
            client.log_batch(run_id, metrics=metrics, tags=[RunTag(STOPPED_TAG, result.stopped)],
                             synchronous=True)
            client.set_terminated(run_id, status=status)
    except Exception as exc:
        log.warning("could not end the sweep's parent run %s: %s", run_id, first_line(exc))


def log_worker(client: MlflowClient, run_id: str, me: Worker, result: SweepResult) -> None:
    """A joining worker records what it did on the parent run (as a tag; it does not end the run)."""
    try:
        with quiet_mlflow():
            client.set_tag(run_id, f"{WORKER_TAG_PREFIX}{me.host}.{me.pid}",
                           f"{result.trials_run} trials, {result.wall_s:.0f} s, stopped: {result.stopped}")
    except Exception as exc:
        log.warning("could not tag the sweep's parent run %s: %s", run_id, first_line(exc))


def log_ladder(client: MlflowClient, run_id: str, record: dict[str, Any]) -> None:
    """The decisions on the parent run: ``ladder.json`` and tags for the recommendation."""
    from mlflow.entities import RunTag

    tags = [RunTag(LADDER_DONE_TAG, str(bool(record.get("done"))).lower())]
    for key in ("recommendation", "best_quality"):
        rec = record.get(key)
        if rec:
            tags += [RunTag(f"lora_sweep.{key}.{k}", param_value(v)) for k, v in rec["params"].items()]
            tags.append(RunTag(f"lora_sweep.{key}.mean", f"{rec['mean']:.6g}"))
    if record.get("chosen_rank") is not None:
        tags.append(RunTag(CHOSEN_RANK_TAG, str(record["chosen_rank"])))
    try:
        with quiet_mlflow():
            client.log_dict(run_id, record, "ladder.json")
            client.log_batch(run_id, tags=tags, synchronous=True)
    except Exception as exc:
        log.warning("could not log the ladder's decisions to the parent run %s: %s", run_id, first_line(exc))

