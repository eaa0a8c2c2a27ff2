"""What the API's ``config`` argument names, as a validated config: a YAML path, a sweep's name, a plain
dict of the YAML's schema, or None for the built-in default; with ``overrides`` (``--set``'s
``key=value`` strings, or a mapping of dotted keys to values) and ``home``/``storage``.

A sweep named by *name* is read back from its Optuna study, and what a stored config says is data, not
permission to run code: unless the caller trusts it (``--trust-stored-config``, ``trust_stored_config=True``)
or sets the value itself, it may neither turn on ``model.trust_remote_code`` nor name a hub model that is
not already on this machine (`check_stored`). A YAML file or a dict is the caller's own and taken as it is.
Every problem is a ``LoraError`` with the command line's one-line message and hint.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lora_core import LoraError
from sweeps.config.ref import looks_like_file, resolve_sweep
from sweeps.config.sweep import SweepConfig
from sweeps.config.trial import TrialConfig, apply_overrides, from_dict, load_trial_config

__all__ = ["TRUST_FLAG", "ConfigLike", "Overrides", "check_stored", "is_stored_ref", "override_list",
           "sweep_config", "trial_config"]

TRUST_FLAG = "--trust-stored-config"

ConfigLike = str | os.PathLike[str] | Mapping[str, Any] | None
Overrides = Sequence[str] | Mapping[str, Any] | None


def override_list(overrides: Overrides) -> list[str]:
    """``--set`` strings: as given, or ``key=value`` from a mapping (values written as YAML flow text, the
    way ``--set`` reads them back)."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return [overrides]
    if isinstance(overrides, Mapping):
        import yaml

        out = []
        for key, value in overrides.items():
            text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
            if text.endswith("\n..."):  # a plain scalar: safe_dump ends the document
                text = text[: -len("\n...")]
            out.append(f"{key}={text}")
        return out
    return [str(o) for o in overrides]


def sweep_config(config: ConfigLike, overrides: Overrides = None, *, home: str | os.PathLike[str] | None = None,
                 storage: str | None = None, trust_stored_config: bool = False) -> SweepConfig:
    """The sweep ``config`` names (see the module docstring); a stored config checked by `check_stored`."""
    sets = override_list(overrides)
    home_text = os.fspath(home) if home is not None else None
    ref: str | Mapping[str, Any] | None
    if isinstance(config, Mapping) or config is None:
        ref = config
    else:
        ref = os.fspath(config)
        if isinstance(config, os.PathLike) and not looks_like_file(ref):
            ref = str(Path(ref).resolve())  # a Path object names a file, even without a suffix or a slash
    resolved = resolve_sweep(ref, sets, home=home_text, storage=storage)
    if isinstance(ref, str) and not looks_like_file(ref) and not trust_stored_config:
        check_stored(resolved, sets)
    return resolved


def trial_config(config: ConfigLike, overrides: Overrides = None) -> TrialConfig:
    """The trial ``config`` names: a YAML path, a dict (the YAML's schema), or None for the built-in default."""
    sets = override_list(overrides)
    if isinstance(config, Mapping):
        data = copy.deepcopy(dict(config))
        apply_overrides(data, sets)
        result: TrialConfig = from_dict(TrialConfig, data).validate()
        return result
    return load_trial_config(os.fspath(config) if config is not None else None, sets)


def _set_by_user(overrides: list[str], key: str) -> bool:
    return any(item.split("=", 1)[0].strip() == key for item in overrides)


def check_stored(config: SweepConfig, overrides: list[str]) -> None:
    """Refuse what a stored config may not do by itself (see the module docstring).

    Raises:
        LoraError: one line naming ``--trust-stored-config``.
    """
    from sweeps.engine.workers import TRUSTED_CODE_ENV, TRUSTED_MODEL_ENV

    name = config.model.name
    delegated = os.environ.get(TRUSTED_MODEL_ENV) == name  # a worker of an owner that was allowed this model
    if delegated and (not config.model.trust_remote_code or os.environ.get(TRUSTED_CODE_ENV) == "1"):
        return
    if config.model.trust_remote_code and not _set_by_user(overrides, "model.trust_remote_code"):
        raise LoraError(f"the config stored in sweep {config.name!r} turns on model.trust_remote_code; a stored "
                        f"config is data, not permission to run code: refused without {TRUST_FLAG}",
                        hint=f"pass {TRUST_FLAG} if you trust everyone who can write the sweep's storage")
    if not _set_by_user(overrides, "model.name") and not delegated and not _on_this_machine(name):
        raise LoraError(f"the config stored in sweep {config.name!r} loads model {name!r}, which is not on this "
                        f"machine; a stored config is data, not permission to download: refused without {TRUST_FLAG}",
                        hint=f"download it yourself (hf download {name}), pass --set model.name=..., or {TRUST_FLAG}")


def _on_this_machine(name: str) -> bool:
    """A built-in alias, an existing local directory, or a hub id whose config is in the Hugging Face cache."""
    from sweeps.models.builtin import builtin_aliases

    if name in builtin_aliases() or Path(name).expanduser().is_dir():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id=name, filename="config.json")
    except Exception:  # not a valid hub id either: nothing on this machine
        return False
    return isinstance(cached, str)


def is_stored_ref(config: ConfigLike) -> bool:
    """Whether ``config`` names a sweep by name (its config then comes from its study)."""
    return isinstance(config, str) and not looks_like_file(config)

