"""``lora-sweep run --workers N``: N worker processes on this machine, one sweep.

This process owns the sweep: it prepares the data once (the tokenised cache on disk then serves every
worker), opens or creates the study, recovers trials left by crashed workers, opens the MLflow parent
run, and starts N ``lora-sweep worker NAME`` processes, which find the sweep by name in its storage
(the study holds its config). It shows progress by reading the study, restarts a worker that died
(after failing and re-queuing its trial), waits for all of them, then tags the best trial and ends
the parent run.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lora_core import LoraError
from sweeps.config.sweep import SweepConfig
from sweeps.engine.liveness import Worker
from sweeps.engine.loop import prepare_sweep_data
from sweeps.engine.parent import end_parent, open_parent_run
from sweeps.engine.progress import SweepProgress, SweepResult, estimate_left, shown_budget
from sweeps.engine.recovery import recover
from sweeps.engine.selection import ladder_outcome, tag_best
from sweeps.engine.study import open_study, state_counts, storage_label, sweep_objectives
from sweeps.tracking.store import client_for

__all__ = ["THREADS_ENV", "WORKER_ENV", "device_plan", "run_workers"]

WORKER_ENV = "LORA_SWEEP_WORKER"      # "i/N": set in each worker started by --workers
THREADS_ENV = "LORA_SWEEP_THREADS"    # torch threads of a worker on CPU
MAX_RESTARTS_PER_WORKER = 2
POLL_S = 1.0


@dataclass
class _Slot:
    index: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
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
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), THREADS_ENV: str(threads)})
        plans.append(env)
    return plans


def _relay(proc: subprocess.Popen[bytes], say: Callable[[str], None]) -> None:
    """Print a worker's output lines through ``say`` (so they do not tear the live status line)."""
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip()
        if line:
            say(line)


def _worker_command(config: SweepConfig) -> list[str]:
    cmd = [sys.executable, "-m", "sweeps.cli", "worker", config.name,
           "--home", str(Path(config.tracking.home).expanduser().resolve())]
    if config.search.storage:
        storage = config.search.storage
        cmd += ["--storage", storage if "://" in storage else str(Path(storage).expanduser().resolve())]
    return cmd


def run_workers(config: SweepConfig, n: int, progress: Callable[[SweepProgress], None] | None = None,
                say: Callable[[str], None] = print) -> SweepResult:
    """Run the sweep with ``n`` worker processes (see the module docstring)."""
    if n < 1:
        raise LoraError(f"--workers must be >= 1, got {n}")
    t_start = time.perf_counter()
    prepare_sweep_data(config)  # fills the tokenised-data cache the workers read
    study = open_study(config)
    client = client_for(config.tracking)
    me = Worker.current()
    recovered, requeued = recover(study, config, client, me)
    parent_run_id = open_parent_run(study, config, client)
    objectives = sweep_objectives(config)
    directions = config.search.directions(config.model.task)
    result = SweepResult(study.study_name, storage_label(config), config.experiment(), parent_run_id, "budget",
                         {}, [], objectives, directions, recovered=recovered, requeued=requeued)
    if recovered:
        say(f"resumed: failed {len(recovered)} stale trial(s) {recovered}, re-queued their seeds")
    plans = device_plan(n)
    gpus = [p["CUDA_VISIBLE_DEVICES"] for p in plans if p["CUDA_VISIBLE_DEVICES"]]
    say(f"{n} workers: " + (f"GPUs {', '.join(gpus)}" if gpus else
                            f"CPU, {plans[0][THREADS_ENV]} thread(s) each of {os.cpu_count()} cores"))
    if gpus and len(set(gpus)) < n:
        say(f"note: {n} workers share {len(set(gpus))} GPU(s); workers on one GPU split its memory and time")
    slots = [_Slot(i, env) for i, env in enumerate(plans)]
    cmd = _worker_command(config)
    state = SweepProgress(budget=shown_budget(config), objective=objectives[0], steps=config.train.steps,
                          workers=n, ladder=config.search.strategy == "ladder")
    status = "FINISHED"

    def start(slot: _Slot) -> None:
        env = {**os.environ, **slot.env}
        slot.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        threading.Thread(target=_relay, args=(slot.proc, say), daemon=True).start()

    def poll_study(event: str = "") -> None:
        state.read_counts(study)
        state.elapsed_s = time.perf_counter() - t_start
        timeout_left = (max(0.0, config.search.timeout - state.elapsed_s)
                        if config.search.timeout is not None else None)
        state.eta_s = estimate_left(study, state.budget, n, timeout_left)
        state.event = event
        if progress:
            progress(state)

    try:
        for slot in slots:
            start(slot)
        while not all(s.done for s in slots):
            time.sleep(POLL_S)
            for slot in slots:
                if slot.done or slot.proc is None:
                    continue
                code = slot.proc.poll()
                if code is None:
                    continue
                # 0: budget spent; 2: a user error (restarting repeats it); 130: Ctrl-C
                if code in (0, 2, 130) or slot.restarts >= MAX_RESTARTS_PER_WORKER:
                    slot.done = True
                    if code not in (0, 130):
                        say(f"worker {slot.index + 1} exited with code {code}; not restarted "
                            f"({slot.restarts} restarts already)")
                    continue
                failed, _ = recover(study, config, client, me)
                slot.restarts += 1
                say(f"worker {slot.index + 1} died (exit code {code}); failed its trial(s) {failed}, "
                    "re-queued them, restarting it")
                start(slot)
            poll_study()
    except KeyboardInterrupt:
        result.stopped, status = "interrupted", "KILLED"
        say("interrupted: stopping the workers (their running trials end FAIL in Optuna, KILLED in MLflow)")
        for slot in slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.send_signal(signal.SIGINT)
        for slot in slots:
            if slot.proc is not None:
                try:
                    slot.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    slot.proc.kill()
    except BaseException:
        status = "FAILED"
        for slot in slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.kill()
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
        finally:
            result.wall_s = time.perf_counter() - t_start
            end_parent(client, parent_run_id, status, result)
    codes = [s.proc.returncode for s in slots if s.proc is not None]
    if status == "FINISHED" and any(c not in (0, 130) for c in codes):
        raise LoraError(f"workers exited with codes {codes}", hint="see their error lines above")
    return result
