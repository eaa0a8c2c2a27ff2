"""SIGTERM and SIGHUP stop a command as Ctrl-C does.

A scheduler stops a job with SIGTERM (Kubernetes deleting a pod, Slurm preempting or cancelling a job,
``docker stop``, systemd), and a closed terminal sends SIGHUP. Python's default for both is to die on the
spot, which leaves a sweep's running trial RUNNING (until recovery fails it) and its MLflow runs open.
Inside `terminate_as_interrupt` they raise `Terminated`, a KeyboardInterrupt, so every command's
Ctrl-C path runs: the running trial ends FAIL in Optuna and KILLED in MLflow, workers are interrupted,
spools are flushed, the MLflow UI's server is stopped. The command then exits ``128 + signal``, as a
process killed by that signal would be seen by a shell."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType

__all__ = ["Received", "Terminated", "terminate_as_interrupt"]


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C would raise KeyboardInterrupt."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Received:
    """The signal `terminate_as_interrupt` turned into `Terminated` (None: none), which a command may have
    caught as its Ctrl-C and ended with exit code 130: the caller then exits ``128 + signum``."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def handler(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        raise Terminated(signum)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[Received]:
    """Within: SIGTERM and SIGHUP raise `Terminated` (in the main thread; elsewhere nothing changes)."""
    received = Received()
    saved = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is None:
            continue
        with contextlib.suppress(ValueError):  # not the main thread: leave the signals alone
            saved[sig] = signal.signal(sig, received.handler)
    try:
        yield received
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
