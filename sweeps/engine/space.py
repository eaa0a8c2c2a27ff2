"""The search space: sampling one configuration, the grid, and a configuration as a trial config.

Each Optuna trial is one configuration at one seed; a configuration is the params ``r``, ``alpha`` (or
``alpha_per_r`` for multiples of r), ``targets``, ``lr`` and ``dropout``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial

from sweeps.config.sweep import LogRange, SearchConfig, SweepConfig
from sweeps.config.trial import TrialConfig

if TYPE_CHECKING:
    from sweeps.engine.ladder_types import LadderSpec


PARAM_NAMES = ("r", "alpha", "targets", "lr", "dropout")  # alpha is alpha_per_r for multiples of r


def suggest(trial: optuna.Trial, search: SearchConfig, ladder: LadderSpec | None = None) -> dict[str, Any]:
    """Sample one configuration: params ``r``, ``alpha`` or ``alpha_per_r``, ``targets``, ``lr``, ``dropout``.
    A ladder's trials are all enqueued; their distributions are the ladder's values."""
    if ladder is not None:
        trial.suggest_categorical("r", ladder.ranks)
        trial.suggest_categorical("alpha", [ladder.alpha])
        trial.suggest_categorical("targets", ladder.targets)
        trial.suggest_categorical("lr", ladder.lrs)
        trial.suggest_categorical("dropout", [ladder.dropout])
        return dict(trial.params)
    trial.suggest_categorical("r", search.rank)
    mode, values = search.alpha_mode()
    trial.suggest_categorical("alpha" if mode == "fixed" else "alpha_per_r", values)
    trial.suggest_categorical("targets", search.target_choices())
    if isinstance(search.lr, LogRange):
        trial.suggest_float("lr", search.lr.low, search.lr.high, log=True)
    else:
        trial.suggest_categorical("lr", search.lr)
    trial.suggest_categorical("dropout", search.dropout)
    return dict(trial.params)


def grid_configs(search: SearchConfig) -> list[dict[str, Any]]:
    """Every configuration of the grid in the order written: the (rank, targets) pairs (ranks
    outermost), then alpha, lr and dropout."""
    mode, alphas = search.alpha_mode()
    alpha_key = "alpha" if mode == "fixed" else "alpha_per_r"
    assert isinstance(search.lr, list)
    return [{"r": r, alpha_key: a, "targets": t, "lr": lr, "dropout": d}
            for r, t in search.grid_pairs() for a in alphas for lr in search.lr for d in search.dropout]


def trial_config(config: SweepConfig, params: dict[str, Any], seed_index: int) -> TrialConfig:
    """The base trial with a configuration's params and the seed of ``seed_index`` applied."""
    cfg = config.base_trial()
    cfg.lora.r = int(params["r"])
    cfg.lora.alpha = float(params["alpha"]) if "alpha" in params else float(params["alpha_per_r"]) * cfg.lora.r
    cfg.lora.targets = str(params["targets"]).split(",")
    cfg.lora.dropout = float(params["dropout"])
    cfg.train.lr = float(params["lr"])
    cfg.seed = config.seed + seed_index
    cfg.tracking.experiment = config.experiment()
    return cfg.validate()


def config_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def planned_params(t: FrozenTrial) -> dict[str, Any] | None:
    """A trial's configuration: its params over the params it was enqueued with, so that an enqueued trial
    claimed a moment ago and not yet (or not fully) sampled has its whole configuration (another worker's
    recovery must not take its seed for missing and queue it again); None for a fresh trial not sampled yet."""
    return {**(t.system_attrs.get("fixed_params") or {}), **t.params} or None

