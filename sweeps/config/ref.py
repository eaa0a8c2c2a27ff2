"""Naming a sweep on the command line: ``lora-sweep status|worker|export|ui SWEEP``.

``SWEEP`` is either the sweep's YAML file (as given to ``lora-sweep run``) or the sweep's name. A name
is looked up in its Optuna storage: ``--storage URL`` when given, else the journal file
``<home>/optuna/<name>.journal`` (``--home``, default ``lora-sweeps`` as in the trial config). Every
study that ``lora-sweep run`` creates stores its full sweep config (``lora_sweep.config``, with the
tracking home made absolute), so a name is enough to join, inspect or export a sweep from another
directory or machine. ``--set`` overrides apply on top (for example ``tracking.uri`` on a machine that
reaches the tracking server by another address); a change to the search space is refused when the
study opens, as for ``run``.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lora_core import LoraError
from sweeps.config.sweep import SWEEP_NAME_RE, SweepConfig, load_sweep_config
from sweeps.config.trial import apply_overrides, from_dict
from sweeps.names import CONFIG_ATTR
from sweeps.secrets import STORAGE_ENV, STORAGE_FILE_ENV, storage_from_env
from sweeps.text import first_line, mask_url

__all__ = ["DEFAULT_HOME", "known_sweeps", "looks_like_file", "lookup_engine_kwargs", "resolve_sweep",
           "server_connect_args", "stored_config"]

DEFAULT_HOME = "lora-sweeps"


def stored_config(config: SweepConfig) -> dict[str, Any]:
    """The config as stored in the study: the tracking home absolute, so any directory can use it; URLs
    without their credentials (a process that reads it gets them from its own command line or environment)."""
    data = config.stored_dict()
    data["tracking"]["home"] = str(Path(config.tracking.home).expanduser().resolve())
    return data


def looks_like_file(text: str) -> bool:
    """Whether ``SWEEP`` names a YAML file rather than a sweep."""
    return text.endswith((".yaml", ".yml")) or "/" in text or Path(text).is_file()


def known_sweeps(home: str | Path) -> list[str]:
    """The sweeps with a journal file under ``<home>/optuna``."""
    folder = Path(home).expanduser() / "optuna"
    return sorted(p.name[: -len(".journal")] for p in folder.glob("*.journal") if p.is_file())


def resolve_sweep(ref: str | Mapping[str, Any] | None, overrides: list[str] | None = None, *, home: str | None = None,
                  storage: str | None = None) -> SweepConfig:
    """The sweep config ``ref`` names (a YAML path, a sweep name, or None for the built-in demo), or the sweep
    ``ref`` is (a mapping of the YAML's schema: the Python API's ``sweeps.run({...})``, read as a YAML is).

    ``home`` and ``storage`` (the command line's ``--home``/``--storage``) say where to look for a
    named sweep, and override ``tracking.home``/``search.storage`` of a YAML. Without ``storage``, the
    environment's ``LORA_SWEEP_STORAGE`` (or the file ``LORA_SWEEP_STORAGE_FILE`` names) stands for it: the
    way to hand a process a URL with a password without putting it on its command line.
    """
    overrides = list(overrides or [])
    storage = storage or _env_storage()
    extra = ([f"tracking.home={home}"] if home else []) + ([f"search.storage={storage}"] if storage else [])
    if isinstance(ref, Mapping):
        data = copy.deepcopy(dict(ref))
        apply_overrides(data, extra + overrides)
        return from_dict(SweepConfig, data).validate()
    if ref is None or looks_like_file(ref):
        return load_sweep_config(ref, extra + overrides)
    if not SWEEP_NAME_RE.match(ref):
        raise LoraError(f"{ref!r} is neither a sweep YAML file nor a sweep name",
                        hint="pass the sweep's YAML, or its name (letters, digits, '.', '_', '-')")
    data = _load_from_study(ref, home or DEFAULT_HOME, storage)
    if home:
        data.setdefault("tracking", {})["home"] = home
    if storage:
        data.setdefault("search", {})["storage"] = storage
    apply_overrides(data, overrides)
    return from_dict(SweepConfig, data).validate()


def _env_storage() -> str | None:
    try:
        return storage_from_env()
    except OSError as exc:
        raise LoraError(f"cannot read the storage URL file ${STORAGE_FILE_ENV}: {exc.strerror or exc}",
                        hint=f"point {STORAGE_FILE_ENV} at a readable file holding the URL, or set {STORAGE_ENV}") from None


def server_connect_args(backend: str) -> dict[str, Any]:
    """Driver options of every connection lora-sweep opens to a database server (``backend``, SQLAlchemy's
    name): a 10 s connect timeout, TCP keepalives, and for PostgreSQL the ``application_name``
    ``lora-sweep pid N`` that ``pg_stat_activity`` shows (see `sweeps.engine.dbretry`)."""
    if backend == "postgresql":
        return {"connect_timeout": 10, "application_name": f"lora-sweep pid {os.getpid()}",
                "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
    if backend == "mysql":
        return {"connect_timeout": 10}
    return {}


def lookup_engine_kwargs(url: str) -> dict[str, Any]:
    """Engine options for a short look-up in a server storage: no pool (each connection closed when the call
    returns, so the look-up keeps none), the connect arguments above; SQLite as it is."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        return {}
    return {"poolclass": NullPool, "connect_args": server_connect_args(backend)}


def _load_from_study(name: str, home: str, storage: str | None) -> dict[str, Any]:
    import optuna

    if storage and "://" in storage:
        label = storage
        try:
            backend: Any = optuna.storages.RDBStorage(storage, engine_kwargs=lookup_engine_kwargs(storage))
        except Exception as exc:
            raise LoraError(f"cannot open the Optuna storage {mask_url(storage)}: {first_line(exc)}",
                            hint="check --storage (postgresql://user:pass@host/db, sqlite:///abs.db)") from None
    else:
        path = Path(storage).expanduser() if storage else Path(home).expanduser() / "optuna" / f"{name}.journal"
        label = str(path)
        if not path.is_file():
            names = [] if storage else known_sweeps(home)
            raise LoraError(f"no sweep named {name!r} in {path.parent.parent.resolve()} ({path.name} does not exist)",
                            hint=(f"sweeps there: {', '.join(names)}" if names else "no sweeps there")
                            + "; or pass the sweep's YAML, or --home/--storage where it was run")
        from sweeps.journal import journal_storage

        backend = journal_storage(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            study = optuna.load_study(study_name=name, storage=backend)
        except KeyError:
            names = [s.study_name for s in optuna.get_all_study_summaries(backend, include_best_trial=False)]
            raise LoraError(f"no sweep named {name!r} in {mask_url(label)}",
                            hint=f"sweeps there: {', '.join(names) or 'none'}") from None
    data = study.user_attrs.get(CONFIG_ATTR)
    if not isinstance(data, dict):
        raise LoraError(f"the study {name!r} in {mask_url(label)} does not hold its sweep config",
                        hint="it was not created by lora-sweep run; pass the sweep's YAML instead")
    return copy.deepcopy(data)
