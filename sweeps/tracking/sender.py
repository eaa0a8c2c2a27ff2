"""The sender of MLflow write spools (:mod:`sweeps.tracking.spool`): it delivers them in order, one write
at a time, retrying with a backoff while the server is unreachable, and maps provisional run ids to
the ones the server gives. Used by :class:`sweeps.tracking.spool_client.SpoolingClient` (a worker's own
spool and those it adopted) and by ``lora-sweep sync`` (:func:`send_spools`).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST

from sweeps.secrets import has_credentials
from sweeps.tracking.spool import (
    BACKOFF_S,
    PERMANENT_TRIES,
    PROVISIONAL_PREFIX,
    RUN_KEY_TAG,
    Op,
    Spool,
    classify,
    describe,
    is_provisional,
    orphan_spools,
    spool_dir,
    wait_for,
)

__all__ = ["HTTP_ENV", "Sender", "send_spools"]

# MLflow's own HTTP retries block the caller for minutes when the server is down; the sender retries
# itself (with its own backoff) so that one attempt fails fast. The user's settings win.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def err(message: str) -> None:
    sys.stderr.write(message + "\n")  # one write: a line another thread prints cannot land inside it
    sys.stderr.flush()


class _NotYet(Exception):
    """A provisional run id whose run has not reached the server yet (another process's spool)."""


class Sender(threading.Thread):
    """Delivers spools in order (the first spool's writes before the next one's), retrying with backoff."""

    def __init__(self, spools: list[Spool], experiments: Callable[[], list[str]],
                 echo: Callable[[str], None] = err) -> None:
        super().__init__(name="lora-sweep-spool", daemon=True)
        self.spools = list(spools)
        self.experiments, self.echo = experiments, echo
        self.clients: dict[str, MlflowClient] = {}
        self.healthy = True
        self.down_since: float | None = None
        self.sent = 0
        self.outage_s = 0.0
        self.wake = threading.Event()
        self._halt = threading.Event()

    # ------------------------------------------------------------------ state
    def pending(self) -> int:
        return sum(s.pending() for s in self.spools)

    def idle(self) -> bool:
        return self.healthy and self.pending() == 0

    def stop(self) -> None:
        self._halt.set()
        self.wake.set()
        self.join(timeout=60)

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        attempt = 0
        while not self._halt.is_set():
            spool, op = self._next()
            if spool is None or op is None:
                self.wake.wait(0.5)
                self.wake.clear()
                continue
            try:
                self._apply(spool, op)
            except Exception as exc:
                not_yet = isinstance(exc, _NotYet)
                permanent, maybe = (False, False) if not_yet else classify(exc)
                tries = spool.failed(op, maybe)
                if permanent and tries >= PERMANENT_TRIES:
                    spool.bury(op, describe(exc))
                    self.echo(f"warning: an MLflow write ({op.op}) was refused and is kept aside in "
                              f"{spool.path}: {describe(exc)}")
                    continue
                if not permanent and not not_yet:
                    self._went_down(exc)
                self._halt.wait(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
                attempt += 1
                continue
            spool.done(op)
            self.sent += 1
            attempt = 0
            self._came_back()

    def _next(self) -> tuple[Spool | None, Op | None]:
        for spool in self.spools:
            op = spool.head()
            if op is not None:
                return spool, op
        return None, None

    def _went_down(self, exc: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.healthy = False
            self.echo(f"MLflow tracking server unreachable ({describe(exc)}); training goes on and its writes "
                      f"are spooled on disk ({self.pending()} waiting)")

    def _came_back(self) -> None:
        if self.down_since is not None:
            down = time.monotonic() - self.down_since
            self.outage_s += down
            self.down_since = None
            self.echo(f"MLflow tracking server back after {down:.0f} s; sending {self.pending()} spooled writes")
        self.healthy = True

    # ------------------------------------------------------------------ one write
    def _client(self, uri: str) -> MlflowClient:
        if uri not in self.clients:
            if has_credentials(uri):  # MLflow would print the URI when a replayed run ends
                os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
            self.clients[uri] = MlflowClient(tracking_uri=uri)
        return self.clients[uri]

    def _real(self, spool: Spool, client: MlflowClient, run_id: str) -> str:
        if not is_provisional(run_id):
            return run_id
        for s in [spool, *self.spools]:
            real = s.real_id(run_id)
            if real:
                return real
        key = run_id[len(PROVISIONAL_PREFIX):]
        found = self._find(client, key, self.experiments())
        if found is None:
            raise _NotYet(f"run {run_id} has not reached the server yet")
        spool.map_id(key, found)
        return found

    @staticmethod
    def _find(client: MlflowClient, key: str, experiment_ids: list[str]) -> str | None:
        if not experiment_ids:
            return None
        runs = client.search_runs(experiment_ids, filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1)
        return runs[0].info.run_id if runs else None

    def _text(self, spool: Spool, client: MlflowClient, value: str) -> str:
        return self._real(spool, client, value) if is_provisional(value) else value

    def _apply(self, spool: Spool, op: Op) -> None:
        client = self._client(spool.connect_uri)
        a = op.args
        if op.op == "create_run":
            key = a["key"]
            if spool.real_id(PROVISIONAL_PREFIX + key):
                return
            found = self._find(client, key, [a["experiment_id"]]) if op.maybe_sent else None
            if found is None:
                tags = {k: self._text(spool, client, v) for k, v in a["tags"].items()}
                found = client.create_run(a["experiment_id"], start_time=a["start_time"], tags=tags,
                                          run_name=a["run_name"]).info.run_id
            spool.map_id(key, found)
            return
        run_id = self._real(spool, client, a["run_id"])
        if op.op == "log_batch":
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in a["metrics"]]
            if op.maybe_sent and metrics:
                metrics = self._unsent(client, run_id, metrics)
            client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in a["params"]],
                             tags=[RunTag(k, self._text(spool, client, v)) for k, v in a["tags"]], synchronous=True)
        elif op.op == "set_terminated":
            client.set_terminated(run_id, status=a["status"], end_time=a["end_time"])
        elif op.op == "update_run":
            client.update_run(run_id, status=a["status"], name=a["name"])
        elif op.op == "log_artifacts":
            folder = spool.files_of(op)
            if folder is not None and folder.exists():
                client.log_artifacts(run_id, str(folder), a.get("artifact_path"))
        else:
            raise MlflowException(f"unknown spooled write {op.op!r}", error_code=BAD_REQUEST)

    @staticmethod
    def _unsent(client: MlflowClient, run_id: str, metrics: list[Metric]) -> list[Metric]:
        """The points of a batch that may have been applied already, less those the run holds."""
        have: set[tuple[str, int, int, float]] = set()
        for key in {m.key for m in metrics}:
            have.update((key, h.step, h.timestamp, h.value) for h in client.get_metric_history(run_id, key))
        return [m for m in metrics if (m.key, m.step, m.timestamp, m.value) not in have]


def send_spools(home: Path, timeout_s: float, echo: Callable[[str], None] = err) -> tuple[int, int, int]:
    """``lora-sweep sync``: send every spool in ``home`` that no live process owns. Returns
    (spools, writes sent, writes left)."""
    spools = [s for s in (Spool.adopt(p) for p in orphan_spools(home)) if s]
    if not spools:
        return 0, 0, 0
    os.environ.update({k: v for k, v in HTTP_ENV.items() if k not in os.environ})
    exp_file = spool_dir(home) / "experiments.json"

    def experiments() -> list[str]:
        try:
            data = json.loads(exp_file.read_text())
        except (OSError, ValueError):
            return []
        return sorted({v[0] for per_uri in data.values() for v in per_uri.values()})

    sender = Sender(spools, experiments, echo)
    sender.start()
    wait_for(lambda: sender.pending() == 0, timeout_s, poll_s=0.2)
    left = sender.pending()
    sender.stop()
    for s in spools:
        s.close()
    return len(spools), sender.sent, left
