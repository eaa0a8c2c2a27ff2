"""One trial as one MLflow run: its params, step metrics, summary, state, learning curve and weights.

    >>> with TrialRun.start(config.tracking, config, parent_run_id=sweep_run_id,
    ...                     tags={"optuna.trial_number": 3}) as run:
    ...     trial = run_trial(config, report=...)
    ...     run.log_trial(trial)

What a trial run holds:

- params: every field of the resolved config except ``tracking`` (``model.name``, ``lora.r``,
  ``train.lr``...; lists comma-joined, mappings as JSON, None as ``null``) and ``version.*``
  (lora_sweep, torch, transformers, mlflow, python). ``config.yaml`` is the exact reproduction.
- step metrics: ``train_loss`` at every step read back, ``val_<metric>`` at every evaluation
  (``val_accuracy``, ``val_eval_loss``...), logged with ``step=``.
- summary metrics: ``TrialResult.summary()`` (``final_accuracy``, ``best_accuracy``, ``train_s``,
  ``peak_memory_bytes``, ``tokens_per_s``...), units in the names.
- tags: ``lora_sweep.kind=trial``, ``lora_sweep.state`` (COMPLETE / PRUNED / FAILED), ``.reason``,
  ``.objective``, ``.direction``, ``.memory_kind``, ``.weights`` (adapter / head / none), ``.error``
  on a crash; ``mlflow.parentRunId`` when nested under a sweep run.
- status: COMPLETE -> FINISHED, PRUNED -> KILLED (stopped early on purpose; not a success), FAILED
  and any exception -> FAILED. Ctrl-C (a ``BaseException`` that is not an ``Exception``) -> KILLED.
- artifacts (names in :mod:`sweeps.tracking.artifacts`): ``config.yaml`` (logged when the run
  starts, so crashed runs keep it), ``learning_curve.html`` (self-contained plotly page, works
  offline), and the weights of a COMPLETE trial: ``adapter/`` (PEFT format, from
  ``lora_core.save_adapter``) or, for the head-only baseline, ``head/head_model.safetensors``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import yaml

import lora_core
from sweeps.config.trial import TrackingConfig, TrialConfig
from sweeps.names import (
    CONFIG_NAME_TAG,
    DIRECTION_TAG,
    ERROR_TAG,
    KIND_TAG,
    MEMORY_KIND_TAG,
    OBJECTIVE_TAG,
    PARENT_TAG,
    REASON_TAG,
    STATE_TAG,
    WEIGHTS_TAG,
)
from sweeps.text import first_line
from sweeps.tracking.artifacts import ADAPTER_DIR, CONFIG_FILE, CURVE_FILE, HEAD_DIR, HEAD_FILE
from sweeps.tracking.run_params import default_run_name, param_value, trial_params, trial_run_name
from sweeps.tracking.store import (
    artifact_location,
    client_for,
    ensure_experiment,
    experiment_name,
    quiet_mlflow,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag
    from torch import nn

    from sweeps.training.trainer import Trial, TrialResult

__all__ = [
    "STATUS_OF_STATE",
    "TrialRun",
    "default_run_name",
    "learning_curve_figure",
    "log_trial",
    "param_value",
    "trial_params",
    "trial_run_name",
]

# Run tags of a trial that sweeps.names does not (yet) hold.

STATUS_OF_STATE = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAILED": "FAILED"}
_STATE_OF_STATUS = {v: k for k, v in STATUS_OF_STATE.items()}

# MLflow's limits for one log_batch call (mlflow.utils.validation).
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000
MAX_TAG_LENGTH = 8000

WeightsPolicy = Literal["complete", "always", "never"]


# --------------------------------------------------------------------------- metrics and batches

def _step_metrics(result: TrialResult, timestamp: int) -> list[Metric]:
    from mlflow.entities import Metric

    out = [Metric("train_loss", float(loss), timestamp, int(step)) for step, loss in result.train_curve]
    for entry in result.history:
        step = int(entry["step"])
        out.extend(Metric(f"val_{k}", float(v), timestamp, step) for k, v in entry.items() if k != "step")
    return out


def _summary_metrics(result: TrialResult, timestamp: int) -> list[Metric]:
    from mlflow.entities import Metric

    return [Metric(k, float(v), timestamp, 0) for k, v in result.summary().items()]


def _batches(metrics: list[Metric], params: list[Param],
             tags: list[RunTag]) -> Iterator[tuple[list[Metric], list[Param], list[RunTag]]]:
    """Split into the fewest log_batch calls MLflow accepts (1000 metrics, 100 params, 100 tags, 1000 in all)."""
    metrics, params, tags = list(metrics), list(params), list(tags)
    while metrics or params or tags:
        p, params = params[:MAX_PARAMS_PER_BATCH], params[MAX_PARAMS_PER_BATCH:]
        t, tags = tags[:MAX_TAGS_PER_BATCH], tags[MAX_TAGS_PER_BATCH:]
        room = min(MAX_METRICS_PER_BATCH, MAX_ENTITIES_PER_BATCH - len(p) - len(t))
        m, metrics = metrics[:room], metrics[room:]
        yield m, p, t


# --------------------------------------------------------------------------- artifacts

def learning_curve_figure(result: TrialResult, title: str = "") -> Any:
    """Plotly figure: train loss (left axis) and the validation objective (right axis) vs step."""
    import plotly.graph_objects as go

    traces = []
    if result.train_curve:
        steps, losses = zip(*result.train_curve, strict=True)
        traces.append(go.Scatter(x=list(steps), y=list(losses), mode="lines", name="train loss"))
    points = [(h["step"], h[result.objective]) for h in result.history if result.objective in h]
    if points:
        steps, values = zip(*points, strict=True)
        traces.append(go.Scatter(x=list(steps), y=list(values), mode="lines+markers", yaxis="y2",
                                 name=f"validation {result.objective}"))
    return go.Figure(data=traces, layout={
        "title": {"text": title or f"{result.state}: train loss and validation {result.objective}"},
        "hovermode": "x unified",  # no named template: resolving one costs 20-50 ms per figure
        "xaxis": {"title": {"text": "step"}},
        "yaxis": {"title": {"text": "train loss"}},
        "yaxis2": {"title": {"text": f"validation {result.objective} ({result.direction})"},
                   "overlaying": "y", "side": "right"},
    })


def _head_modules(trial: Trial) -> list[str]:
    from sweeps.models.heads import saved_modules

    return list(saved_modules(trial.model, trial.config.model.task, trial.config.lora.modules_to_save))


def _save_head(model: nn.Module, modules: list[str], folder: Path) -> None:
    from safetensors.torch import save_file

    tensors = {f"{m}.{p}": t.detach().cpu().contiguous().clone()
               for m in modules for p, t in model.get_submodule(m).named_parameters()}
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / HEAD_FILE), metadata={"format": "pt", "lora_sweep": json.dumps({"modules": modules})})


def _error_text(exc: BaseException) -> str:
    """``Type: first line``, or ``Type`` for an exception without a message."""
    line = first_line(exc, MAX_TAG_LENGTH) if str(exc).strip() else ""
    return (f"{type(exc).__name__}: {line}" if line else type(exc).__name__)[:MAX_TAG_LENGTH]


# --------------------------------------------------------------------------- the run

class TrialRun:
    """The MLflow run of one trial. Use :meth:`start`, then as a context manager.

    On leaving the ``with`` block the run ends with the status of the logged trial's state
    (FINISHED when no trial was logged); an exception inside ends it FAILED with tag
    ``lora_sweep.error`` (``"Type: first line"``) and propagates. No path leaves it RUNNING.
    """

    def __init__(self, client: MlflowClient, run_id: str, experiment_id: str, *, run_name: str = "",
                 save_weights: WeightsPolicy = "complete", include_plotlyjs: bool | str = True) -> None:
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id
        self.run_name = run_name or run_id
        self.save_weights, self.include_plotlyjs = save_weights, include_plotlyjs
        self.status: str | None = None  # the final MLflow status, once ended
        self._result_status: str | None = None

    @classmethod
    def start(cls, tracking: TrackingConfig, config: TrialConfig, *, experiment: str | None = None,
              run_name: str | None = None, parent_run_id: str | None = None,
              tags: Mapping[str, Any] | None = None, client: MlflowClient | None = None,
              save_weights: WeightsPolicy = "complete", include_plotlyjs: bool | str = True) -> TrialRun:
        """Create the run (RUNNING) with its tags and params, and log ``config.yaml``.

        Args:
            tracking: The store (``config.tracking`` usually; a sweep passes its own).
            config: The resolved trial config.
            experiment: Experiment name; default ``tracking.experiment``, else ``lora-sweep``.
            run_name: Default :func:`default_run_name`.
            parent_run_id: A sweep's parent run: sets ``mlflow.parentRunId`` so the run nests under it.
            tags: Extra tags (e.g. ``{"optuna.trial_number": 3}``); values are turned into text.
            client: Reuse a client (a sweep makes one); default :func:`client_for` ``(tracking)``.
            save_weights: Log the adapter (or head) for ``complete`` trials only (default: pruned
                and failed trials are never exported), ``always``, or ``never``.
            include_plotlyjs: Passed to plotly's ``write_html``: True embeds plotly.js (4.8 MB,
                works offline); ``"cdn"`` links it instead (a few KB, needs the internet to view).
        """
        from mlflow.entities import Param

        client = client or client_for(tracking)
        experiment_id = ensure_experiment(client, experiment or experiment_name(tracking),
                                          artifact_location(tracking))
        all_tags = {KIND_TAG: "trial", STATE_TAG: "RUNNING", CONFIG_NAME_TAG: config.name}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        all_tags.update({str(k): str(v)[:MAX_TAG_LENGTH] for k, v in (tags or {}).items()})
        with quiet_mlflow():
            run = client.create_run(experiment_id, tags=all_tags, run_name=run_name or default_run_name(config))
        trial_run = cls(client, run.info.run_id, experiment_id, run_name=run.info.run_name,
                        save_weights=save_weights, include_plotlyjs=include_plotlyjs)
        try:
            trial_run._log_batch([], [Param(k, v) for k, v in trial_params(config).items()], [])
            with quiet_mlflow():
                client.log_text(trial_run.run_id, yaml.safe_dump(config.stored_dict(), sort_keys=False), CONFIG_FILE)
        except BaseException as exc:
            trial_run.fail(exc)
            raise
        return trial_run

    # ------------------------------------------------------------------ logging
    def _log_batch(self, metrics: Iterable[Metric], params: Iterable[Param], tags: Iterable[RunTag]) -> int:
        """Log everything in as few calls as MLflow's limits allow; returns the number of calls."""
        calls = 0
        with quiet_mlflow():
            for m, p, t in _batches(list(metrics), list(params), list(tags)):
                self.client.log_batch(self.run_id, metrics=m, params=p, tags=t, synchronous=True)
                calls += 1
        return calls

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._log_batch([], [], [RunTag(str(k), str(v)[:MAX_TAG_LENGTH]) for k, v in tags.items()])

    def log_trial(self, trial: Trial, write_adapter: Callable[[Path], object] | None = None) -> None:
        """Log the trial's step and summary metrics, state tags, learning curve and weights.

        ``write_adapter(folder)`` writes the adapter where ``trial.model`` does not hold it as an ordinary
        adapter (a packed trial: :meth:`lora_core.packed.Pack.save_slot`). The run stays open; it ends
        (with the status of ``trial.result.state``) when the ``with`` block is left or :meth:`end` is called.
        """
        from mlflow.entities import Metric, RunTag

        result = trial.result
        now = int(time.time() * 1000)
        has_adapter = trial.config.lora.enabled and (
            write_adapter is not None or bool(lora_core.adapter_names(trial.model)))
        save = self.save_weights == "always" or (self.save_weights == "complete" and result.state == "COMPLETE")
        weights = "none"
        if save:
            weights = "adapter" if has_adapter else ("head" if not trial.config.lora.enabled else "none")
        tags = {STATE_TAG: result.state, OBJECTIVE_TAG: result.objective, DIRECTION_TAG: result.direction,
                MEMORY_KIND_TAG: result.memory_kind, WEIGHTS_TAG: weights}
        if result.reason:
            tags[REASON_TAG] = result.reason
        metrics = _step_metrics(result, now) + _summary_metrics(result, now)
        if trial.data is not None and trial.data.majority_rate is not None:
            metrics.append(Metric("majority_rate", float(trial.data.majority_rate), now, 0))
        with tempfile.TemporaryDirectory(prefix="lora-sweep-run-") as tmp:
            folder = Path(tmp)
            fig = learning_curve_figure(result, title=f"{self.run_name}: {result.state}")
            fig.write_html(str(folder / CURVE_FILE), include_plotlyjs=self.include_plotlyjs, full_html=True)
            if weights == "adapter" and write_adapter is not None:
                write_adapter(folder / ADAPTER_DIR)
            elif weights == "adapter":
                lora_core.save_adapter(trial.model, folder / ADAPTER_DIR)
            elif weights == "head":
                _save_head(trial.model, _head_modules(trial), folder / HEAD_DIR)
            self._log_batch(metrics, [], [RunTag(k, str(v)[:MAX_TAG_LENGTH]) for k, v in tags.items()])
            with quiet_mlflow():
                self.client.log_artifacts(self.run_id, str(folder))
        self._result_status = STATUS_OF_STATE[result.state]

    # ------------------------------------------------------------------ ending
    def end(self, status: str | None = None) -> None:
        """End the run: ``status`` or the logged trial's (FINISHED if none was logged). Idempotent.

        When no trial was logged, the state tag is set to match (FINISHED -> COMPLETE, KILLED ->
        PRUNED, FAILED -> FAILED).
        """
        if self.status is not None:
            return
        status = status or self._result_status or "FINISHED"
        if self._result_status is None:
            self.set_tags({STATE_TAG: _STATE_OF_STATUS.get(status, status)})
        self._terminate(status)

    def _terminate(self, status: str) -> None:
        with quiet_mlflow():
            self.client.set_terminated(self.run_id, status=status)
        self.status = status

    def fail(self, exc: BaseException) -> None:
        """End the run FAILED (KILLED for Ctrl-C and other non-``Exception``s) with state tag FAILED
        (as Optuna records an interrupted trial) and ``lora_sweep.error``.

        Never raises: a store that is down as well must not hide the original exception.
        """
        if self.status is not None:
            return
        try:
            self.set_tags({STATE_TAG: "FAILED", ERROR_TAG: _error_text(exc)})
            self._terminate("FAILED" if isinstance(exc, Exception) else "KILLED")
        except Exception as log_exc:  # the store may be the thing that failed
            logging.getLogger(__name__).warning("could not mark MLflow run %s as failed: %s", self.run_id,
                                                _error_text(log_exc))

    def __enter__(self) -> TrialRun:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        if exc is None:
            try:
                self.end()
            except BaseException as end_exc:
                self.fail(end_exc)
                raise
        else:
            self.fail(exc)
        return False


def log_trial(tracking: TrackingConfig, trial: Trial, **start_kwargs: Any) -> str:
    """Log a finished trial as one run (see :meth:`TrialRun.start` for the options); returns its id."""
    with TrialRun.start(tracking, trial.config, **start_kwargs) as run:
        run.log_trial(trial)
    return run.run_id
