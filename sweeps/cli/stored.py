"""A sweep named on the command line, with its stored config treated as data.

A command given a sweep's *name* (``worker``, ``status``, ``report``, ``export``, ``ui``, ``plan``, ``run
NAME``) reads the sweep's config back from its Optuna study. Whoever can write that database could put
anything in it, so what it says is not permission to run code: unless the command says
``--trust-stored-config`` (or sets the value itself with ``--set``), a stored config may neither turn on
``model.trust_remote_code`` nor name a hub model that is not already on this machine (a built-in alias, a
local directory and a model in the Hugging Face cache load as they are; anything else would be
downloaded from a place the user never chose). A sweep's YAML is the user's own and is taken as it is; the
workers that ``run --workers N`` starts may load what their owner was allowed to (``LORA_SWEEP_TRUSTED_*``,
`sweeps.engine.workers.worker_env`). The rule is the Python API's (`sweeps.api.resolve.check_stored`).
"""

from __future__ import annotations

import argparse

from sweeps.api.resolve import TRUST_FLAG, check_stored, sweep_config
from sweeps.config.sweep import SweepConfig

__all__ = ["TRUST_FLAG", "check_stored", "resolve_args", "resolve_ref"]


def resolve_args(args: argparse.Namespace, *, loads_model: bool = True) -> SweepConfig:
    """The sweep ``args.sweep`` names (see :func:`resolve_ref`)."""
    return resolve_ref(args, args.sweep, loads_model=loads_model)


def resolve_ref(args: argparse.Namespace, ref: str | None, *, loads_model: bool = True) -> SweepConfig:
    """The sweep ``ref`` names, with the command line's ``--set``, ``--home`` and ``--storage``; for a command
    that loads the sweep's model (``loads_model``; not ``status`` or ``ui``), a config read back from a study
    is checked by :func:`check_stored` unless ``--trust-stored-config`` was given."""
    trust = not loads_model or bool(getattr(args, "trust_stored_config", False))
    return sweep_config(ref, list(getattr(args, "set", None) or []), home=args.home, storage=args.storage,
                        trust_stored_config=trust)
