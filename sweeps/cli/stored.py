"""A sweep named on the command line, with its stored config treated as data.

A command given a sweep's *name* (``worker``, ``status``, ``report``, ``export``, ``ui``, ``plan``, ``run
NAME``) reads the sweep's config back from its Optuna study. Whoever can write that database could put
anything in it, so what it says is not permission to run code: unless the command says
``--trust-stored-config`` (or sets the value itself with ``--set``), a stored config may neither turn on
``model.trust_remote_code`` nor name a hub model that is not already on this machine (a built-in alias, a
local directory and a model in the Hugging Face cache load as they are; anything else would be
downloaded from a place the user never chose). A sweep's YAML is the user's own and is taken as it is; the
workers that ``run --workers N`` starts may load what their owner was allowed to (``LORA_SWEEP_TRUSTED_*``,
`sweeps.engine.workers.worker_env`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lora_core import LoraError
from sweeps.config.ref import looks_like_file, resolve_sweep
from sweeps.config.sweep import SweepConfig

__all__ = ["TRUST_FLAG", "check_stored", "resolve_args", "resolve_ref"]

TRUST_FLAG = "--trust-stored-config"


def resolve_args(args: argparse.Namespace, *, loads_model: bool = True) -> SweepConfig:
    """The sweep ``args.sweep`` names (see :func:`resolve_ref`)."""
    return resolve_ref(args, args.sweep, loads_model=loads_model)


def resolve_ref(args: argparse.Namespace, ref: str | None, *, loads_model: bool = True) -> SweepConfig:
    """The sweep ``ref`` names, with the command line's ``--set``, ``--home`` and ``--storage``; for a command
    that loads the sweep's model (``loads_model``; not ``status`` or ``ui``), a config read back from a study
    is checked by :func:`check_stored` unless ``--trust-stored-config`` was given."""
    overrides = list(getattr(args, "set", None) or [])
    config = resolve_sweep(ref, overrides, home=args.home, storage=args.storage)
    if loads_model and ref is not None and not looks_like_file(ref) and not getattr(args, "trust_stored_config", False):
        check_stored(config, overrides)
    return config


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
