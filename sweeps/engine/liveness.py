"""Which workers are alive: a worker's identity, a trial's heartbeat, and what makes a RUNNING trial stale.

Each trial carries a ``lora_sweep.worker`` user attr (host, pid, process start time) and a
``lora_sweep.heartbeat`` time refreshed every ``HEARTBEAT_S`` by a background thread. A RUNNING trial is
stale when its worker is on this host and that process no longer exists (pid gone or reused), or, for
other hosts, when its heartbeat is older than ``STALE_AFTER_S`` (counted from the end of a database outage
this process saw, if later: no heartbeat could be written during it). (Optuna's own heartbeat works only for
RDB storages and only inside ``study.optimize``, not with ask/tell, so lora-sweep keeps its own.)
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweeps.engine.dbretry import last_outage_end
from sweeps.names import (
    HEARTBEAT_ATTR,
    WORKER_ATTR,
)
from sweeps.text import first_line

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


@dataclass(frozen=True)
class Worker:
    host: str
    pid: int
    started: str  # the process start time in clock ticks since boot (Linux), to detect a reused pid

    @classmethod
    def current(cls) -> Worker:
        return cls(socket.gethostname(), os.getpid(), _process_start(os.getpid()))

    def as_attr(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "started": self.started}


def _process_start(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 (starttime), counted after "pid (comm)"


def process_alive(pid: int, *, group: bool = False) -> bool:
    """Whether process ``pid`` (or, with ``group``, any process of group ``pid``) exists; one owned by
    another user counts as alive."""
    try:
        (os.killpg if group else os.kill)(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(trial: FrozenTrial, me: Worker, now: float | None = None) -> bool:
    """Whether a RUNNING trial belongs to no live worker (see the module docstring)."""
    now = time.time() if now is None else now
    # after a database outage this process saw, heartbeats could not be written: count from its end
    outage_end = last_outage_end()
    worker = trial.user_attrs.get(WORKER_ATTR)
    if not isinstance(worker, dict):  # asked, but the worker died before naming itself
        started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
        return now - max(started, outage_end) > STALE_AFTER_S
    if worker.get("host") == me.host:
        pid = int(worker.get("pid", -1))
        if pid == me.pid and worker.get("started") == me.started:
            return False  # ours (cannot happen at start-up, but keeps the rule total)
        if not process_alive(pid):
            return True
        began = str(worker.get("started") or "")
        return bool(began) and _process_start(pid) not in ("", began)
    beat = float(trial.user_attrs.get(HEARTBEAT_ATTR, 0.0))
    return now - max(beat, outage_end) > STALE_AFTER_S


class Heartbeat:
    """Refresh ``lora_sweep.heartbeat`` on a trial every ``interval`` seconds from a daemon thread."""

    def __init__(self, trial: optuna.Trial, interval: float = HEARTBEAT_S) -> None:
        self.trial, self.interval = trial, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{trial.number}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.trial.set_user_attr(HEARTBEAT_ATTR, time.time())
            except Exception as exc:  # the trial was told meanwhile, or the storage hiccupped
                log.debug("heartbeat of trial %d: %s", self.trial.number, first_line(exc))

    def __enter__(self) -> Heartbeat:
        self.trial.set_user_attr(HEARTBEAT_ATTR, time.time())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def live_running(study: optuna.Study, me: Worker) -> list[FrozenTrial]:
    """RUNNING trials of the study whose worker is alive (see `is_stale`)."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if not is_stale(t, me)]


def wait_for_other_workers(study: optuna.Study, me: Worker, refresh: Callable[[str], None],
                           poll_s: float = 2.0) -> None:
    """Block until no live worker has a trial RUNNING, so the owner's final best includes them."""
    others = live_running(study, me)
    if not others:
        return
    refresh(f"budget reached; waiting for {len(others)} trial(s) of other workers: "
            f"{', '.join(str(t.number) for t in others)}")
    while others:
        time.sleep(poll_s)
        before = {t.number for t in others}
        others = live_running(study, me)
        if {t.number for t in others} != before:
            refresh(f"{len(others)} trial(s) of other workers still running")

