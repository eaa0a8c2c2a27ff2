"""What a call of the Python API may change in its process, put back when the call returns.

A command line's process ends after one command, so ``lora-sweep`` sets what it likes: the environment
defaults that keep transformers and MLflow quiet, a log-record factory that masks passwords, Optuna's
log level, SIGTERM and SIGHUP as Ctrl-C, torch's thread count for a worker. A notebook's kernel lives on
after ``sweeps.run(...)``, so every API call runs inside :func:`kept_process_state`, which records that
state first and restores it afterwards (on an exception or a KeyboardInterrupt too):

- the working directory and the environment variables;
- the logging set-up: the record factory, ``logging.disable``'s level, and each existing logger's level,
  handlers, ``propagate`` and ``disabled`` (Optuna's, MLflow's, transformers' loggers included);
- the Python-level signal handlers, ``sys.excepthook`` and the warnings filters;
- torch's intra-op thread count and its CPU random state, Python's and NumPy's global random states
  (trials seed them), when those modules were imported before the call.

    >>> with kept_process_state():
    ...     ...   # anything; afterwards the process is as it was
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["ProcessState", "command_defaults", "kept_process_state"]

# What ``lora-sweep`` sets for a command (sweeps.cli.main) and an API call sets for its duration.
ENV_DEFAULTS = {"MLFLOW_DISABLE_TELEMETRY": "true", "TRANSFORMERS_VERBOSITY": "error",
                "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@dataclass(frozen=True)
class LoggerState:
    """One logger's configuration."""

    level: int
    handlers: tuple[logging.Handler, ...]
    propagate: bool
    disabled: bool


def _signals() -> list[signal.Signals]:
    """The signals whose Python-level handler can be read and set."""
    out: list[signal.Signals] = []
    for sig in sorted(signal.valid_signals()):
        if isinstance(sig, signal.Signals) and sig not in (signal.SIGKILL, signal.SIGSTOP):
            out.append(sig)
    return out


def _loggers() -> dict[str, LoggerState]:
    found: dict[str, LoggerState] = {}
    items: list[tuple[str, Any]] = [("", logging.getLogger()), *logging.Logger.manager.loggerDict.items()]
    for name, logger in items:
        if isinstance(logger, logging.Logger):
            found[name] = LoggerState(logger.level, tuple(logger.handlers), logger.propagate, logger.disabled)
    return found


@dataclass
class ProcessState:
    """A record of the process-wide state listed in the module docstring; :meth:`restore` puts it back."""

    cwd: str
    environ: dict[str, str]
    loggers: dict[str, LoggerState]
    record_factory: Callable[..., logging.LogRecord]
    logging_disable: int
    signals: dict[signal.Signals, Any]
    excepthook: Callable[..., Any]
    warning_filters: list[Any]
    torch_threads: int | None = None
    torch_rng: Any = None
    python_rng: Any = None
    numpy_rng: Any = None

    @classmethod
    def capture(cls) -> ProcessState:
        """The process's state now."""
        state = cls(cwd=os.getcwd(), environ=dict(os.environ), loggers=_loggers(),
                    record_factory=logging.getLogRecordFactory(), logging_disable=logging.root.manager.disable,
                    signals={sig: signal.getsignal(sig) for sig in _signals()}, excepthook=sys.excepthook,
                    warning_filters=list(warnings.filters))
        torch = sys.modules.get("torch")
        if torch is not None:
            state.torch_threads = int(torch.get_num_threads())
            state.torch_rng = torch.get_rng_state()
        random = sys.modules.get("random")
        if random is not None:
            state.python_rng = random.getstate()
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            state.numpy_rng = numpy.random.get_state()
        return state

    def restore(self) -> None:
        """Put the recorded state back (each part on its own: one that fails does not stop the others)."""
        steps: list[Callable[[], None]] = [self._restore_cwd, self._restore_environ, self._restore_logging,
                                           self._restore_signals, self._restore_hooks, self._restore_torch,
                                           self._restore_rng]
        for step in steps:
            with contextlib.suppress(Exception):
                step()

    def _restore_cwd(self) -> None:
        if os.getcwd() != self.cwd:
            os.chdir(self.cwd)

    def _restore_environ(self) -> None:
        for key in [k for k in os.environ if k not in self.environ]:
            del os.environ[key]
        for key, value in self.environ.items():
            if os.environ.get(key) != value:
                os.environ[key] = value

    def _restore_logging(self) -> None:
        logging.setLogRecordFactory(self.record_factory)
        logging.disable(self.logging_disable)
        for name, saved in self.loggers.items():
            logger = logging.getLogger(name) if name else logging.getLogger()
            logger.setLevel(saved.level)
            for handler in list(logger.handlers):
                if handler not in saved.handlers:
                    logger.removeHandler(handler)
            for handler in saved.handlers:
                if handler not in logger.handlers:
                    logger.addHandler(handler)
            logger.propagate, logger.disabled = saved.propagate, saved.disabled

    def _restore_signals(self) -> None:
        for sig, handler in self.signals.items():
            if handler is None or signal.getsignal(sig) is handler:
                continue  # None: a handler not installed from Python, which Python cannot put back
            with contextlib.suppress(ValueError, OSError):  # not the main thread: it could not have changed them
                signal.signal(sig, handler)

    def _restore_hooks(self) -> None:
        sys.excepthook = self.excepthook
        warnings.filters[:] = self.warning_filters  # type: ignore[index]

    def _restore_torch(self) -> None:
        torch = sys.modules.get("torch")
        if torch is None or self.torch_threads is None:
            return
        if torch.get_num_threads() != self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        if self.torch_rng is not None:
            torch.set_rng_state(self.torch_rng)

    def _restore_rng(self) -> None:
        random = sys.modules.get("random")
        if random is not None and self.python_rng is not None:
            random.setstate(self.python_rng)
        numpy = sys.modules.get("numpy")
        if numpy is not None and self.numpy_rng is not None:
            numpy.random.set_state(self.numpy_rng)


def command_defaults() -> None:
    """What a command sets for its process (and an API call for its duration): the quiet defaults of
    ``ENV_DEFAULTS`` where the environment does not say otherwise, and log records with passwords masked."""
    from sweeps.secrets import mask_log_records

    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    mask_log_records()


@contextlib.contextmanager
def kept_process_state() -> Iterator[ProcessState]:
    """Within: the command defaults (:func:`command_defaults`); afterwards the process's state as before
    (see the module docstring). Yields the recorded state."""
    saved = ProcessState.capture()
    try:
        command_defaults()
        # tqdm.auto, imported by the data libraries, warns in a notebook without ipywidgets; nothing of ours uses it
        warnings.filterwarnings("ignore", message="IProgress not found")
        yield saved
    finally:
        saved.restore()
