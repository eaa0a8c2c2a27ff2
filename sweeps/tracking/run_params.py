"""A trial run's params and names (`sweeps.tracking.trial_run`): every config field as MLflow params,
the package versions, and the run names a trial and a sweep's trial get."""

from __future__ import annotations

import json
import platform
from collections.abc import Iterable, Iterator, Mapping
from importlib import metadata
from typing import Any

from sweeps.config.trial import TrialConfig

MAX_PARAM_LENGTH = 6000   # MLflow's limit on one param value (mlflow.utils.validation)


def param_value(value: Any) -> str:
    """A config value as text: YAML-like scalars, comma-joined lists, JSON mappings."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, tuple)):
        text = ",".join(param_value(v) for v in value)
    elif isinstance(value, dict):
        text = json.dumps(value, sort_keys=True)
    else:
        text = str(value)
    return text[:MAX_PARAM_LENGTH]


def _flatten(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and prefix == "":  # sections; data.files / columns stay whole
            yield from _flatten(value, dotted + ".")
        else:
            yield dotted, value


def _versions() -> dict[str, str]:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "unknown"

    return {"version.lora_sweep": version("lora-sweep"), "version.torch": version("torch"),
            "version.transformers": version("transformers"), "version.mlflow": version("mlflow"),
            "version.python": platform.python_version()}


def trial_params(config: TrialConfig) -> dict[str, str]:
    """The run's params: every config field but ``tracking.*`` (dotted keys), plus ``version.*``."""
    data = config.stored_dict()
    data.pop("tracking", None)
    params = {key: param_value(value) for key, value in _flatten(data)}
    params.update(_versions())
    return params


def default_run_name(config: TrialConfig) -> str:
    """``<name>-r8-a16-q,v-lr0.001-s0`` (``<name>-head-only-...`` for the baseline)."""
    lo, lr = config.lora, f"{config.train.lr:g}"
    if not lo.enabled:
        return f"{config.name}-head-only-lr{lr}-s{config.seed}"
    return f"{config.name}-r{lo.r}-a{lo.alpha:g}-{','.join(lo.targets)}-lr{lr}-s{config.seed}"


def trial_run_name(number: int, config: TrialConfig, varied: Iterable[str] = ()) -> str:
    """A sweep trial's run name, by what differs between the sweep's runs (the experiment names the sweep):
    ``t12·r4·q,v·s1``; alpha, lr and dropout only when ``varied`` names them (``t3·r8·all-linear·lr0.000412·s0``);
    ``t0·head-only·s0`` for the baseline."""
    lo, shown = config.lora, set(varied)
    parts = [f"t{number}"]
    if lo.enabled:
        parts += [f"r{lo.r}", ",".join(lo.targets)]
        if "alpha" in shown:
            parts.append(f"a{lo.alpha:g}")
        if "dropout" in shown:
            parts.append(f"d{lo.dropout:g}")
    else:
        parts.append("head-only")
    if "lr" in shown:
        parts.append(f"lr{config.train.lr:.3g}")
    return "·".join([*parts, f"s{config.seed}"])
