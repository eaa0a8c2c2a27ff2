"""lora-sweep from Python: run a sweep, load one, look at its trials as a DataFrame, its recommendation,
its figures, and export the adapter; train one trial. The command line runs the same code.

    >>> import sweeps
    >>> sweep = sweeps.run("examples/ladder-demo.yaml")    # or a dict, or a sweep's name to resume it
    >>> sweep.trials                                       # pandas: one row per trial
    >>> sweep.configurations                               # pandas: one row per configuration (seed means)
    >>> sweep.recommendation                               # a Choice: params, mean ± std, why, test figure
    >>> sweep.figures()["rank"]                            # the report's plotly figures, inline
    >>> sweep.export("best-adapter")                       # a PEFT directory, checked
    >>> sweeps.load("ladder-demo").decisions               # a sweep already run, read-only

Every problem a user can fix raises `SweepError` (``lora_core.LoraError``, a ``ValueError``) with the
command line's one-line ``message`` and a ``hint``. A call leaves the process as it found it (working
directory, environment, logging, signal handlers, torch threads and random state). docs/API.md lists
every name.
"""

from __future__ import annotations

from lora_core import LoraError as SweepError
from sweeps.api.records import Choice, Decision, TrialResult
from sweeps.api.sweep import Sweep
from sweeps.api.verbs import load, run, train
from sweeps.export.result import ExportResult

__all__ = ["Choice", "Decision", "ExportResult", "Sweep", "SweepError", "TrialResult", "load", "run", "train"]
