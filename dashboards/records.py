"""What a report is made of: the records of one sweep (trials, configurations, choices) and how
their params and numbers are written on the page.

A *configuration* is one set of params (``r``, ``alpha``/``alpha_per_r``, ``targets``, ``lr``,
``dropout``) trained for the sweep's full number of steps; its COMPLETE trials are its seeds, its
quality the mean of the objective over them (``std`` the sample standard deviation, n - 1 in the
denominator; None for one seed). Nothing here reads a store: :mod:`dashboards.collect` fills these
records, :mod:`dashboards.choices` picks the recommendation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sweeps.config.sweep import SweepConfig

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient

__all__ = ["COST_METRICS", "Choice", "ConfigStats", "SweepData", "TrialRecord", "config_key",
           "effective_alpha", "fmt_num", "mean_std", "params_label", "same_params"]

COST_METRICS = ("trainable_params", "train_s", "peak_memory_bytes")


@dataclass
class TrialRecord:
    """One Optuna trial with what MLflow knows about it."""

    number: int
    state: str
    params: dict[str, Any]
    seed_index: int
    value: float | None                  # the objective (first value) of a COMPLETE trial
    run_id: str | None = None
    stage: int | None = None
    rung: int | None = None
    steps: int | None = None             # a shortened trial's steps (ladder calibration); None: full length
    metrics: dict[str, float] = field(default_factory=dict)   # the run's latest metric values
    has_adapter: bool = False
    duration_s: float | None = None

    @property
    def key(self) -> str:
        return config_key(self.params)


@dataclass
class ConfigStats:
    """One configuration: its COMPLETE trials (seeds) and their mean objective and costs."""

    key: str
    params: dict[str, Any]
    trials: list[TrialRecord]
    values: list[float]
    mean: float
    std: float | None
    n: int
    cost: dict[str, float | None]

    @property
    def r(self) -> int:
        return int(self.params["r"])

    @property
    def targets(self) -> str:
        return str(self.params["targets"])

    @property
    def alpha(self) -> float:
        return effective_alpha(self.params)

    @property
    def label(self) -> str:
        return params_label(self.params)

    def seed0(self) -> TrialRecord | None:
        """The trial of the lowest seed index that logged an adapter (seed 0 when there is one)."""
        with_adapter = [t for t in self.trials if t.has_adapter and t.run_id]
        return min(with_adapter, key=lambda t: (t.seed_index, t.number)) if with_adapter else None


@dataclass
class Choice:
    """A configuration picked by the ladder or by the report's own rule (``source``), with its numbers."""

    params: dict[str, Any]
    mean: float | None
    std: float | None
    n: int | None
    trainable_params: float | None
    trials: list[int]
    source: str                           # "ladder" | "report"
    how: str = ""                         # one sentence: how it was picked, with the numbers


@dataclass
class SweepData:
    """Everything a report shows about one sweep."""

    config: SweepConfig
    study: optuna.Study
    objective: str
    direction: str                        # "maximize" | "minimize"
    trials: list[TrialRecord]
    configs: list[ConfigStats]
    counts: dict[str, int]
    ladder: dict[str, Any] | None
    parent_run_id: str | None
    tracking_uri: str
    client: MlflowClient | None
    notes: list[str] = field(default_factory=list)
    shortened: list[TrialRecord] = field(default_factory=list)   # COMPLETE trials of fewer steps
    recommendation: Choice | None = None
    best_quality: Choice | None = None
    noise: dict[str, Any] = field(default_factory=dict)   # the derived rule's numbers
    test: dict[str, Any] | None = None    # the test-split record the sweep's end stored (sweeps.engine.holdout)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"

    @property
    def ladder_sweep(self) -> bool:
        return self.config.search.strategy == "ladder"

    @property
    def seeds(self) -> int:
        """Seeds per configuration (the ladder's own for a ladder sweep)."""
        search = self.config.search
        return int(search.ladder.seeds) if self.ladder_sweep else int(search.seeds)

    def target_order(self) -> list[str]:
        """The target sets in the order the sweep lists them."""
        search = self.config.search
        if self.ladder_sweep:
            return [",".join(t.strip() for t in x.split(",")) for x in search.ladder.targets]
        return search.target_choices()

    def better(self, a: float, b: float) -> bool:
        return a > b if self.maximize else a < b

    def best_config(self) -> ConfigStats:
        """The best seed mean; ties go to more seeds, then fewer trainable parameters, then less train time."""
        def key(c: ConfigStats) -> tuple[float, int, float, float]:
            params, train = c.cost.get("trainable_params"), c.cost.get("train_s")
            return (-c.mean if self.maximize else c.mean, -c.n, math.inf if params is None else params,
                    math.inf if train is None else train)

        return min(self.configs, key=key)

    def config_of(self, choice: Choice) -> ConfigStats | None:
        """The configuration a choice names: by its trial numbers, else by its params."""
        numbers = set(choice.trials)
        if numbers:
            for c in self.configs:
                if numbers & {t.number for t in c.trials}:
                    return c
        for c in self.configs:
            if same_params(c.params, choice.params):
                return c
        return None


# --------------------------------------------------------------------------- params

def config_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def effective_alpha(params: dict[str, Any]) -> float:
    if "alpha" in params:
        return float(params["alpha"])
    return float(params.get("alpha_per_r", 0.0)) * int(params.get("r", 0))


def same_params(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two param sets name the same configuration (alpha compared as the effective alpha)."""
    def norm(p: dict[str, Any]) -> tuple[Any, ...]:
        return (int(p.get("r", -1)), round(effective_alpha(p), 9), str(p.get("targets")),
                round(float(p.get("lr", math.nan)), 15) if p.get("lr") is not None else None,
                round(float(p.get("dropout", 0.0)), 9))
    try:
        return norm(a) == norm(b)
    except (TypeError, ValueError):
        return False


def fmt_num(value: Any, digits: int = 4) -> str:
    """Numbers as shown in the report: ``digits`` significant digits; integers with separators."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value.is_integer() and abs(value) >= 1000:
            return f"{int(value):,}"
        return f"{value:.{digits}g}"
    return str(value)


def mean_std(mean: float | None, std: float | None, n: int | None) -> str:
    """``mean ± std (n)`` as the report writes it; ``–`` without a mean."""
    if mean is None:
        return "–"
    text = fmt_num(mean) + (f" ± {fmt_num(std)}" if std is not None else "")
    return text + (f" ({n})" if n is not None else "")


def params_label(params: dict[str, Any]) -> str:
    """``r=4 α=8 q,v lr=0.01 dropout=0``."""
    parts = []
    if "r" in params:
        parts.append(f"r={params['r']}")
    if "alpha" in params or "alpha_per_r" in params:
        parts.append(f"α={fmt_num(effective_alpha(params))}")
    if "targets" in params:
        parts.append(str(params["targets"]))
    if "lr" in params:
        parts.append(f"lr={fmt_num(float(params['lr']), 3)}")
    if "dropout" in params:
        parts.append(f"dropout={fmt_num(float(params['dropout']))}")
    return " ".join(parts)
