"""Export of a finished trial's adapter as a checked PEFT directory (optionally merged, optionally registered).

Modules: ``source`` (the study, the trial and its MLflow run), ``verify`` (load the adapter strictly
and reproduce the logged metric; the merged model), ``card`` (the model card), ``registry`` (MLflow
model registry), ``result`` (what an export produced), ``exporter`` (the whole export into a new directory). The command is
``sweeps.cli.export``.
"""

from __future__ import annotations

from collections.abc import Callable

Echo = Callable[[str], None]
"""Where an export's progress lines go (``print`` for the command)."""
