"""Reading a sweep's study without creating or changing anything: for status, export and the report."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna

from lora_core import LoraError
from sweeps.config.ref import lookup_engine_kwargs
from sweeps.config.sweep import SweepConfig
from sweeps.engine.study import fingerprint, journal_path, storage_label
from sweeps.names import (
    FINGERPRINT_ATTR,
)
from sweeps.text import first_line


def load_study_readonly(config: SweepConfig, same_sweep: bool = False) -> optuna.Study:
    """The sweep's study, loaded without creating it or anything else (for status, export, reports).

    ``same_sweep``: also check that ``config`` (say, a YAML) is the sweep that ran (its fingerprint).

    Raises:
        LoraError: the storage or the study does not exist or cannot be read, or (``same_sweep``)
            the study holds another search space or base trial.
    """
    label = storage_label(config)
    url = config.search.storage
    hint = f"start it with lora-sweep run, or check --home/--storage (a sweep named {config.name!r})"
    try:
        if url and "://" in url:
            if url.lower().startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
                raise LoraError(f"sweep {config.name!r} has not been run: {label} does not exist", hint=hint)
            # no pool: a connection per call, closed after it (the owner of a sweep writes the report while
            # its study's pool is still open: sweeps.engine.dbretry counts the connections of a process)
            backend: Any = optuna.storages.RDBStorage(url, skip_table_creation=True,
                                                      engine_kwargs=lookup_engine_kwargs(url))
        else:
            path = journal_path(config)
            if not path.is_file():
                raise LoraError(f"sweep {config.name!r} has not been run: {path} does not exist", hint=hint)
            from sweeps.journal import journal_storage

            backend = journal_storage(path)
    except LoraError:
        raise
    except Exception as exc:
        raise LoraError(f"cannot open the Optuna storage {label}: {first_line(exc)}",
                        hint="check search.storage / --storage") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            study = optuna.load_study(study_name=config.name, storage=backend)
        except KeyError:
            try:
                names = [s.study_name for s in optuna.get_all_study_summaries(backend, include_best_trial=False)]
            except Exception:
                names = []
            raise LoraError(f"no sweep named {config.name!r} in {label}",
                            hint=f"sweeps there: {', '.join(names) or 'none'}; {hint}") from None
        except Exception as exc:
            raise LoraError(f"cannot read the study {config.name!r} in {label}: {first_line(exc)}",
                            hint="check search.storage / --storage") from None
    stored = study.user_attrs.get(FINGERPRINT_ATTR)
    if same_sweep and stored is not None and stored != fingerprint(config):
        raise LoraError(f"this YAML is not the sweep {config.name!r} that ran in {label}: its search space or "
                        "base trial differs",
                        hint=f"name the sweep instead (e.g. lora-sweep export {config.name} --home DIR): the "
                             "study stores the config it ran with")
    return study

