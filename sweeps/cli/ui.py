"""``lora-sweep ui [SWEEP] [--port P]``: the MLflow UI for a sweep's tracking store, on 127.0.0.1.

``ui`` starts ``python -m mlflow server`` (the interpreter running lora-sweep) bound to 127.0.0.1 for
the sweep's store (``sqlite:///<home>/mlflow.db``, artifacts ``<home>/artifacts``), waits until it
answers ``/health``, prints its URL, and runs until Ctrl-C, which stops the server and its workers (its
own process group) and exits 0. When ``tracking.uri`` is already an ``http(s)://`` server, its URL is
printed and nothing is started.

The URL is the runs table of the sweep's experiment (the named sweep's, else the latest sweep's, else the
experiments list), in MLflow 3's "Model training" view (``workflowType=machine_learning``: MLflow 3.17
otherwise opens an experiment on its GenAI overview), sorted by the trials' objective value (the metric
``final_<objective>``), best first (any order but the start time lists the trial runs flat instead of
folded under the sweep's parent run, which comes last):
``http://127.0.0.1:5000/#/experiments/<id>/runs?workflowType=machine_learning&orderByKey=metrics.`final_accuracy`&orderByAsc=false``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_core import LoraError
from sweeps.api.interrupt import terminate_as_interrupt
from sweeps.cli.stored import resolve_args
from sweeps.config.ref import DEFAULT_HOME
from sweeps.config.trial import TrackingConfig
from sweeps.engine.liveness import process_alive
from sweeps.names import DIRECTION_TAG, KIND_TAG, OBJECTIVE_TAG
from sweeps.secrets import strip_credentials
from sweeps.text import first_line, mask_url
from sweeps.tracking.store import (
    client_for,
    existing_store_uri,
    home_dir,
    is_http,
    is_local_store,
    missing_store,
    quiet_mlflow,
    short_http_retries,
)

if TYPE_CHECKING:
    from sweeps.config.sweep import SweepConfig

__all__ = ["DEFAULT_PORT", "runs_page", "sweep_runs_url", "ui"]

DEFAULT_PORT = 5000
UI_START_TIMEOUT_S = 120.0
UI_STOP_TIMEOUT_S = 15.0
ML_VIEW = {"workflowType": "machine_learning"}  # MLflow 3's "Model training" side of its GenAI switch

Sort = tuple[str, bool]  # (the metric the runs table is sorted by, ascending)


# --------------------------------------------------------------------------- pages

def runs_page(base: str, experiment_id: str, sort: Sort | None = None) -> str:
    """The URL of an experiment's runs table in MLflow 3's UI (its hash route
    ``/experiments/:experimentId/:tabName`` with the tab ``runs``), sorted by the metric of ``sort``."""
    query = dict(ML_VIEW)
    if sort:
        query |= {"orderByKey": f"metrics.`{sort[0]}`", "orderByAsc": str(sort[1]).lower()}
    return f"{base}/#/experiments/{experiment_id}/runs?{urllib.parse.urlencode(query)}"


def experiments_page(base: str) -> str:
    return f"{base}/#/experiments?{urllib.parse.urlencode(ML_VIEW)}"


def _objective_sort(objective: str, direction: str) -> Sort:
    """A trial run's objective value is its metric ``final_<objective>``: best first."""
    return f"final_{objective}", direction == "minimize"


def sweep_sort(config: SweepConfig) -> Sort:
    task = config.model.task
    return _objective_sort(config.search.objective_name(task), config.search.objective_direction(task))


def _public(uri: str) -> str:
    """A tracking server's URL to print and open in a browser: without credentials."""
    return (strip_credentials(uri) or uri).rstrip("/")


def sweep_runs_url(config: SweepConfig, base: str | None = None) -> str | None:
    """The runs table of the sweep's experiment as ``lora-sweep ui`` serves it (on :data:`DEFAULT_PORT`;
    a tracking server's own URL), or None when the experiment cannot be looked up."""
    uri = config.tracking.uri
    base = base or (_public(uri) if uri and is_http(uri) else f"http://127.0.0.1:{DEFAULT_PORT}")
    try:
        with quiet_mlflow(), short_http_retries():
            exp = client_for(config.tracking).get_experiment_by_name(config.experiment())
    except Exception:  # best effort: a URL to print, nothing depends on it
        return None
    return runs_page(base, exp.experiment_id, sweep_sort(config)) if exp is not None else None


# --------------------------------------------------------------------------- ui

def _ui_target(args: argparse.Namespace) -> tuple[TrackingConfig, str | None, Sort | None]:
    """The tracking config to serve, the sweep's experiment and its runs' order (None without a SWEEP)."""
    if args.sweep:
        config = resolve_args(args, loads_model=False)
        return config.tracking, config.experiment(), sweep_sort(config)
    from sweeps.config.trial import apply_overrides, from_dict

    data: dict[str, Any] = {"tracking": {"home": args.home or DEFAULT_HOME}}
    for item in args.set or []:
        if not item.split("=", 1)[0].strip().startswith("tracking."):
            raise LoraError(f"--set {item}: without a SWEEP only tracking.* can be set",
                            hint="e.g. --set tracking.uri=sqlite:////abs/mlflow.db, or name the sweep")
    apply_overrides(data, list(args.set or []))
    return from_dict(TrackingConfig, data["tracking"]), None, None


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


def _post_json(url: str, body: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.loads(resp.read())


def _latest_sweep_page(base: str) -> str | None:
    """The runs table of the experiment of the sweep that started last (its parent run's), if any."""
    api = f"{base}/api/2.0/mlflow"
    try:
        exps = _post_json(f"{api}/experiments/search", {"max_results": 1000}).get("experiments", [])
        ids = [e["experiment_id"] for e in exps]
        if not ids:
            return None
        runs = _post_json(f"{api}/runs/search", {
            "experiment_ids": ids[:100], "filter": f"tags.`{KIND_TAG}` = 'sweep'", "max_results": 1,
            "order_by": ["attributes.start_time DESC"]}).get("runs", [])
    except (OSError, ValueError, KeyError):
        return None
    if not runs:
        return None
    tags = {t["key"]: t["value"] for t in runs[0].get("data", {}).get("tags", [])}
    objective = tags.get(OBJECTIVE_TAG, "").split(",")[0]
    sort = _objective_sort(objective, tags.get(DIRECTION_TAG, "").split(",")[0]) if objective else None
    return runs_page(base, runs[0]["info"]["experiment_id"], sort)


def _experiment_page(base: str, experiment: str | None, sort: Sort | None = None) -> tuple[str, str | None]:
    """(the page to open, a note): the experiment's runs table when the server knows it; without an
    experiment, the latest sweep's, else the experiments list."""
    if not experiment:
        return _latest_sweep_page(base) or experiments_page(base), None
    query = urllib.parse.urlencode({"experiment_name": experiment})
    try:
        exp = _get_json(f"{base}/api/2.0/mlflow/experiments/get-by-name?{query}")["experiment"]
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return experiments_page(base), f"no experiment {experiment!r} in this store yet"
        return experiments_page(base), f"could not look up experiment {experiment!r}: HTTP {exc.code}"
    except (OSError, ValueError, KeyError) as exc:
        return experiments_page(base), f"could not look up experiment {experiment!r}: {first_line(exc)}"
    return runs_page(base, exp["experiment_id"], sort), None


def _local_store(cfg: TrackingConfig) -> tuple[str, str | None]:
    """(backend store URI, default artifact root) of a store on this machine; it must exist."""
    uri = existing_store_uri(cfg)
    missing = missing_store(uri)
    if missing is not None:
        what = "no MLflow store" if cfg.uri else f"no MLflow store in {home_dir(cfg)}"
        raise LoraError(f"{what}: {missing} does not exist",
                        hint="run a sweep first (lora-sweep run), or pass --home DIR (or the SWEEP) where "
                             "sweeps were run")
    return uri, ((home_dir(cfg) / "artifacts").as_uri() if is_local_store(uri) else None)


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


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group, then SIGKILL for whatever is left after a while."""
    pgid = proc.pid  # the session leader: its pid is the group id
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + UI_STOP_TIMEOUT_S
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=UI_STOP_TIMEOUT_S)
    while process_alive(pgid, group=True) and time.monotonic() < deadline:
        time.sleep(0.1)
    if process_alive(pgid, group=True):
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
    cfg, experiment, sort = _ui_target(args)
    if cfg.uri and is_http(cfg.uri):
        base = _public(cfg.uri)
        page, _ = _experiment_page(base, experiment, sort)
        print(f"the sweeps' tracking server is {base}; nothing to start. Open {page}", flush=True)
        return 0
    backend, artifacts = _local_store(cfg)
    port = _check_port(int(args.port))
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]  # the backend store URI (it may hold a password) goes in the environment
    if artifacts:
        cmd += ["--default-artifact-root", artifacts, "--no-serve-artifacts"]
    fd, log_name = tempfile.mkstemp(prefix="lora-sweep-ui-", suffix=".log")
    log = Path(log_name)
    keep_log = False
    proc: subprocess.Popen[bytes] | None = None
    with terminate_as_interrupt():  # SIGTERM and SIGHUP stop the UI (and its server) as Ctrl-C does
        try:
            with os.fdopen(fd, "wb") as out:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        env={**_server_env(), "MLFLOW_BACKEND_STORE_URI": backend},
                                        preexec_fn=_child_setup)
            try:
                _wait_until_up(proc, base, log)
            except LoraError:
                keep_log = True
                raise
            page, note = _experiment_page(base, experiment, sort)
            print(f"MLflow UI for {mask_url(backend)}: {page}", flush=True)
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
            if proc is not None and (proc.poll() is None or process_alive(proc.pid, group=True)):
                _stop(proc)
            if not keep_log:
                with contextlib.suppress(OSError):
                    log.unlink()
