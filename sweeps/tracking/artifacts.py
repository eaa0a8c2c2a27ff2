"""Reading trial runs back from the store: the runs of an experiment as a frame, a run's adapter artifact.

Also the names of the artifacts a trial run logs (written by :mod:`sweeps.tracking.trial_run`):
``config.yaml``, ``learning_curve.html``, ``adapter/`` (PEFT format) or ``head/head_model.safetensors``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_core import LoraError
from sweeps.config.trial import TrackingConfig
from sweeps.names import STATE_TAG, WEIGHTS_TAG
from sweeps.text import first_line
from sweeps.tracking.store import client_for, env_vars, experiment_name, quiet_mlflow, shown_uri

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient

__all__ = ["ADAPTER_DIR", "CONFIG_FILE", "CURVE_FILE", "HEAD_DIR", "HEAD_FILE", "download_adapter", "find_runs"]

ADAPTER_DIR = "adapter"
HEAD_DIR = "head"
HEAD_FILE = "head_model.safetensors"
CURVE_FILE = "learning_curve.html"
CONFIG_FILE = "config.yaml"


def _experiment_id(client: MlflowClient, cfg: TrackingConfig, name: str) -> str:
    with quiet_mlflow():
        exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage == "deleted":
        with quiet_mlflow():
            names = sorted(e.name for e in client.search_experiments())
        raise LoraError(f"no MLflow experiment named {name!r} in {shown_uri(cfg)}",
                        hint=f"experiments there: {', '.join(names) or 'none'}")
    return str(exp.experiment_id)


def find_runs(cfg: TrackingConfig, experiment: str | None = None, filter_string: str = "",
              order_by: list[str] | None = None) -> pd.DataFrame:
    """The experiment's runs as a frame with ``mlflow.search_runs``'s columns.

    Columns: ``run_id``, ``experiment_id``, ``status``, ``artifact_uri``, ``start_time``,
    ``end_time`` (UTC timestamps), then ``metrics.*``, ``params.*`` and ``tags.*``. Uses this config's
    store only (the global tracking URI is neither read nor changed).

    Raises:
        LoraError: no experiment of that name.
    """
    import pandas as pd

    client = client_for(cfg)
    experiment_id = _experiment_id(client, cfg, experiment or experiment_name(cfg))
    rows: list[dict[str, Any]] = []
    token = None
    while True:
        with quiet_mlflow():
            page = client.search_runs([experiment_id], filter_string=filter_string, order_by=order_by,
                                      max_results=1000, page_token=token)
        for run in page:
            row: dict[str, Any] = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                                   "status": run.info.status, "artifact_uri": run.info.artifact_uri,
                                   "start_time": run.info.start_time, "end_time": run.info.end_time}
            row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
            row.update({f"params.{k}": v for k, v in run.data.params.items()})
            row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
            rows.append(row)
        token = page.token
        if not token:
            break
    base = ["run_id", "experiment_id", "status", "artifact_uri", "start_time", "end_time"]
    frame = pd.DataFrame(rows, columns=None if rows else base)
    for col in ("start_time", "end_time"):
        frame[col] = pd.to_datetime(frame[col], unit="ms", utc=True)
    rest = sorted(c for c in frame.columns if c not in base)
    order = {"metrics": 0, "params": 1, "tags": 2}
    rest.sort(key=lambda c: order.get(c.split(".", 1)[0], 3))
    return frame[base + rest]


def download_adapter(cfg: TrackingConfig, run_id: str, dest: str | Path) -> Path:
    """Download run ``run_id``'s ``adapter/`` artifact into directory ``dest`` (which must not exist
    or be empty); returns ``dest``. The files arrive in a temporary folder next to ``dest`` and are
    moved into place at the end, so a failed download leaves nothing behind.

    Raises:
        LoraError: unknown run, a run without an adapter (pruned, failed, head-only), or ``dest``
            is a file or a non-empty directory.
    """
    from mlflow.exceptions import MlflowException

    dest = Path(dest).expanduser().resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise LoraError(f"cannot download the adapter to {dest}: it exists and is not an empty directory",
                        hint="pass a new directory")
    client = client_for(cfg)
    try:
        with quiet_mlflow():
            run = client.get_run(run_id)
            files = client.list_artifacts(run_id, ADAPTER_DIR)
    except MlflowException as exc:
        raise LoraError(f"cannot read MLflow run {run_id!r} in {shown_uri(cfg)}: {first_line(exc)}",
                        hint="check the run id: lora-sweep status SWEEP --json gives each trial's "
                             "mlflow_run_id (lora-sweep ui shows every run)") from None
    if not files:
        tags = run.data.tags
        why = f"state {tags.get(STATE_TAG, '?')}, weights {tags.get(WEIGHTS_TAG, '?')}"
        raise LoraError(f"run {run_id} has no adapter artifact ({why})",
                        hint="only COMPLETE LoRA trials log an adapter; pick another run")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.", dir=dest.parent) as tmp:
        # no progress bar: a command's stderr keeps to its own lines (error + hint)
        with quiet_mlflow(), env_vars({"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):
            local = Path(client.download_artifacts(run_id, ADAPTER_DIR, dst_path=tmp))
        if dest.exists():
            dest.rmdir()
        local.replace(dest)
    return dest
