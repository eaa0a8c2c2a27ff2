"""``lora-sweep train``: one tracked trial with a progress bar and a summary table.

What runs and what is printed is the Python API's (`sweeps.api.training.train_trial`, which
``sweeps.train`` calls too); this module reads the config file and the ``--set`` overrides."""

from __future__ import annotations

from rich.console import Console

from sweeps.api.training import train_trial
from sweeps.config.trial import TrialConfig, load_trial_config
from sweeps.training.trainer import Trial

__all__ = ["train"]


def train(config_path: str | None, overrides: list[str], console: Console | None = None) -> tuple[Trial, str]:
    """Validate the config, run the trial inside its MLflow run, print the summary. Returns (trial, run id)."""
    config: TrialConfig = load_trial_config(config_path, overrides)
    return train_trial(config, console or Console())
