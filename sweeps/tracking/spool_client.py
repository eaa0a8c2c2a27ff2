"""An ``MlflowClient`` whose writes go through the spool (:mod:`sweeps.tracking.spool`), and its sender.

    >>> client = SpoolingClient("http://tracking:5000", home=Path("lora-sweeps"))
    >>> run = client.create_run(experiment_id, tags=...)     # returns at once, server up or down
    >>> client.log_batch(run.info.run_id, metrics=...)        # appended to the spool, sent in order
    >>> client.close(timeout_s=120)                           # waits for the spool to drain (bounded)

Writes (``create_run``, ``log_batch``, ``set_tag``, ``set_terminated``, ``update_run``, ``log_text``,
``log_dict``, ``log_artifact(s)``) return once the write is on disk; reads go to the server as usual,
except the experiment lookup that every trial makes, which is answered from a cache kept in the home
(so that trials start while the server is down, also in a worker restarted during an outage).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Experiment, Metric, Param, Run, RunData, RunInfo, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

from sweeps.secrets import private_file, strip_credentials
from sweeps.text import mask_url
from sweeps.tracking.sender import HTTP_ENV, Sender, err
from sweeps.tracking.spool import (
    PROVISIONAL_PREFIX,
    RUN_KEY_TAG,
    Spool,
    classify,
    is_provisional,
    orphan_spools,
    spool_dir,
    wait_for,
)

log = logging.getLogger(__name__)

__all__ = ["DRAIN_TIMEOUT_S", "SpoolingClient"]

DRAIN_TIMEOUT_S = float(os.environ.get("LORA_SWEEP_DRAIN_TIMEOUT_S", "120"))
SETTLE_S = 5.0  # how long create_run waits for earlier writes to drain to get the run's real id at once


def _now_ms() -> int:
    return int(time.time() * 1000)


class SpoolingClient(MlflowClient):
    """See the module docstring. One per process; :meth:`close` it at the end."""

    def __init__(self, tracking_uri: str, home: Path, echo: Callable[[str], None] = err) -> None:
        for key, value in HTTP_ENV.items():
            os.environ.setdefault(key, value)
        super().__init__(tracking_uri=tracking_uri)
        self.home, self.echo = home, echo
        self.spool = Spool.create(home, tracking_uri)
        adopted = [s for s in (Spool.adopt(p) for p in orphan_spools(home) if p != self.spool.path) if s]
        for s in adopted:
            echo(f"replaying {s.pending()} MLflow writes left in {s.path} by a process that ended")
        self._exp_file = spool_dir(home) / "experiments.json"
        self._exp_key = strip_credentials(tracking_uri) or tracking_uri  # stored: no credentials
        self.sender = Sender([*adopted, self.spool], self._experiment_ids, echo)
        self.sender.start()
        self.closed = False

    # ------------------------------------------------------------------ experiments (cached)
    def _cache(self) -> dict[str, Any]:
        try:
            data = json.loads(self._exp_file.read_text())
        except (OSError, ValueError):
            return {}
        return data.get(self._exp_key, {}) if isinstance(data, dict) else {}

    def _remember(self, exp: Experiment) -> None:
        try:
            data = json.loads(self._exp_file.read_text())
        except (OSError, ValueError):
            data = {}
        data.setdefault(self._exp_key, {})[exp.name] = [exp.experiment_id, exp.artifact_location]
        tmp = private_file(self._exp_file.with_suffix(f".{os.getpid()}.tmp"))
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self._exp_file)

    def _experiment_ids(self) -> list[str]:
        return sorted({v[0] for v in self._cache().values()})

    def get_experiment_by_name(self, name: str) -> Experiment | None:
        cached = self._cache().get(name)
        if cached:
            return Experiment(cached[0], name, cached[1], "active")
        exp = super().get_experiment_by_name(name)
        if exp is not None and exp.lifecycle_stage == "active":
            self._remember(exp)
        return exp

    def create_experiment(self, name: str, artifact_location: str | None = None,
                          tags: dict[str, Any] | None = None) -> str:
        exp_id = super().create_experiment(name, artifact_location=artifact_location, tags=tags)
        exp = super().get_experiment(exp_id)
        self._remember(exp)
        return str(exp_id)

    def get_run(self, run_id: str) -> Run:
        if is_provisional(run_id):
            real = self.spool.real_id(run_id) or self._resolve(run_id)
            if real is None:
                raise MlflowException(f"run {run_id} has not reached the server yet",
                                      error_code=TEMPORARILY_UNAVAILABLE)
            run_id = real
        return super().get_run(run_id)

    def _resolve(self, run_id: str) -> str | None:
        for s in self.sender.spools:
            real = s.real_id(run_id)
            if real:
                return real
        return None

    def spooled_run_ids(self, tags: dict[str, str]) -> list[str]:
        """The provisional ids of runs with these tags whose creation is still in a spool (this process's
        or one it adopted): recovery ends a dead worker's run that has not reached the server yet."""
        out = []
        for s in self.sender.spools:
            for op in s.ops("create_run"):
                if all(op.args["tags"].get(k) == v for k, v in tags.items()):
                    out.append(PROVISIONAL_PREFIX + op.args["key"])
        return out

    # ------------------------------------------------------------------ writes
    def create_run(self, experiment_id: str, start_time: int | None = None, tags: dict[str, Any] | None = None,
                   run_name: str | None = None) -> Run:
        key = uuid.uuid4().hex
        start_time = start_time or _now_ms()
        all_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        all_tags[RUN_KEY_TAG] = key
        maybe_sent = False
        if self.sender.healthy and wait_for(self.sender.idle, SETTLE_S):
            try:
                tags_now = {k: (self._resolve(v) or v) if is_provisional(v) else v for k, v in all_tags.items()}
                run: Run = super().create_run(experiment_id, start_time=start_time, tags=tags_now,
                                              run_name=run_name)
                return run
            except MlflowException as exc:
                permanent, maybe_sent = classify(exc)
                if permanent:
                    raise
                self.sender._went_down(exc)
        self.spool.append("create_run", {"experiment_id": experiment_id, "start_time": start_time,
                                         "tags": all_tags, "run_name": run_name, "key": key})
        if maybe_sent:
            head = self.spool.head()
            if head is not None and head.op == "create_run" and head.args.get("key") == key:
                self.spool.failed(head, True)
        self.sender.wake.set()
        info = RunInfo(run_id=PROVISIONAL_PREFIX + key, experiment_id=experiment_id, user_id="", status="RUNNING",
                       start_time=start_time, end_time=None, lifecycle_stage="active", run_name=run_name)
        return Run(info, RunData())

    def _append(self, op: str, args: dict[str, Any], files: Path | None = None) -> None:
        self.spool.append(op, args, files)
        self.sender.wake.set()

    def log_batch(self, run_id: str, metrics: Sequence[Metric] = (), params: Sequence[Param] = (),
                  tags: Sequence[RunTag] = (), synchronous: bool | None = None) -> None:
        self._append("log_batch", {"run_id": run_id,
                                   "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics],
                                   "params": [[p.key, p.value] for p in params],
                                   "tags": [[t.key, str(t.value)] for t in tags]})

    def set_tag(self, run_id: str, key: str, value: Any, synchronous: bool | None = None) -> None:
        self.log_batch(run_id, tags=[RunTag(key, str(value))])

    def set_terminated(self, run_id: str, status: str | None = None, end_time: int | None = None) -> None:
        self._append("set_terminated", {"run_id": run_id, "status": status or "FINISHED",
                                        "end_time": end_time or _now_ms()})

    def update_run(self, run_id: str, status: str | None = None, name: str | None = None) -> None:
        self._append("update_run", {"run_id": run_id, "status": status, "name": name})

    def _stage(self) -> Path:
        self.spool.files_root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="stage-", dir=self.spool.files_root))

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
        stage = self._stage()
        shutil.copytree(local_dir, stage, dirs_exist_ok=True)
        self._append("log_artifacts", {"run_id": run_id, "artifact_path": artifact_path}, stage)

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        stage = self._stage()
        shutil.copy2(local_path, stage / Path(local_path).name)
        self._append("log_artifacts", {"run_id": run_id, "artifact_path": artifact_path}, stage)

    def _log_file(self, run_id: str, content: str, artifact_file: str) -> None:
        stage = self._stage()
        target = stage / Path(artifact_file).name
        target.write_text(content, encoding="utf-8")
        parent = str(Path(artifact_file).parent)
        self._append("log_artifacts", {"run_id": run_id, "artifact_path": None if parent == "." else parent}, stage)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._log_file(run_id, text, artifact_file)

    def log_dict(self, run_id: str, dictionary: dict[str, Any], artifact_file: str) -> None:
        if artifact_file.endswith((".yaml", ".yml")):
            import yaml

            content = yaml.safe_dump(dictionary, sort_keys=False)
        else:
            content = json.dumps(dictionary, indent=2)
        self._log_file(run_id, content, artifact_file)

    # ------------------------------------------------------------------ the end
    def flush(self, timeout_s: float) -> int:
        """Wait (at most ``timeout_s``) for the spool to drain; returns the writes left."""
        self.sender.wake.set()
        wait_for(lambda: self.sender.pending() == 0, timeout_s, poll_s=0.2)
        return self.sender.pending()

    def close(self, timeout_s: float = DRAIN_TIMEOUT_S) -> int:
        """Drain (bounded, one line while waiting), stop the sender, release the spool; returns the writes left."""
        if self.closed:
            return 0
        self.closed = True
        left = self.sender.pending()
        if left:
            self.echo(f"waiting for {left} MLflow writes to reach {mask_url(self.tracking_uri)} (at most {timeout_s:.0f} s)")
            left = self.flush(timeout_s)
        self.sender.stop()
        for s in self.sender.spools:
            s.close()
        if left:
            self.echo(f"warning: {left} MLflow writes could not be sent and are kept in {spool_dir(self.home)}; "
                      f"send them later with: lora-sweep sync --home {self.home}")
        return left
