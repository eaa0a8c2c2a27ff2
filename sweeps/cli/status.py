"""``lora-sweep status SWEEP`` (every trial of a sweep, as a table or JSON) and ``lora-sweep ui [SWEEP]``
(the MLflow UI for a sweep's tracking store, on 127.0.0.1).

``status`` only reads: the study is loaded, never created (a sweep that was never run is an error), the
tracking store is opened only if it exists, and nothing is written to either. The fail reasons of
MLflow runs (tags ``lora_sweep.error`` / ``lora_sweep.reason``) are shown when the tracking store can
be read; when it cannot, a one-line note says so and the rest of the table is still printed.

``status --json`` prints a JSON list with one object per trial, in trial-number order, and nothing
else on stdout. Every object has the keys of :data:`JSON_KEYS`; a value that does not apply is null.

``ui`` starts ``python -m mlflow server`` (the interpreter running lora-sweep) bound to 127.0.0.1 for
the sweep's store (``sqlite:///<home>/mlflow.db``, artifacts ``<home>/artifacts``), waits until it
answers ``/health``, prints its URL (the sweep's experiment page when a sweep was named), and runs
until Ctrl-C, which stops the server and its workers (its own process group) and exits 0. When
``tracking.uri`` is already an ``http(s)://`` server, its URL is printed and nothing is started.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_core import LoraError
from sweeps.config.ref import DEFAULT_HOME, resolve_sweep
from sweeps.config.sweep import SweepConfig
from sweeps.config.trial import TrackingConfig
from sweeps.tracking.store import existing_store_uri, missing_store, short_http_retries

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial
    from rich.console import Console

__all__ = ["JSON_KEYS", "TrialRow", "load_study", "status", "sweep_rows", "ui"]

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
STAR = "★"
ERROR_TAG = "lora_sweep.error"
REASON_TAG = "lora_sweep.reason"
UI_START_TIMEOUT_S = 120.0
UI_STOP_TIMEOUT_S = 15.0

# the keys of every object of ``status --json``, in this order
JSON_KEYS = ("number", "state", "best", "r", "alpha", "alpha_per_r", "targets", "lr", "dropout", "seed_index",
             "value", "values", "last_step", "last_intermediate_value", "datetime_start", "datetime_complete",
             "duration_s", "fail", "error", "mlflow_run_id", "worker", "stale", "stage", "rung")


# --------------------------------------------------------------------------- naming the sweep

def resolve(args: argparse.Namespace) -> SweepConfig:
    return resolve_sweep(args.sweep, args.set or [], home=args.home, storage=args.storage)


# --------------------------------------------------------------------------- the study, read-only

def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def load_study(config: SweepConfig) -> optuna.Study:
    from sweeps.engine.driver import load_study_readonly

    return load_study_readonly(config)


# --------------------------------------------------------------------------- MLflow, read-only

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


def _is_http(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() in ("http", "https")


def _home(cfg: TrackingConfig) -> Path:
    return Path(cfg.home).expanduser().resolve()


def read_tracking(config: SweepConfig) -> TrackingView:
    """The sweep's trial runs (by run id and by trial number); never creates or writes anything."""
    uri = existing_store_uri(config.tracking)
    view = TrackingView(uri=uri, experiment=config.experiment())
    missing = missing_store(uri)
    if missing is not None:
        view.note = f"no MLflow store at {missing}: fail reasons from MLflow are not shown"
        return view
    try:
        from mlflow import MlflowClient

        from sweeps.tracking.store import quiet_mlflow

        with quiet_mlflow(), short_http_retries():
            client = MlflowClient(tracking_uri=uri)
            exp = client.get_experiment_by_name(view.experiment)
            if exp is None:
                view.note = f"no MLflow experiment {view.experiment!r} in {uri} (yet)"
                return view
            view.experiment_id = exp.experiment_id
            token = None
            name = config.name.replace("'", "\\'")
            while True:
                page = client.search_runs([exp.experiment_id], filter_string=f"tags.`optuna.study_name` = '{name}'",
                                          max_results=1000, page_token=token)
                for run in page:
                    tags = run.data.tags
                    if tags.get("lora_sweep.kind") != "trial":
                        continue
                    info = RunInfo(run.info.run_id, run.info.status, tags.get(ERROR_TAG) or tags.get(REASON_TAG))
                    view.by_id[info.run_id] = info
                    number = tags.get("optuna.trial_number")
                    if number is not None and number.isdigit():
                        view.by_trial.setdefault(int(number), info)  # newest first: keep the newest
                token = page.token
                if not token:
                    break
    except Exception as exc:  # any store problem: the table is still useful without it
        why = _first_line(exc)
        why = why if len(why) <= 120 else why[:119] + "…"
        view.note = f"cannot read the MLflow store {uri} ({why}): fail reasons from MLflow are not shown"
    return view


# --------------------------------------------------------------------------- the rows

@dataclass
class TrialRow:
    """One trial as ``status`` shows it; :meth:`as_json` gives the ``--json`` object."""

    number: int
    state: str
    best: bool = False
    r: int | None = None
    alpha: float | None = None
    alpha_per_r: float | None = None
    targets: str | None = None
    lr: float | None = None
    dropout: float | None = None
    seed_index: int | None = None
    value: float | None = None
    values: list[float] | None = None
    last_step: int | None = None
    last_intermediate_value: float | None = None
    datetime_start: str | None = None
    datetime_complete: str | None = None
    duration_s: float | None = None
    fail: str | None = None
    error: str | None = None
    mlflow_run_id: str | None = None
    worker: dict[str, Any] | None = None
    stale: bool = False
    stage: int | None = None        # a ladder's stage (0 lr calibration, 1 rank ladder, 2 wider target sets)
    rung: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {key: _finite(getattr(self, key)) for key in JSON_KEYS}


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _params(t: FrozenTrial) -> dict[str, Any]:
    if t.params:
        return dict(t.params)
    return dict(t.system_attrs.get("fixed_params") or {})  # a WAITING trial: what was enqueued


def sweep_rows(study: optuna.Study, tracking: TrackingView | None = None, now: float | None = None) -> list[TrialRow]:
    """Every trial of the study, in number order."""
    from optuna.trial import TrialState

    from sweeps.engine import driver

    now_ts = time.time() if now is None else now
    me = driver.Worker.current()
    best = {t.number for t in driver.best_trials(study)}
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        p = _params(t)
        row = TrialRow(number=t.number, state=t.state.name, best=t.number in best)
        row.r = int(p["r"]) if "r" in p else None
        row.alpha = float(p["alpha"]) if "alpha" in p else None
        row.alpha_per_r = float(p["alpha_per_r"]) if "alpha_per_r" in p else None
        row.targets = str(p["targets"]) if "targets" in p else None
        row.lr = float(p["lr"]) if "lr" in p else None
        row.dropout = float(p["dropout"]) if "dropout" in p else None
        seed = t.user_attrs.get(driver.SEED_INDEX)
        row.seed_index = int(seed) if seed is not None else None
        if driver.STAGE_ATTR in t.user_attrs:
            row.stage, row.rung = int(t.user_attrs[driver.STAGE_ATTR]), int(t.user_attrs[driver.RUNG_ATTR])
        if t.state == TrialState.COMPLETE and t.values:
            row.values = [float(v) for v in t.values]
            row.value = row.values[0]
        if t.intermediate_values:
            row.last_step = max(t.intermediate_values)
            row.last_intermediate_value = float(t.intermediate_values[row.last_step])
        if t.datetime_start:
            row.datetime_start = t.datetime_start.isoformat()
            end = t.datetime_complete.timestamp() if t.datetime_complete else now_ts
            row.duration_s = max(0.0, end - t.datetime_start.timestamp())
        if t.datetime_complete:
            row.datetime_complete = t.datetime_complete.isoformat()
        row.fail = t.user_attrs.get(driver.FAIL_ATTR)
        row.mlflow_run_id = t.user_attrs.get(driver.RUN_ID_ATTR)
        run = None
        if tracking is not None:
            run = tracking.by_id.get(row.mlflow_run_id or "") or tracking.by_trial.get(t.number)
        if run is not None:
            row.mlflow_run_id = row.mlflow_run_id or run.run_id
            if t.state == TrialState.FAIL:
                row.error = run.error
        worker = t.user_attrs.get(driver.WORKER_ATTR)
        if isinstance(worker, dict):
            row.worker = {"host": worker.get("host"), "pid": worker.get("pid")}
        if t.state == TrialState.RUNNING:
            row.stale = driver.is_stale(t, me, now_ts)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- formatting

def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _alpha(row: TrialRow) -> str:
    if row.alpha_per_r is not None:
        return f"{row.alpha_per_r:g}r"
    return "-" if row.alpha is None else f"{row.alpha:g}"


def _state(row: TrialRow) -> str:
    if row.state != "RUNNING":
        return row.state
    if row.worker:
        text = f"running (pid {row.worker.get('pid')} on {row.worker.get('host')})"
    else:
        text = "running (no worker yet)"
    return text + (" stale?" if row.stale else "")


def _objective_value(name: str, value: float) -> str:
    return f"{value:,.0f}" if name == "trainable_params" and math.isfinite(value) else f"{value:.4g}"


def _value_cells(row: TrialRow, objectives: list[str]) -> list[str]:
    if row.values:
        return [_objective_value(o, v) for o, v in zip(objectives, row.values, strict=False)]
    if row.last_step is not None and row.state in ("PRUNED", "RUNNING"):
        what = "pruned" if row.state == "PRUNED" else "now"
        first = f"{what} {_num(row.last_intermediate_value, 4)} @ step {row.last_step}"
        return [first] + ["-"] * (len(objectives) - 1)
    return ["-"] * len(objectives)


def _why(row: TrialRow) -> str:
    parts = [p for p in (row.fail, row.error) if p]
    return ": ".join(parts) if parts else ""


def _elapsed(rows: list[TrialRow], now: float) -> float | None:
    starts = [dt.datetime.fromisoformat(r.datetime_start).timestamp() for r in rows if r.datetime_start]
    if not starts:
        return None
    if any(r.state == "RUNNING" for r in rows):
        end = now
    else:
        ends = [dt.datetime.fromisoformat(r.datetime_complete).timestamp() for r in rows if r.datetime_complete]
        end = max(ends) if ends else now
    return max(0.0, end - min(starts))


def _params_text(row: TrialRow) -> str:
    return (f"r={row.r} alpha={_alpha(row)} targets={row.targets} lr={_num(row.lr)} dropout={_num(row.dropout)} "
            f"seed_index={row.seed_index}")


def print_status(console: Console, config: SweepConfig, study: optuna.Study, rows: list[TrialRow],
                 tracking: TrackingView, now: float) -> None:
    from rich.table import Table

    from sweeps.engine.driver import PARENT_ATTR, storage_label

    task = config.model.task
    objectives = [config.search.objective_name(task)]
    if config.search.second_objective:
        objectives.append(config.search.second_objective)
    directions = [d.name.lower() for d in study.directions]
    counts = {s: 0 for s in STATES}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    star = STAR if (console.encoding or "").lower().startswith("utf") else "*"
    data = config.data.name or config.data.files
    console.print(f"sweep [bold]{config.name}[/]: {config.model.name} on {data}")
    console.print(f"  strategy {config.search.strategy}, objective "
                  + ", ".join(f"{o} ({d})" for o, d in zip(objectives, directions, strict=False))
                  + f", budget {config.search.budget()} trials"
                  + (f" (n_trials {config.search.n_trials})" if config.search.n_trials != config.search.budget() else ""))
    console.print(f"  storage {storage_label(config)}")
    done = counts["COMPLETE"] + counts["PRUNED"]
    console.print(f"  {done}/{config.search.budget()} done: " + ", ".join(f"{s} {counts[s]}" for s in STATES)
                  + f"; elapsed {_duration(_elapsed(rows, now))}")
    best = [r for r in rows if r.best]
    if not best:
        console.print("  best: no trial completed yet")
    elif len(directions) == 1:
        b = best[0]
        console.print(f"  best: trial {b.number} {star}  {objectives[0]} {b.value:.6g}  ({_params_text(b)})",
                      style="green")
    else:
        console.print(f"  Pareto front ({len(best)} trials):", style="green")
        for b in best:
            values = ", ".join(f"{o} {v:,.0f}" if o == "trainable_params" else f"{o} {v:.6g}"
                               for o, v in zip(objectives, b.values or [], strict=False))
            console.print(f"    trial {b.number} {star}  {values}  ({_params_text(b)})", style="green")
    parent = study.user_attrs.get(PARENT_ATTR)
    console.print(f"  MLflow: experiment {tracking.experiment!r}"
                  + (f" (id {tracking.experiment_id})" if tracking.experiment_id else "")
                  + f" in {tracking.uri}" + (f", parent run {parent}" if parent else ""))
    if tracking.note:
        console.print(f"  note: {tracking.note}", style="yellow")

    table = Table(title=f"sweep {config.name}: {len(rows)} trials", title_justify="left")
    table.add_column("", no_wrap=True)  # the best marker
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True)
    ladder = any(row.stage is not None for row in rows)
    if ladder:
        table.add_column("stage:rung", justify="right", no_wrap=True)
    for name in ("r", "alpha", "targets", "lr", "dropout", "seed"):
        table.add_column(name, justify="left" if name == "targets" else "right", no_wrap=True)
    for name in objectives:
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("duration", justify="right", no_wrap=True)
    table.add_column("fail reason", overflow="fold")
    table.add_column("MLflow run", no_wrap=True)
    styles = {"COMPLETE": "", "PRUNED": "dim", "FAIL": "red", "RUNNING": "cyan", "WAITING": "dim"}
    for row in rows:
        state = _state(row)
        stage = [] if not ladder else ["-" if row.stage is None else f"{row.stage}:{row.rung}"]
        table.add_row(star if row.best else "", str(row.number), state, *stage,
                      "-" if row.r is None else str(row.r), _alpha(row), row.targets or "-", _num(row.lr),
                      _num(row.dropout), "-" if row.seed_index is None else str(row.seed_index),
                      *_value_cells(row, objectives), _duration(row.duration_s), _why(row),
                      (row.mlflow_run_id or "-")[:8],
                      style="yellow" if row.stale else ("bold green" if row.best else styles.get(row.state, "")))
    console.print(table)


# --------------------------------------------------------------------------- status

def status(args: argparse.Namespace) -> int:
    """``lora-sweep status SWEEP [--json]``: every trial of the sweep; exit 0."""
    config = resolve(args)
    study = load_study(config)
    tracking = read_tracking(config)
    now = time.time()
    rows = sweep_rows(study, tracking, now)
    if getattr(args, "json", False):
        if tracking.note:
            print(f"note: {tracking.note}", file=sys.stderr)
        sys.stdout.write(json.dumps([r.as_json() for r in rows], indent=2, allow_nan=False) + "\n")
        sys.stdout.flush()
        return 0
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:  # a pipe or a file: do not squeeze the table into 80 columns
        console = Console(highlight=False, width=max(console.width, 200))
    print_status(console, config, study, rows, tracking, now)
    return 0


# --------------------------------------------------------------------------- ui

def _ui_target(args: argparse.Namespace) -> tuple[TrackingConfig, str | None]:
    """The tracking config to serve, and the sweep's experiment (None without a SWEEP)."""
    if args.sweep:
        config = resolve(args)
        return config.tracking, config.experiment()
    from sweeps.config.trial import apply_overrides, from_dict

    data: dict[str, Any] = {"tracking": {"home": args.home or DEFAULT_HOME}}
    for item in args.set or []:
        if not item.split("=", 1)[0].strip().startswith("tracking."):
            raise LoraError(f"--set {item}: without a SWEEP only tracking.* can be set",
                            hint="e.g. --set tracking.uri=sqlite:////abs/mlflow.db, or name the sweep")
    apply_overrides(data, list(args.set or []))
    return from_dict(TrackingConfig, data["tracking"]), None


def _check_port(port: int) -> int:
    """``port``, or a free port when 0; a taken port is an error."""
    if not 0 <= port <= 65535:
        raise LoraError(f"--port {port} is not a port number", hint="1-65535, or --port 0 for a free one")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is fine
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise LoraError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}",
                            hint="another program uses it: pick another with --port N, or --port 0 for a free "
                                 "one") from None
        return s.getsockname()[1]


def _get_json(url: str, timeout: float = 5.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def _experiment_page(base: str, experiment: str | None) -> tuple[str, str | None]:
    """(the page to open, a note): the experiment's page when the server knows it."""
    if not experiment:
        return base + "/", None
    query = urllib.parse.urlencode({"experiment_name": experiment})
    try:
        exp = _get_json(f"{base}/api/2.0/mlflow/experiments/get-by-name?{query}")["experiment"]
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return base + "/", f"no experiment {experiment!r} in this store yet"
        return base + "/", f"could not look up experiment {experiment!r}: HTTP {exc.code}"
    except (OSError, ValueError, KeyError) as exc:
        return base + "/", f"could not look up experiment {experiment!r}: {_first_line(exc)}"
    return f"{base}/#/experiments/{exp['experiment_id']}", None


def _local_store(cfg: TrackingConfig) -> tuple[str, str | None]:
    """(backend store URI, default artifact root) of a store on this machine; it must exist."""
    uri = existing_store_uri(cfg)
    missing = missing_store(uri)
    if missing is not None:
        what = "no MLflow store" if cfg.uri else f"no MLflow store in {_home(cfg)}"
        raise LoraError(f"{what}: {missing} does not exist",
                        hint="run a sweep first (lora-sweep run), or pass --home DIR (or the SWEEP) where "
                             "sweeps were run")
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    local = scheme in ("", "file", "sqlite") or len(scheme) == 1
    return uri, ((_home(cfg) / "artifacts").as_uri() if local else None)


def _server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # no background job runners for a viewer
    return env


def _child_setup() -> None:  # pragma: no cover - runs in the child between fork and exec
    """The server gets its own session (Ctrl-C reaches only us; we stop it), and on Linux SIGTERM when
    we die, so that even a killed ``lora-sweep ui`` leaves no server behind."""
    os.setsid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group, then SIGKILL for whatever is left after a while."""
    pgid = proc.pid  # the session leader: its pid is the group id
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + UI_STOP_TIMEOUT_S
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=UI_STOP_TIMEOUT_S)
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _group_alive(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=UI_STOP_TIMEOUT_S)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP stop the UI as Ctrl-C does (so the server is stopped too)."""
    saved = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is None:
            continue
        with contextlib.suppress(ValueError):  # not the main thread: leave the signals alone
            saved[sig] = signal.signal(sig, _raise_interrupt)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _wait_until_up(proc: subprocess.Popen[bytes], base: str, log: Path) -> None:
    deadline = time.monotonic() + UI_START_TIMEOUT_S
    while True:
        code = proc.poll()
        if code is not None:
            tail = _tail(log)
            taken = "address already in use" in tail.lower() or "errno 98" in tail.lower()
            raise LoraError(f"the MLflow UI exited with code {code} while starting"
                            + (f":\n{tail}" if tail else ""),
                            hint="the port was taken meanwhile: try --port 0" if taken
                            else f"see its log {log}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            raise LoraError(f"the MLflow UI did not answer {base}/health within {UI_START_TIMEOUT_S:.0f} s",
                            hint=f"see its log {log}")
        time.sleep(0.2)


def ui(args: argparse.Namespace) -> int:
    """``lora-sweep ui [SWEEP] [--port P]``: serve the MLflow UI on 127.0.0.1 until Ctrl-C (exit 0)."""
    cfg, experiment = _ui_target(args)
    if cfg.uri and _is_http(cfg.uri):
        base = cfg.uri.rstrip("/")
        page, _ = _experiment_page(base, experiment)
        print(f"the sweeps' tracking server is {base}; nothing to start. Open {page}", flush=True)
        return 0
    backend, artifacts = _local_store(cfg)
    port = _check_port(int(args.port))
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", backend, "--workers", "1"]
    if artifacts:
        cmd += ["--default-artifact-root", artifacts, "--no-serve-artifacts"]
    fd, log_name = tempfile.mkstemp(prefix="lora-sweep-ui-", suffix=".log")
    log = Path(log_name)
    keep_log = False
    proc: subprocess.Popen[bytes] | None = None
    with _terminate_as_interrupt():
        try:
            with os.fdopen(fd, "wb") as out:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        env=_server_env(), preexec_fn=_child_setup)
            try:
                _wait_until_up(proc, base, log)
            except LoraError:
                keep_log = True
                raise
            page, note = _experiment_page(base, experiment)
            print(f"MLflow UI for {backend}: {page}", flush=True)
            if note:
                print(f"  ({note})", flush=True)
            print(f"Ctrl-C stops it (server log: {log})", flush=True)
            code = proc.wait()
            keep_log = True
            print(f"error: the MLflow UI exited by itself with code {code}", file=sys.stderr)
            tail = _tail(log)
            if tail:
                print(tail, file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("stopping the MLflow UI", file=sys.stderr, flush=True)
            return 0
        finally:
            if proc is not None and (proc.poll() is None or _group_alive(proc.pid)):
                _stop(proc)
            if not keep_log:
                with contextlib.suppress(OSError):
                    log.unlink()
