"""``lora-sweep run --workers N``: N worker processes on this machine, one sweep; and the supervision that
``--ray`` (`sweeps.engine.ray_launch`) shares.

This process owns the sweep: it prepares the data once (the tokenised cache on disk then serves every
worker), opens or creates the study, recovers trials left by crashed workers, opens the MLflow parent
run, and starts N ``lora-sweep worker NAME`` processes, which find the sweep by name in its storage
(the study holds its config; the storage URL is in their environment, ``LORA_SWEEP_STORAGE``, never in
their arguments, which every user of the machine can read: `worker_env`). It shows progress by reading the study, relays the workers' output lines
(each prefixed with its worker), restarts a worker that died (after failing and re-queuing its trial;
at most ``MAX_RESTARTS_PER_WORKER`` times), waits for all of them, then tags the best trial, evaluates the
recommended and best-quality configurations on the test split once (`sweeps.engine.holdout`) and ends
the parent run. Where the workers run is a `Launcher`'s business: processes here (`LocalLauncher`),
Ray actors (`sweeps.engine.ray_launch`), or none at all (``--workers 0``: workers started elsewhere, by
Slurm or Kubernetes, run the trials; this process follows the study until the budget is done). Local workers on a machine
without GPUs are forked from one process that has already imported torch and the rest
(`sweeps.engine.forked`), so N workers do not each spend seconds importing; with GPUs, or with
``LORA_SWEEP_WORKER_START=fresh``, each is a new ``python -m sweeps.cli worker`` process.

Devices: with GPUs, worker i gets ``CUDA_VISIBLE_DEVICES`` = the i-th visible GPU (round robin when
there are more workers than GPUs). On CPU the cores are split: each worker gets
``max(1, cores // N)`` threads (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``torch.set_num_threads``),
so N workers never ask for more threads than there are cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import optuna
from optuna.trial import TrialState

from lora_core import LoraError
from sweeps.config.sweep import SweepConfig
from sweeps.engine.liveness import Worker, live_running
from sweeps.engine.loop import end_with_test_split, prepare_sweep_data
from sweeps.engine.parent import end_parent, open_parent_run
from sweeps.engine.progress import SweepProgress, SweepResult, estimate_left, shown_budget
from sweeps.engine.recovery import recover
from sweeps.engine.selection import ladder_outcome, tag_best
from sweeps.engine.study import open_study, state_counts, storage_label, sweep_objectives
from sweeps.names import LADDER_ATTR
from sweeps.secrets import STORAGE_ENV, STORAGE_FILE_ENV, TRACKING_ENV, has_credentials, mask_text
from sweeps.tracking.store import close_client, existing_store_uri, sweep_client

__all__ = ["THREADS_ENV", "TRUSTED_CODE_ENV", "TRUSTED_MODEL_ENV", "WORKER_ENV", "Launcher", "LocalLauncher",
           "WorkerHandle", "device_plan", "run_workers", "storage_hint", "supervise", "worker_args", "worker_env",
           "worker_line"]

WORKER_ENV = "LORA_SWEEP_WORKER"      # "i/N": set in each worker started by --workers
THREADS_ENV = "LORA_SWEEP_THREADS"    # torch threads of a worker on CPU
START_ENV = "LORA_SWEEP_WORKER_START"  # "fresh": CPU workers as new processes, not forked (sweeps.engine.forked)
# what the owner was allowed to load (from the user's YAML or --trust-stored-config): its workers, which read
# the config back from the study, may load that model (and run its code when the second is "1") and no other
TRUSTED_MODEL_ENV = "LORA_SWEEP_TRUSTED_MODEL"
TRUSTED_CODE_ENV = "LORA_SWEEP_TRUSTED_REMOTE_CODE"
MAX_RESTARTS_PER_WORKER = 2
POLL_S = 1.0
RECOVER_EVERY_S = 60.0                # --workers 0: how often stale trials of remote workers are re-queued
STOP_WAIT_S = 60.0                    # Ctrl-C: how long interrupted workers get to end their trials


class WorkerHandle(Protocol):
    """One started worker, wherever it runs. ``poll`` relays the output lines that came since the last
    call and returns the exit code once the worker has ended (after its last line), else None."""

    def poll(self) -> int | None: ...

    def interrupt(self) -> None: ...

    def kill(self) -> None: ...


class Launcher(Protocol):
    """Starts the sweep's workers: ``workers`` of them, numbered 0 .. workers - 1."""

    workers: int

    def describe(self) -> list[str]:
        """Lines to print before the workers start (where they run, on which devices)."""
        ...

    def start(self, index: int, replacing: WorkerHandle | None = None) -> WorkerHandle:
        """Start worker ``index`` (again, in place of the dead ``replacing``)."""
        ...


@dataclass
class _Slot:
    index: int
    handle: WorkerHandle | None = None
    code: int | None = None
    restarts: int = 0
    done: bool = False


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no usable CUDA: a CPU machine
        return []


def device_plan(n: int, gpus: list[str] | None = None, cores: int | None = None) -> list[dict[str, str]]:
    """The environment of each of ``n`` workers (see the module docstring)."""
    gpus = _visible_gpus() if gpus is None else gpus
    cores = cores or os.cpu_count() or 1
    plans = []
    for i in range(n):
        env = {WORKER_ENV: f"{i + 1}/{n}"}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
            threads = max(1, cores // n)
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""
            threads = max(1, cores // n)
        env.update(thread_env(threads))
        plans.append(env)
    return plans


def thread_env(threads: int) -> dict[str, str]:
    """The environment that gives a worker ``threads`` CPU threads."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), THREADS_ENV: str(threads)}


def storage_hint(config: SweepConfig) -> str:
    """The ``--storage`` value to print for other machines: the URL, or ``"$LORA_SWEEP_STORAGE"`` when it
    holds a password (which is never printed)."""
    storage = config.search.storage or ""
    return f'"${STORAGE_ENV}"' if has_credentials(storage) else storage_label(config)


def worker_line(label: str, line: str) -> str:
    """A worker's output line as the owner prints it: the worker's own event lines already name it
    (``[worker i/N pid P] ...``); any other line (an error, a warning) gets ``[worker i/N]``."""
    line = mask_text(line)  # a worker's error may quote a URL it was given
    return line if line.startswith("[worker ") else f"[worker {label}] {line}"


def worker_args(config: SweepConfig) -> list[str]:
    """``lora-sweep worker`` arguments that join this sweep (after ``python -m sweeps.cli``). The storage is
    not among them: a URL may hold a password, and every user of the machine sees a command line (``ps``);
    :func:`worker_env` hands it over."""
    return ["worker", config.name, "--home", str(Path(config.tracking.home).expanduser().resolve())]


def worker_env(config: SweepConfig, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a worker of this sweep starts with: ``base`` (default: this process's) with the
    sweep's storage in ``LORA_SWEEP_STORAGE`` (read as ``--storage``; none inherited when the sweep has the
    default journal) and, when the tracking URI carries credentials, that URI in ``MLFLOW_TRACKING_URI`` (it
    gives the credential-free URI of the study's stored config its credentials back: `sweeps.secrets`); and
    the model this process was allowed to load (``LORA_SWEEP_TRUSTED_MODEL``, ``..._REMOTE_CODE``)."""
    dropped = (STORAGE_ENV, STORAGE_FILE_ENV, TRUSTED_MODEL_ENV, TRUSTED_CODE_ENV)
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in dropped}
    env[TRUSTED_MODEL_ENV] = config.model.name
    env[TRUSTED_CODE_ENV] = "1" if config.model.trust_remote_code else "0"
    storage = config.search.storage
    if storage:
        env[STORAGE_ENV] = storage if "://" in storage else str(Path(storage).expanduser().resolve())
    uri = existing_store_uri(config.tracking)
    if has_credentials(uri):
        env[TRACKING_ENV] = uri
    return env


class _LocalWorker:
    """A ``lora-sweep worker`` process on this machine; a thread relays its output lines as they come."""

    def __init__(self, cmd: list[str], env: dict[str, str], label: str, say: Callable[[str], None]) -> None:
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.relay = threading.Thread(target=self._relay, args=(label, say), daemon=True)
        self.relay.start()

    def _relay(self, label: str, say: Callable[[str], None]) -> None:
        """Print the output lines through ``say`` (so they do not tear the live status line)."""
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                say(worker_line(label, line))

    def poll(self) -> int | None:
        code = self.proc.poll()
        if code is not None:
            self.relay.join(timeout=5)  # its last lines before the owner says anything about it
        return code

    def interrupt(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class LocalLauncher:
    """Worker processes on this machine (see the module docstring for their devices); with 0 workers,
    none: the trials are run by workers started elsewhere."""

    def __init__(self, config: SweepConfig, workers: int, say: Callable[[str], None]) -> None:
        self.config, self.workers, self.say = config, workers, say
        self.plans = device_plan(workers) if workers else []
        self.args = worker_args(config)
        self.cmd = [sys.executable, "-m", "sweeps.cli", *self.args]
        # without GPUs, workers fork from one process that has imported torch & co. (sweeps.engine.forked)
        self.forked = bool(self.plans) and not any(p["CUDA_VISIBLE_DEVICES"] for p in self.plans) \
            and os.environ.get(START_ENV, "fork") != "fresh"

    def describe(self) -> list[str]:
        n, plans = self.workers, self.plans
        if n == 0:
            return [f"no workers here: start them on other machines with `lora-sweep worker {self.config.name} "
                    f"--storage {storage_hint(self.config)} --wait 600`; this process follows the study and "
                    "ends the sweep when its trials are done"]
        gpus = [p["CUDA_VISIBLE_DEVICES"] for p in plans if p["CUDA_VISIBLE_DEVICES"]]
        lines = [f"{n} workers: " + (f"GPUs {', '.join(gpus)}" if gpus else
                                     f"CPU, {plans[0][THREADS_ENV]} thread(s) each of {os.cpu_count()} cores")]
        if gpus and len(set(gpus)) < n:
            lines.append(f"note: {n} workers share {len(set(gpus))} GPU(s); workers on one GPU split its memory "
                         "and time")
        return lines

    def start(self, index: int, replacing: WorkerHandle | None = None) -> WorkerHandle:
        plan = self.plans[index]
        env = {**worker_env(self.config), **plan}
        if self.forked:
            from sweeps.engine.forked import ForkedWorker

            return ForkedWorker(self.args, env, plan[WORKER_ENV], self.say, worker_line)
        return _LocalWorker(self.cmd, env, plan[WORKER_ENV], self.say)


def run_workers(config: SweepConfig, n: int, progress: Callable[[SweepProgress], None] | None = None,
                say: Callable[[str], None] = print) -> SweepResult:
    """Run the sweep with ``n`` worker processes on this machine, or with none (``n`` = 0: the owner
    only; see the module docstring)."""
    if n < 0:
        raise LoraError(f"--workers must be >= 0, got {n}")
    return supervise(config, LocalLauncher(config, n, say), progress, say)


def trials_done(study: optuna.Study, config: SweepConfig, me: Worker, elapsed_s: float) -> bool:
    """With no worker of our own: whether the sweep is done (its budget of COMPLETE and PRUNED trials,
    the ladder's plan, or the timeout) and no live worker still runs a trial of it."""
    if live_running(study, me):
        return False
    search = config.search
    if search.timeout is not None and elapsed_s >= search.timeout:
        return True
    if search.strategy == "ladder" and (study.user_attrs.get(LADDER_ATTR) or {}).get("done"):
        return True
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))) >= \
        search.budget()


def supervise(config: SweepConfig, launcher: Launcher, progress: Callable[[SweepProgress], None] | None = None,
              say: Callable[[str], None] = print) -> SweepResult:
    """Own the sweep while ``launcher``'s workers run it (see the module docstring)."""
    n = launcher.workers
    t_start = time.perf_counter()
    data = prepare_sweep_data(config)  # fills the tokenised-data cache the workers read; the test split at the end
    study = open_study(config)
    client = sweep_client(config.tracking)
    me = Worker.current()
    recovered, requeued = recover(study, config, client, me)
    parent_run_id = open_parent_run(study, config, client)
    objectives = sweep_objectives(config)
    directions = config.search.directions(config.model.task)
    result = SweepResult(study.study_name, storage_label(config), config.experiment(), parent_run_id, "budget",
                         {}, [], objectives, directions, recovered=recovered, requeued=requeued)
    if recovered:
        say(f"resumed: failed {len(recovered)} stale trial(s) {recovered}, re-queued their seeds")
    for line in launcher.describe():
        say(line)
    slots = [_Slot(i) for i in range(n)]
    state = SweepProgress(budget=shown_budget(config), objective=objectives[0], steps=config.train.steps,
                          workers=n, ladder=config.search.strategy == "ladder")
    status = "FINISHED"

    def poll_study(event: str = "") -> None:
        state.read_counts(study)
        state.elapsed_s = time.perf_counter() - t_start
        timeout_left = (max(0.0, config.search.timeout - state.elapsed_s)
                        if config.search.timeout is not None else None)
        state.eta_s = estimate_left(study, state.budget, n, timeout_left)
        state.event = event
        if progress:
            progress(state)

    def finished() -> bool:
        if slots:
            return all(s.done for s in slots)
        return trials_done(study, config, me, time.perf_counter() - t_start)

    def check(slot: _Slot) -> None:
        """Restart the slot's worker if it died; mark the slot done if it ended for good."""
        assert slot.handle is not None
        code = slot.code = slot.handle.poll()
        if code is None:
            return
        # 0: budget spent; 2: a user error (restarting repeats it); 130: Ctrl-C
        if code in (0, 2, 130) or slot.restarts >= MAX_RESTARTS_PER_WORKER:
            slot.done = True
            if code not in (0, 130):
                say(f"worker {slot.index + 1} exited with code {code}; not restarted "
                    f"({slot.restarts} restarts already)")
            return
        failed, _ = recover(study, config, client, me)
        slot.restarts += 1
        say(f"worker {slot.index + 1} died (exit code {code}); " +
            (f"failed its trial(s) {failed}, re-queued them" if failed else
             "no trial of it is stale as seen from here (one left on another host is failed by the next "
             "worker started there, or after the heartbeat timeout)") + ", restarting it")
        slot.handle, slot.code = launcher.start(slot.index, replacing=slot.handle), None

    try:
        for slot in slots:
            slot.handle = launcher.start(slot.index)
        last_recover = time.monotonic()
        while not finished():
            time.sleep(POLL_S)
            for slot in slots:
                if not slot.done:
                    check(slot)
            if not slots and time.monotonic() - last_recover >= RECOVER_EVERY_S:
                recover(study, config, client, me)  # a remote worker's trial past its heartbeat: re-queued
                last_recover = time.monotonic()
            poll_study()
    except KeyboardInterrupt:
        result.stopped, status = "interrupted", "KILLED"
        say("interrupted: stopping the workers (their running trials end FAIL in Optuna, KILLED in MLflow)")
        _stop(slots)
    except BaseException:
        status = "FAILED"
        for slot in slots:
            if slot.handle is not None and slot.code is None:
                slot.handle.kill()
        raise
    finally:
        try:
            recover(study, config, client, me)  # a worker killed at the very end leaves nothing RUNNING
            result.best = tag_best(study, config, client, parent_run_id)
            result.states = state_counts(study)
            result.ladder, result.recommended_trial = ladder_outcome(study)
            if status == "FINISHED" and config.search.timeout is not None and \
                    time.perf_counter() - t_start >= config.search.timeout:
                result.stopped = "timeout"
            if status == "FINISHED":  # every worker has ended: no decision is left
                result.test = end_with_test_split(study, config, data, client, parent_run_id, say)
        finally:
            result.wall_s = time.perf_counter() - t_start
            end_parent(client, parent_run_id, status, result)
            result.unsent_writes = close_client(client)
    codes = [s.code for s in slots if s.handle is not None]
    if status == "FINISHED" and any(c not in (0, 130) for c in codes):
        raise LoraError(f"workers exited with codes {codes}", hint="see their error lines above")
    return result


def _stop(slots: list[_Slot]) -> None:
    """Ctrl-C: interrupt every worker still running, give them ``STOP_WAIT_S`` to end their trials, then
    kill the rest."""
    running = [s for s in slots if s.handle is not None and s.code is None]
    for slot in running:
        assert slot.handle is not None
        slot.handle.interrupt()
    deadline = time.monotonic() + STOP_WAIT_S
    while running and time.monotonic() < deadline:
        time.sleep(0.2)
        for slot in list(running):
            assert slot.handle is not None
            slot.code = slot.handle.poll()
            if slot.code is not None:
                running.remove(slot)
    for slot in running:
        assert slot.handle is not None
        slot.handle.kill()
        slot.code = slot.handle.poll()
