"""Local CPU workers forked from one process that has already imported the heavy modules.

A ``lora-sweep worker`` process spends most of its start importing torch, transformers, MLflow, Optuna
and datasets (about 10 s of CPU on a small machine; on a 2-core machine six workers starting at once
spend half a minute doing nothing else). ``run --workers N`` on a machine without GPUs therefore starts
its workers from a multiprocessing *forkserver*: one fresh process imports those modules once
(:data:`PRELOAD`), and every worker is a fork of it that runs ``lora-sweep worker`` as a new process would.

What a worker gets is what a fresh ``python -m sweeps.cli worker ...`` process gets:

- its own environment (the owner's, plus the worker's entries of ``device_plan``), set before the
  command runs; the few settings read at import time (the hub's offline switch, transformers'
  verbosity) come from the owner's environment, which is the same;
- its output (stdout and stderr) on a pipe the owner relays line by line, with its exit code
  (negative for a signal) as ``poll``'s result;
- fresh random states (Python's and numpy's are reseeded from the OS), as a new process would have;
- its own process id, so liveness checks, Ctrl-C (the same process group) and ``kill`` work as before.

With GPUs the workers stay fresh processes (`sweeps.engine.workers._LocalWorker`): CUDA reads
``CUDA_VISIBLE_DEVICES`` once per process, when the driver starts, and a forked worker could inherit a
driver started with every GPU visible. The forkserver never touches CUDA (it only imports), but the
fresh processes make the per-worker GPU pinning hold whatever a future import does.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["PRELOAD", "ForkedWorker", "context"]

# What the forkserver imports before it forks workers: the modules every worker imports, heaviest first.
PRELOAD = ["sweeps.engine.preload"]

_lock = threading.Lock()
_context: Any = None


def context() -> Any:
    """The forkserver context of this process (its server starts with the first worker)."""
    global _context
    with _lock:
        if _context is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)
            _context = ctx
        return _context


def _worker_main(argv: list[str], env: dict[str, str], out: Connection, entry: str) -> None:
    """In the forked worker: the environment, the output pipe and fresh random states, then the command
    (``entry``, ``module:function``, called with ``argv``; its result is the exit code)."""
    import importlib
    import random

    os.environ.clear()
    os.environ.update(env)
    fd = out.fileno()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    out.close()
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    random.seed()
    try:
        import numpy

        numpy.random.seed()
    except ImportError:  # pragma: no cover - numpy comes with torch
        pass
    module, _, function = entry.partition(":")
    code = getattr(importlib.import_module(module), function)(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


class ForkedWorker:
    """A ``lora-sweep worker`` forked from the forkserver; a thread relays its output lines as they come."""

    def __init__(self, argv: list[str], env: dict[str, str], label: str, say: Callable[[str], None],
                 line: Callable[[str, str], str], entry: str = "sweeps.cli.main:main") -> None:
        ctx = context()
        read, write = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_worker_main, args=(argv, env, write, entry), name=f"lora-sweep worker {label}")
        self.proc.start()
        write.close()  # the worker holds the only write end: its exit ends the relay
        self.pid = self.proc.pid
        self._stream = os.fdopen(os.dup(read.fileno()), "rb")
        read.close()
        self.relay = threading.Thread(target=self._relay, args=(label, say, line), daemon=True)
        self.relay.start()

    def _relay(self, label: str, say: Callable[[str], None], line: Callable[[str, str], str]) -> None:
        with self._stream:
            for raw in self._stream:
                text = raw.decode(errors="replace").rstrip()
                if text:
                    say(line(label, text))

    def poll(self) -> int | None:
        code = self.proc.exitcode
        if code is not None:
            self.relay.join(timeout=5)  # its last lines before the owner says anything about it
        return code

    def interrupt(self) -> None:
        if self.proc.exitcode is None and self.pid is not None:
            os.kill(self.pid, signal.SIGINT)

    def kill(self) -> None:
        if self.proc.exitcode is None:
            self.proc.kill()
            self.proc.join()
