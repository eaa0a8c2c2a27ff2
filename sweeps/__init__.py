"""lora-sweep's engine (configs, data, models, the trial trainer, search strategies, tracking, the CLI) and
its Python API: ``sweeps.run``, ``sweeps.load``, ``sweeps.train``, ``sweeps.Sweep`` ... (`sweeps.api`).

The API's names are imported on first use, so ``import sweeps`` (and the command line's ``--help``,
which imports this package) stays quick.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sweeps.api import Choice, Decision, ExportResult, Sweep, SweepError, TrialResult, load, run, train

__all__ = ["Choice", "Decision", "ExportResult", "Sweep", "SweepError", "TrialResult", "load", "run", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("sweeps.api"), name)
    raise AttributeError(f"module 'sweeps' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
