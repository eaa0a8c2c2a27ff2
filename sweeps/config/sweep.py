"""Sweep configuration: a base trial (``sweeps.config.TrialConfig``) plus a ``search`` block
(`sweeps.config.search`, where its keys are listed; checked by `sweeps.config.search_checks`).

Everything is validated before anything runs; mistakes raise ``lora_core.LoraError`` naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_core import LoraError
from sweeps.config.search import (  # noqa: F401 (re-exported: the names every caller imports from here)
    MAX_PACK,
    MAX_SEEDS,
    MAX_TRIALS,
    METRICS,
    LadderConfig,
    LogRange,
    PairConfig,
    SearchConfig,
)
from sweeps.config.search_checks import check_search
from sweeps.config.trial import TrialConfig, apply_overrides, from_dict, read_yaml

SWEEP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
REPO_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"  # sweeps/config/sweep.py -> the repository


@dataclass
class SweepConfig(TrialConfig):
    """A base trial plus the search block. ``name`` names the Optuna study and the MLflow experiment."""

    name: str = "sweep"
    search: SearchConfig = field(default_factory=SearchConfig)

    def validate(self) -> SweepConfig:
        if not SWEEP_NAME_RE.match(self.name):
            raise LoraError(f"sweep name {self.name!r} must be letters, digits, '.', '_' or '-'",
                            hint="it names the study, its journal file and the MLflow experiment")
        check_search(self.search, self.model.task)
        base = self.base_trial()
        subsets = self.search.target_subsets()
        if self.search.strategy == "ladder":
            subsets = [[t.strip() for t in entry.split(",")] for entry in self.search.ladder.targets]
        for subset in subsets:  # every subset must make a valid LoRA config
            probe = copy.deepcopy(base)
            probe.lora.targets = subset
            probe.lora.r = min(self.search.rank)
            probe.lora.dropout = self.search.dropout[0]
            probe.validate()
        return self

    def base_trial(self) -> TrialConfig:
        """The base trial as a plain ``TrialConfig`` (a deep copy; ``search`` dropped)."""
        values = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(TrialConfig)}
        return TrialConfig(**values)

    def experiment(self) -> str:
        """The sweep's MLflow experiment: ``tracking.experiment``, else the sweep name."""
        return self.tracking.experiment or self.name


DEMO_SWEEP = REPO_EXAMPLES / "ladder-demo.yaml"

# The built-in demo (kept identical to examples/ladder-demo.yaml by a test): the ladder, small enough
# for a CPU. examples/demo-sweep.yaml is a TPE sweep of the same trials.
DEMO: dict[str, Any] = {
    "name": "ladder-demo",
    "seed": 0,
    "model": {"name": "minilm-l6", "task": "classification"},
    "data": {"name": "pydoc-topics", "max_length": 48},
    "lora": {"modules_to_save": "auto"},
    "train": {"steps": 60, "batch_size": 32, "schedule": "linear", "warmup_ratio": 0.06, "eval_every": 60},
    "search": {"strategy": "ladder", "n_trials": 40, "dropout": [0.0], "margin": 0.01,
               "ladder": {"r_start": 1, "r_max": 8, "targets": ["q,v", "q,k,v,o", "all-linear"], "seeds": 2,
                          "calibration_lrs": [1.0e-2, 3.0e-2], "calibration_steps": 30,
                          "max_seeds": 2, "false_gain_rate": 0.05, "patience": 1, "retune_lr": True,
                          "climb_undecided": False}},
}


def load_sweep_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SweepConfig:
    """Read a sweep YAML (the built-in demo when ``path`` is None), apply ``--set`` overrides, validate."""
    data = read_yaml(path) if path is not None else copy.deepcopy(DEMO)
    apply_overrides(data, overrides or [])
    return from_dict(SweepConfig, data).validate()
