"""``lora-sweep run SWEEP --ray [ADDRESS]``: the sweep's workers on a Ray cluster.

The driver (this process) owns the sweep exactly as ``--workers N`` does (`sweeps.engine.workers.supervise`:
data prepared once, study opened, stale trials recovered, the MLflow parent run, progress, restarts,
the best trial tagged). Only where the workers run differs: each is a Ray actor
(`sweeps.engine.ray_agent.WorkerAgent`) that starts ``lora-sweep worker NAME --home ...``
in a process on its node, with the same arguments and environment (``LORA_SWEEP_WORKER``, threads, the
storage URL in ``LORA_SWEEP_STORAGE``: never on a command line) that
``--workers`` gives its processes. The driver polls each actor once a second for the worker's new
output lines (printed prefixed with the worker, ``[worker i/N ...]``) and its exit code; a worker that
died (or whose actor or node was lost) is restarted like a local one, on the same node when that node
is still there (so that the replacement's own start-up recovery sees the dead process's trial as stale).

Resources per worker: one GPU (``num_gpus=1``) when the cluster has GPUs, and ``--ray-cpus K`` CPUs
(default 1) either way; a CPU worker runs K torch threads. Workers: ``--workers N``, by default one per
GPU of the cluster, or on a CPU-only cluster one per K CPUs. Ray queues workers that do not fit.

Ray is an optional dependency (``pip install 'lora-sweep[ray]'``), imported only here and only when
``--ray`` is used.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lora_core import LoraError
from sweeps.config.sweep import SweepConfig
from sweeps.engine.progress import SweepProgress, SweepResult
from sweeps.engine.workers import (
    WORKER_ENV,
    WorkerHandle,
    supervise,
    thread_env,
    worker_args,
    worker_env,
    worker_line,
)
from sweeps.text import first_line

__all__ = ["RAY_HINT", "RayLauncher", "RayOptions", "require_ray", "run_ray_workers"]

RAY_HINT = "install it with: pip install 'lora-sweep[ray]' (or: pip install ray)"
LOST = -1  # the exit code given to a worker whose actor (or node) was lost


@dataclass(frozen=True)
class RayOptions:
    """``--ray [ADDRESS]``, ``--workers N`` and ``--ray-cpus K``."""

    address: str | None = None  # None: ray.init()'s default (RAY_ADDRESS, a cluster on this machine, or a new one)
    workers: int | None = None  # None: one per GPU of the cluster, else one per ``cpus`` CPUs
    cpus: int = 1               # CPUs reserved for each worker (and its torch threads)


def require_ray() -> None:
    """Raise a one-line `LoraError` (with the pip command) when ray is not installed."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise LoraError("--ray needs the ray package, which is not installed", hint=RAY_HINT) from None


class _RayWorker:
    """One worker actor, seen from the driver (see `sweeps.engine.workers.WorkerHandle`)."""

    def __init__(self, actor: Any, label: str, say: Callable[[str], None]) -> None:
        self.actor, self.label, self.say = actor, label, say
        self.pending: Any = None
        self.code: int | None = None
        self.node_ref = actor.node.remote()  # answered before any poll: an actor runs its calls in order
        self.node_id: str | None = None

    def poll(self) -> int | None:
        import ray

        if self.code is not None:
            return self.code
        if self.pending is None:
            self.pending = self.actor.poll.remote()
        ready, _ = ray.wait([self.pending], timeout=0)
        if not ready:
            return None
        ref, self.pending = self.pending, None
        if self.node_id is None:
            with contextlib.suppress(ray.exceptions.RayError):
                self.node_id = str(ray.get(self.node_ref, timeout=10))
        try:
            lines, code = ray.get(ref)
        except ray.exceptions.RayError as exc:  # the actor died, or its node
            lines, code = [f"its Ray actor was lost: {first_line(exc)}"], LOST
        for line in lines:
            self.say(worker_line(self.label, line))
        if code is not None:
            self.code = code
            ray.kill(self.actor)  # its resources (a GPU) go back to the cluster
        return self.code

    def node(self) -> str | None:
        """The node the actor ran on (None if it was lost before it could say)."""
        return self.node_id

    def _signal(self, signum: int) -> None:
        import ray

        with contextlib.suppress(Exception):  # the actor is gone already
            ray.get(self.actor.signal.remote(int(signum)), timeout=10)

    def interrupt(self) -> None:
        if self.code is None:
            self._signal(signal.SIGINT)

    def kill(self) -> None:
        import ray

        if self.code is None:
            self._signal(signal.SIGKILL)
            self.poll()
        ray.kill(self.actor)


class RayLauncher:
    """Workers as Ray actors (see the module docstring); ray is initialised already."""

    def __init__(self, config: SweepConfig, options: RayOptions, say: Callable[[str], None]) -> None:
        import ray

        from sweeps.engine.ray_agent import WorkerAgent

        if options.cpus < 1:
            raise LoraError(f"--ray-cpus must be >= 1, got {options.cpus}")
        self.config, self.options, self.say = config, options, say
        resources = ray.cluster_resources()
        self.gpus = int(resources.get("GPU", 0))
        self.cpus = int(resources.get("CPU", 0))
        self.nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        default = self.gpus or max(1, self.cpus // options.cpus)
        self.workers = options.workers if options.workers is not None else default
        if self.workers < 1:
            raise LoraError(f"--workers must be >= 1 with --ray, got {self.workers}")
        self.agent = ray.remote(num_cpus=options.cpus, num_gpus=1 if self.gpus else 0, max_restarts=0,
                                max_task_retries=0)(WorkerAgent)
        self.args = worker_args(config)
        self.started: list[_RayWorker] = []

    def describe(self) -> list[str]:
        n, k = self.workers, self.options.cpus
        where = f"Ray, {self.nodes} node(s)"
        if self.gpus:
            lines = [f"{n} workers on {where}: one GPU and {k} CPU(s) each ({self.gpus} GPUs in the cluster)"]
            short = n > self.gpus
        else:
            lines = [f"{n} workers on {where}: CPU, {k} CPU(s) and thread(s) each ({self.cpus} CPUs in the cluster)"]
            short = n * k > self.cpus
        if short:
            lines.append(f"note: the cluster has room for fewer than {n} workers now; Ray starts the others as "
                         "room frees up")
        url = self.config.search.storage or ""
        if self.nodes > 1 and ("://" not in url or url.startswith("sqlite") or not self.config.tracking.uri):
            lines.append("note: workers on other nodes need the study and the MLflow store: a shared file system "
                         "for a journal/sqlite storage and the tracking home, or search.storage: postgresql://... "
                         "and tracking.uri: http://... (an mlflow server)")
        return lines

    def start(self, index: int, replacing: WorkerHandle | None = None) -> WorkerHandle:
        label = f"{index + 1}/{self.workers}"
        env = {**worker_env(self.config, base={}), WORKER_ENV: label, **thread_env(self.options.cpus)}
        if not self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ""
        options: dict[str, Any] = {}
        node = replacing.node() if isinstance(replacing, _RayWorker) else None
        if node:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node, soft=True)
        actor = self.agent.options(**options).remote(self.args, env)
        worker = _RayWorker(actor, label, self.say)
        self.started.append(worker)
        return worker

    def close(self) -> None:
        """Kill every actor still there (their workers first)."""
        for worker in self.started:
            with contextlib.suppress(Exception):  # the cluster is going away
                worker.kill()


def connect(address: str | None) -> None:
    """``ray.init`` at ``address`` (None: Ray's default), quietly; a failure is a one-line `LoraError`."""
    import ray

    try:
        ray.init(address=address or None, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as exc:
        raise LoraError(f"cannot start or reach Ray{f' at {address}' if address else ''}: {first_line(exc)}",
                        hint="give the head node's address (host:6379 or ray://host:10001), or 'local' for a "
                             "new instance on this machine") from None


def run_ray_workers(config: SweepConfig, options: RayOptions,
                    progress: Callable[[SweepProgress], None] | None = None,
                    say: Callable[[str], None] = print) -> SweepResult:
    """Run the sweep with its workers on Ray (see the module docstring)."""
    require_ray()
    import ray

    connect(options.address)
    launcher: RayLauncher | None = None
    try:
        launcher = RayLauncher(config, options, say)
        return supervise(config, launcher, progress, say)
    finally:
        if launcher is not None:
            launcher.close()
        ray.shutdown()
