"""A sweep's HTML report: built from its study and MLflow store, written atomically, logged to MLflow.

    >>> build_report(load_sweep_config("my-sweep.yaml"))      # -> <home>/reports/my-sweep.html

What it shows, each with a heading and a sentence on how to read it: a summary (the sweep, counts by
state, the recommendation and the best-quality configuration, the rank ladder's decisions when the
study has them), the objective against the rank per target set with seed error bars (and as a table),
quality against cost with the Pareto front, learning curves from MLflow, Optuna's own plots where they
fit, and the LoRA paper's subspace similarity and amplification factor computed on the sweep's real
adapters. ``--compare`` adds a side-by-side section for other sweeps.

Data come from the sweep's Optuna study and MLflow store, both read-only (see ``dashboards.collect``).
The file works offline: plotly.js is embedded once and nothing is fetched. It is written atomically
(a temporary file renamed into place) and logged as the artifact ``report.html`` of the sweep's MLflow
parent run. A sweep that cannot be read, or has no COMPLETE trial, is a ``LoraError`` before
anything is written. The ``lora-sweep report`` command is ``sweeps.cli.report``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dashboards.collect import collect
from dashboards.records import SweepData
from lora_core import LoraError
from lora_core.io import current_umask
from sweeps.config.sweep import SweepConfig
from sweeps.text import first_line, mask_url

if TYPE_CHECKING:
    from dashboards.figures import Curve

__all__ = ["ARTIFACT_NAME", "Built", "build", "build_report", "default_path"]

log = logging.getLogger(__name__)

ARTIFACT_NAME = "report.html"
MAX_CURVES = 300          # learning curves of at most this many trials (the latest ones)


def default_path(config: SweepConfig, compare: Sequence[SweepConfig] = ()) -> Path:
    """``<tracking.home>/reports/<sweep name>.html``; with ``--compare``,
    ``<sweep name>-vs-<other>[-vs-...].html``, so a comparison never replaces the sweep's own report."""
    name = "-vs-".join([config.name, *(c.name for c in compare)])
    return Path(config.tracking.home).expanduser().resolve() / "reports" / f"{name}.html"


def artifact_name(compare: Sequence[SweepConfig] = ()) -> str:
    """``report.html``, or ``report-vs-<other>[-vs-...].html`` for a comparison."""
    return ARTIFACT_NAME if not compare else "report-vs-" + "-vs-".join(c.name for c in compare) + ".html"


def _check_destination(config: SweepConfig, out: str | os.PathLike[str] | None,
                       compare: Sequence[SweepConfig] = (), force: bool = False) -> Path:
    """Where the report goes. A file the user named (``out``) that exists is replaced only with ``force``
    (the default place under the home is the report's own, rewritten each time)."""
    dest = Path(out).expanduser().resolve() if out is not None else default_path(config, compare)
    if dest.is_dir():
        raise LoraError(f"cannot write the report to {dest}: it is a directory",
                        hint="pass a file name, e.g. --out report.html")
    if out is not None and not force and (dest.exists() or dest.is_symlink()):
        raise LoraError(f"{dest} exists: the report does not replace a file unless told to",
                        hint="pass --force to replace it, or another --out")
    existing = next((p for p in [dest.parent, *dest.parent.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise LoraError(f"cannot write the report to {dest}: {existing} is a file",
                        hint="pass --out with a path in a folder")
    return dest


def write_atomic(dest: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``dest`` and rename it into place."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as exc:
        raise LoraError(f"cannot write the report to {dest}: {exc.strerror or exc}",
                        hint="pass --out with a writable path") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- learning curves

def read_curves(data: SweepData) -> tuple[list[Curve], list[str]]:
    """Each COMPLETE/PRUNED trial's ``val_<objective>`` and ``train_loss`` histories from MLflow."""
    from dashboards.figures import Curve
    from sweeps.tracking.store import quiet_mlflow

    notes: list[str] = []
    if data.client is None:
        return [], ["the MLflow store could not be read, so there are no learning curves"]
    trials = [t for t in data.trials if t.state in ("COMPLETE", "PRUNED") and t.run_id]
    if len(trials) > MAX_CURVES:
        notes.append(f"the latest {MAX_CURVES} of {len(trials)} finished trials are shown")
        trials = trials[-MAX_CURVES:]
    val_key = f"val_{data.objective}"
    curves: list[Curve] = []
    try:
        with quiet_mlflow():
            for t in trials:
                run_id = t.run_id or ""  # never empty: trials without a run are left out above
                val = sorted((m.step, m.value) for m in data.client.get_metric_history(run_id, val_key))
                train = sorted((m.step, m.value) for m in data.client.get_metric_history(run_id, "train_loss"))
                if val or train:
                    key, label = t.key, _label(t.params)
                    if t.steps is not None:  # a ladder's shortened calibration trial: its own line colour
                        key, label = f"{key}|{t.steps}", f"{label} ({t.steps}-step calibration)"
                    curves.append(Curve(t.number, t.state, key, label, t.seed_index, val, train))
    except Exception as exc:
        notes.append(f"cannot read the metric histories from MLflow: {first_line(exc, 200)}")
    if not curves and not notes:
        notes.append(f"no finished trial has a {val_key} or train_loss history in MLflow")
    return curves, notes


def _label(params: dict[str, Any]) -> str:
    from dashboards.records import params_label

    return params_label(params)


# --------------------------------------------------------------------------- MLflow

def log_report(data: SweepData, path: Path, name: str = ARTIFACT_NAME) -> tuple[str | None, str]:
    """Log ``path`` as ``name`` (``report.html``) of the sweep's parent run. Returns (the run id, "")
    or, when it could not be logged, (None, why)."""
    from sweeps.tracking.store import client_for, quiet_mlflow

    if not data.parent_run_id:
        return None, f"sweep {data.name} records no MLflow parent run"
    if data.client is None:
        return None, f"the MLflow store {mask_url(data.tracking_uri)} could not be read"
    try:
        client = client_for(data.config.tracking)
        with tempfile.TemporaryDirectory(prefix="lora-sweep-report-") as tmp:
            staged = Path(tmp) / name
            shutil.copyfile(path, staged)
            with quiet_mlflow():
                client.log_artifact(data.parent_run_id, str(staged))
    except Exception as exc:
        return None, f"logging to MLflow run {data.parent_run_id} failed: {first_line(exc)}"
    return data.parent_run_id, ""


# --------------------------------------------------------------------------- building

@dataclass
class Built:
    """What :func:`build` wrote: the file, its size, the MLflow run it was logged to (None: not logged)."""

    path: Path
    bytes: int
    logged_run_id: str | None
    seconds: float


def build(config: SweepConfig, out: str | os.PathLike[str] | None = None, compare: Sequence[SweepConfig] = (),
          log_to_mlflow: bool = True, echo: Callable[[str], None] | None = None,
          warn: Callable[[str], None] | None = None, force: bool = False) -> Built:
    """Write the report (see :func:`build_report`) and say what was done.

    ``echo`` receives the lines for the user (the file written, the run it was logged to); ``warn``
    receives why the report could not be logged to MLflow (default: a logged warning).
    """
    from dashboards.adapters import analyses
    from dashboards.page import render

    t0 = time.perf_counter()
    dest = _check_destination(config, out, compare, force)
    data = collect(config)
    others = [collect(c) for c in compare]
    curves, curve_notes = read_curves(data)
    sim, amp = analyses(data)
    text = render(data, others, curves, curve_notes, sim, amp)
    write_atomic(dest, text)
    if echo:
        echo(f"report of sweep {config.name}: {dest} ({len(text.encode()) / 2**20:.1f} MiB)")
    logged = None
    if log_to_mlflow:
        logged, why = log_report(data, dest, artifact_name(compare))
        if logged and echo:
            echo(f"logged to MLflow run {logged} as {artifact_name(compare)}")
        elif not logged:
            if warn:
                warn(why)
            else:
                log.warning("the report of sweep %s is not logged to MLflow: %s", config.name, why)
    return Built(dest, len(text.encode()), logged, time.perf_counter() - t0)


def build_report(config: SweepConfig, out: Path | None = None, compare: Sequence[SweepConfig] = (),
                 log_to_mlflow: bool = True) -> Path:
    """Write the sweep's HTML report (default ``<home>/reports/<name>.html``) and log it to the sweep's
    MLflow parent run as ``report.html``; returns the file written.

    Raises:
        LoraError: the sweep (or a compared one) cannot be read or has no COMPLETE trial, or the
            destination cannot be written. Nothing is written then. Failing to log to MLflow is a
            warning only.
    """
    return build(config, out, compare, log_to_mlflow).path
