"""Reading one sweep for its report: the Optuna study and the MLflow runs, both read-only.

    >>> data = collect(config)            # SweepData: trials, configurations, ladder, notes
    >>> data.configs[0].mean, data.configs[0].std, data.configs[0].n

The study is opened with :func:`sweeps.engine.readonly.load_study_readonly`; each trial's run (found
by the trial's ``mlflow_run_id`` attr, else by its ``optuna.trial_number`` tag) gives its metrics and
whether it logged an adapter. COMPLETE trials of the same params are grouped into configurations
(:class:`dashboards.records.ConfigStats`): quality the mean objective over their seeds, costs
(``trainable_params``, ``train_s``, ``peak_memory_bytes``) the means of the MLflow summary metrics
over the same trials. A ladder's learning-rate calibration trials (stage 0) train for fewer steps
(trial user attr ``lora_sweep.train_steps``), so their objective is not comparable: they are kept
apart (``SweepData.shortened``) and left out of every quality table, plot and choice. The
recommendation is :mod:`dashboards.choices`'. The test-split figures the sweep's end stored (study user attr
``lora_sweep.test``, `sweeps.engine.holdout`) are read as they are: the report never evaluates.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from dashboards.choices import apply_ladder, derive_choices
from dashboards.records import COST_METRICS, ConfigStats, SweepData, TrialRecord
from lora_core import LoraError
from sweeps.config.sweep import SweepConfig
from sweeps.names import (
    KIND_TAG,
    LADDER_ATTR,
    PARENT_ATTR,
    RUN_ID_ATTR,
    RUNG_ATTR,
    SEED_INDEX,
    STAGE_ATTR,
    STEPS_ATTR,
    STUDY_NAME_TAG,
    TEST_ATTR,
    TRIAL_NUMBER_TAG,
)
from sweeps.text import first_line, mask_url

if TYPE_CHECKING:
    from mlflow.entities import Run
    from optuna.trial import FrozenTrial

__all__ = ["collect"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _record(t: FrozenTrial) -> TrialRecord:
    value = float(t.values[0]) if t.state.name == "COMPLETE" and t.values else None
    duration = t.duration.total_seconds() if t.duration is not None else None
    return TrialRecord(number=t.number, state=t.state.name, params=dict(t.params),
                       seed_index=int(t.user_attrs.get(SEED_INDEX, 0)), value=value,
                       run_id=t.user_attrs.get(RUN_ID_ATTR), stage=_int_or_none(t.user_attrs.get(STAGE_ATTR)),
                       rung=_int_or_none(t.user_attrs.get(RUNG_ATTR)), steps=_int_or_none(t.user_attrs.get(STEPS_ATTR)),
                       duration_s=duration)


def _read_runs(data: SweepData) -> None:
    """Fill each trial's MLflow metrics and adapter flag; a store that cannot be read becomes a note."""
    from sweeps.names import WEIGHTS_TAG
    from sweeps.tracking.spool import is_provisional, resolve_run_id
    from sweeps.tracking.store import missing_store, quiet_mlflow, short_http_retries

    missing = missing_store(data.tracking_uri)
    if missing is not None:
        data.notes.append(f"no MLflow store at {missing}: costs, learning curves and adapters are not shown")
        return
    try:
        from mlflow import MlflowClient

        with quiet_mlflow(), short_http_retries():
            client = MlflowClient(tracking_uri=data.tracking_uri)
            exp = client.get_experiment_by_name(data.config.experiment())
            if exp is None:
                data.notes.append(f"no MLflow experiment {data.config.experiment()!r} in {mask_url(data.tracking_uri)}: "
                                  "costs, learning curves and adapters are not shown")
                return
            by_id: dict[str, Run] = {}
            by_number: dict[int, Run] = {}
            name = data.name.replace("'", "\\'")
            token = None
            while True:
                page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token,
                                          filter_string=f"tags.`{STUDY_NAME_TAG}` = '{name}'")
                for run in page:
                    if run.data.tags.get(KIND_TAG) != "trial":
                        continue
                    by_id[run.info.run_id] = run
                    number = run.data.tags.get(TRIAL_NUMBER_TAG, "")
                    if number.isdigit():
                        by_number.setdefault(int(number), run)  # newest first
                token = page.token
                if not token:
                    break
    except Exception as exc:  # any store problem: the study alone still makes a report
        data.notes.append(f"cannot read the MLflow store {mask_url(data.tracking_uri)} ({first_line(exc)}): costs, "
                          "learning curves and adapters are not shown")
        return
    data.client = client
    if is_provisional(data.parent_run_id):  # opened while the server was down: found by its run-key tag
        with contextlib.suppress(Exception), quiet_mlflow(), short_http_retries():
            data.parent_run_id = resolve_run_id(client, data.parent_run_id, [exp.experiment_id])
    for t in data.trials:
        found = by_id.get(t.run_id or "") or by_number.get(t.number)
        if found is None:
            continue
        t.run_id = found.info.run_id
        t.metrics = {k: float(v) for k, v in found.data.metrics.items()}
        t.has_adapter = found.data.tags.get(WEIGHTS_TAG) == "adapter"


def _aggregate(trials: list[TrialRecord]) -> list[ConfigStats]:
    """The configurations: full-length COMPLETE trials with a finite objective, grouped by params."""
    groups: dict[str, list[TrialRecord]] = {}
    for t in trials:
        if t.state == "COMPLETE" and t.value is not None and math.isfinite(t.value) and "r" in t.params \
                and t.steps is None:
            groups.setdefault(t.key, []).append(t)
    out = []
    for key, members in groups.items():
        members.sort(key=lambda t: (t.seed_index, t.number))
        values = [float(t.value) for t in members if t.value is not None]  # all are: see the grouping
        cost: dict[str, float | None] = {}
        for metric in COST_METRICS:
            got = [t.metrics[metric] for t in members if metric in t.metrics and math.isfinite(t.metrics[metric])]
            cost[metric] = statistics.fmean(got) if got else None
        out.append(ConfigStats(key, dict(members[0].params), members, values, statistics.fmean(values),
                               statistics.stdev(values) if len(values) >= 2 else None, len(values), cost))
    return out


def collect(config: SweepConfig, *, require_complete: bool = True) -> SweepData:
    """Read the sweep's study and MLflow runs (nothing is created or written).

    Raises:
        LoraError: the study does not exist or cannot be read, or (``require_complete``) has no
            COMPLETE trial.
    """
    from sweeps.engine.readonly import load_study_readonly
    from sweeps.tracking.store import existing_store_uri

    study = load_study_readonly(config)
    task = config.model.task
    with _quiet_optuna():
        frozen = study.get_trials(deepcopy=False)
    trials = [_record(t) for t in sorted(frozen, key=lambda t: t.number)]
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state] = counts.get(t.state, 0) + 1
    if require_complete and not any(t.state == "COMPLETE" and t.value is not None and math.isfinite(t.value)
                                    and "r" in t.params and t.steps is None for t in trials):
        states = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trials"
        raise LoraError(f"sweep {config.name!r} has no COMPLETE trial yet ({states}): nothing to report",
                        hint=f"run it (lora-sweep run {config.name}) or wait for a trial to finish; "
                             f"lora-sweep status {config.name} shows its trials")
    ladder = study.user_attrs.get(LADDER_ATTR)
    data = SweepData(config=config, study=study, objective=config.search.objective_name(task),
                     direction=config.search.objective_direction(task), trials=trials, configs=[],
                     counts=counts, ladder=None, parent_run_id=study.user_attrs.get(PARENT_ATTR),
                     tracking_uri=existing_store_uri(config.tracking), client=None)
    if ladder is not None:
        if isinstance(ladder, dict):
            data.ladder = ladder
        else:
            data.notes.append(f"the study's {LADDER_ATTR} attr is a {type(ladder).__name__}, not a mapping: "
                              "the ladder's decisions are not shown")
    test = study.user_attrs.get(TEST_ATTR)
    if isinstance(test, dict) and isinstance(test.get("choices"), dict):
        data.test = test
    _read_runs(data)
    data.configs = _aggregate(trials)
    data.shortened = [t for t in trials if t.state == "COMPLETE" and t.steps is not None]
    if data.configs:
        derive_choices(data)
    apply_ladder(data)
    return data
