"""What a sweep's tracking store says about its trials, read-only: each trial run's id, status and fail reason.

Never creates or writes anything: a store that does not exist is not opened, and any problem reading
it becomes :attr:`TrackingView.note` (a one-line reason) instead of an error, so that ``lora-sweep
status`` can still print its table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sweeps.config.sweep import SweepConfig
from sweeps.names import ERROR_TAG, KIND_TAG, REASON_TAG, STUDY_NAME_TAG, TRIAL_NUMBER_TAG
from sweeps.text import first_line, mask_url
from sweeps.tracking.store import existing_store_uri, missing_store, quiet_mlflow, short_http_retries

__all__ = ["RunInfo", "TrackingView", "read_tracking"]


@dataclass
class RunInfo:
    run_id: str
    status: str
    error: str | None  # lora_sweep.error, else lora_sweep.reason


@dataclass
class TrackingView:
    """What the tracking store says about the sweep's trials; ``note`` when it could not be read."""

    uri: str
    experiment: str
    experiment_id: str | None = None
    by_id: dict[str, RunInfo] = field(default_factory=dict)
    by_trial: dict[int, RunInfo] = field(default_factory=dict)
    note: str | None = None


def read_tracking(config: SweepConfig) -> TrackingView:
    """The sweep's trial runs (by run id and by trial number); never creates or writes anything."""
    uri = existing_store_uri(config.tracking)
    view = TrackingView(uri=mask_url(uri), experiment=config.experiment())
    missing = missing_store(uri)
    if missing is not None:
        view.note = f"no MLflow store at {missing}: fail reasons from MLflow are not shown"
        return view
    try:
        from mlflow import MlflowClient

        with quiet_mlflow(), short_http_retries():
            client = MlflowClient(tracking_uri=uri)
            exp = client.get_experiment_by_name(view.experiment)
            if exp is None:
                view.note = f"no MLflow experiment {view.experiment!r} in {view.uri} (yet)"
                return view
            view.experiment_id = exp.experiment_id
            token = None
            name = config.name.replace("'", "\\'")
            while True:
                page = client.search_runs([exp.experiment_id], filter_string=f"tags.`{STUDY_NAME_TAG}` = '{name}'",
                                          max_results=1000, page_token=token)
                for run in page:
                    tags = run.data.tags
                    if tags.get(KIND_TAG) != "trial":
                        continue
                    info = RunInfo(run.info.run_id, run.info.status, tags.get(ERROR_TAG) or tags.get(REASON_TAG))
                    view.by_id[info.run_id] = info
                    number = tags.get(TRIAL_NUMBER_TAG)
                    if number is not None and number.isdigit():
                        view.by_trial.setdefault(int(number), info)  # newest first: keep the newest
                token = page.token
                if not token:
                    break
    except Exception as exc:  # any store problem: the table is still useful without it
        why = first_line(exc)
        why = why if len(why) <= 120 else why[:119] + "…"
        view.note = f"cannot read the MLflow store {view.uri} ({why}): fail reasons from MLflow are not shown"
    return view
