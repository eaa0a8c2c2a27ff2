"""The sweep's Optuna study: where it is stored, its sampler and pruner, creating or resuming it.

Storage: by default a journal file ``<home>/optuna/<sweep name>.journal`` (safe for several processes on
one machine: Optuna's journal backend takes a file lock per write); ``search.storage`` may instead be an
RDB URL (``postgresql://...``, ``sqlite:///...``) for several machines, or another journal path. A
PostgreSQL storage holds a bounded number of connections per process and rides out a restart of the
server (`sweeps.engine.dbretry`). The
study is named after the sweep and is loaded if it exists, so running the same sweep again resumes it;
its fingerprint (the search space and base trial) must then match. The study stores the sweep's config,
so other commands find a sweep by its name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from lora_core import LoraError
from sweeps.config.ref import stored_config
from sweeps.config.sweep import SearchConfig, SweepConfig
from sweeps.names import (
    CONFIG_ATTR,
    FAIL_ATTR,
    FINGERPRINT_ATTR,
    OVER_BUDGET,
)
from sweeps.secrets import private_file
from sweeps.text import first_line, mask_url

log = logging.getLogger(__name__)


def storage_label(config: SweepConfig) -> str:
    """Where the study lives, in words (passwords in URLs masked)."""
    url = config.search.storage
    if url and "://" in url:
        return mask_url(url)
    return str(journal_path(config))


def journal_path(config: SweepConfig) -> Path:
    if config.search.storage:
        return Path(config.search.storage).expanduser().resolve()
    return Path(config.tracking.home).expanduser().resolve() / "optuna" / f"{config.name}.journal"


def open_storage(config: SweepConfig) -> optuna.storages.BaseStorage:
    """The study's storage. A database server's (PostgreSQL) has a bounded connection pool and survives a
    restart of the server (`sweeps.engine.dbretry`); SQLite and journal files are opened as they are."""
    url = config.search.storage
    if url and "://" in url:
        from sweeps.engine.dbretry import ResilientRDBStorage

        try:
            if url.lower().startswith("sqlite"):
                return optuna.storages.RDBStorage(url)
            return ResilientRDBStorage(url)
        except Exception as exc:
            hint = "check search.storage (postgresql://user:pass@host/db, sqlite:///abs.db)"
            if isinstance(exc, ImportError):  # "Failed to import DB access module": no driver for the URL
                hint = ("install the driver: pip install 'lora-sweep[postgres]' (psycopg 3, for postgresql://); "
                        "or write the URL for the driver installed (postgresql+DRIVER://)")
            raise LoraError(f"cannot open the Optuna storage {storage_label(config)}: {first_line(exc)}",
                            hint=hint) from None
    path = journal_path(config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        private_file(path)  # the study holds the sweep's config: its owner's only (0600)
    except OSError as exc:
        raise LoraError(f"cannot create {path.parent}: {exc.strerror or exc}",
                        hint="set tracking.home or search.storage to a writable place") from None
    from sweeps.journal import journal_storage

    return journal_storage(path)


def make_sampler(search: SearchConfig) -> optuna.samplers.BaseSampler:
    """Every setting that differs between Optuna 4 and 5 is given explicitly. With several trials running
    at once in a pack (``search.pack``), TPE's constant liar makes concurrent asks differ."""
    if search.strategy == "tpe":
        return optuna.samplers.TPESampler(seed=search.sampler_seed, n_startup_trials=search.startup_trials,
                                          n_ei_candidates=search.ei_candidates, multivariate=False,
                                          group=False, constant_liar=search.pack != 1)
    return optuna.samplers.RandomSampler(seed=search.sampler_seed)  # grid, ladder: every trial is enqueued


def make_pruner(config: SweepConfig) -> optuna.pruners.BasePruner:
    search, name = config.search, config.search.pruner_name()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=search.prune_startup_trials,
                                           n_warmup_steps=search.prune_warmup_steps, interval_steps=1,
                                           n_min_trials=1)
    if name == "hyperband":
        min_steps = search.hyperband_min_steps or config.train.eval_every
        return optuna.pruners.HyperbandPruner(min_resource=min_steps, max_resource=config.train.steps,
                                              reduction_factor=search.hyperband_reduction, bootstrap_count=0)
    return optuna.pruners.NopPruner()


def fingerprint(config: SweepConfig) -> str:
    """What must not change when a sweep resumes: the base trial (but tracking) and the search space
    (but the budget: ``n_trials`` and ``timeout`` may be raised)."""
    data = config.to_dict()
    data.pop("tracking", None)
    data["search"] = {k: v for k, v in data["search"].items()
                      if k not in ("n_trials", "timeout", "storage", "pack", "test_eval")}  # no result changes
    for key in ("gradient_checkpointing", "micro_batch_size"):  # memory, not results (tested equal)
        data.get("train", {}).pop(key, None)
    if data.get("model", {}).get("quantize") == "none":  # a field added later: sweeps from before still resume
        data["model"].pop("quantize")
    ladder = data["search"].get("ladder")
    if isinstance(ladder, dict):  # when the ladder stops and re-checks the rate: rules, not the trial space
        for key in ("patience", "retune_lr", "climb_undecided"):  # (patience's default changed; the others are new)
            ladder.pop(key, None)
    return json.dumps(data, sort_keys=True, default=str)


def open_study(config: SweepConfig) -> optuna.Study:
    """Create the sweep's study, or load it (checking that it is the same sweep)."""
    storage = open_storage(config)
    directions = config.search.directions(config.model.task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(study_name=config.name, storage=storage, sampler=make_sampler(config.search),
                                    pruner=make_pruner(config), directions=directions, load_if_exists=True)
    if [d.name.lower() for d in study.directions] != directions:
        raise LoraError(f"the study {config.name!r} in {storage_label(config)} optimises "
                        f"{[d.name.lower() for d in study.directions]}, this sweep {directions}",
                        hint="give the sweep another name, or delete the old study")
    print_ = fingerprint(config)
    stored = study.user_attrs.get(FINGERPRINT_ATTR)
    if stored is None:
        study.set_user_attr(FINGERPRINT_ATTR, print_)
    elif stored != print_:
        raise LoraError(f"sweep {config.name!r} already exists in {storage_label(config)} with another search "
                        "space or base trial",
                        hint="resume it with the same YAML (only search.n_trials and search.timeout may change), "
                             "or give the sweep another name")
    stored_cfg = stored_config(config)
    if study.user_attrs.get(CONFIG_ATTR) != stored_cfg:  # the latest budget; lets others name the sweep
        study.set_user_attr(CONFIG_ATTR, stored_cfg)
    return study


def sweep_objectives(config: SweepConfig) -> list[str]:
    first = config.search.objective_name(config.model.task)
    return [first] + ([config.search.second_objective] if config.search.second_objective else [])


def tell(study: optuna.Study, trial: optuna.Trial | int, **kwargs: Any) -> optuna.trial.FrozenTrial:
    """``study.tell`` that leaves a trial another process finished first as it is (Optuna's
    ``skip_if_finished``); returns the trial as stored."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return study.tell(trial, skip_if_finished=True, **kwargs)


def claim_queued(study: optuna.Study) -> optuna.Trial | None:
    """The first WAITING trial this process claims (WAITING -> RUNNING), as ``study.ask()`` takes one;
    None when every queued trial is taken. Unlike ``ask`` it never creates a trial: the grid's and the
    ladder's trials are all enqueued, and a trial ``ask`` made up when another worker had just taken the
    last queued one would be a random repeat of a planned configuration."""
    trial_id = study._pop_waiting_trial_id()  # Optuna's own claim loop (a trial taken meanwhile is skipped)
    if trial_id is None:
        return None
    study._thread_local.cached_all_trials = None  # as ask() does: the sampler reads the study afresh
    return optuna.Trial(study, trial_id)


def release_claim(study: optuna.Study, trial: optuna.Trial | optuna.trial.FrozenTrial) -> None:
    """Give a queued trial this process claimed and has not started back to the queue (RUNNING ->
    WAITING), unchanged, for whichever worker claims it next (`sweeps.engine.trial`: a trial claimed past
    the budget). Optuna's RDB, journal and in-memory storages all allow the move (only a finished trial
    is frozen). Two holes of a plain ``set_trial_state_values`` are closed here:

    - a server storage retries a call that failed on a lost connection (`sweeps.engine.dbretry`); a blind
      retry of a release whose commit went through could put back a trial another worker has claimed
      since. The retry first looks at the trial: WAITING, finished, or RUNNING under another claim than
      ours (``ResilientRDBStorage.claim_token``) means our release took effect;
    - a journal storage says a claim (WAITING -> RUNNING) succeeded when the trial's id is the one it
      remembers this thread owning; that memory, left pointing at the released trial, would make a later
      claim of the same trial that lost the race to another worker look won. It is forgotten here."""
    storage = study._storage
    cached = isinstance(storage, optuna.storages._CachedStorage)  # Optuna wraps an RDB storage in a cache
    backend: Any = storage._backend if cached else storage  # type: ignore[attr-defined]
    trial_id = trial._trial_id
    if isinstance(backend, optuna.storages.RDBStorage):
        from sweeps.engine.dbretry import NOT_DONE, ResilientRDBStorage, retrying

        if isinstance(backend, ResilientRDBStorage):
            plain_set = optuna.storages.RDBStorage.set_trial_state_values
            token = backend.claim_token(trial_id)  # our claim's (reads retried)

            def resolve() -> object:
                if backend.get_trial(trial_id).state == TrialState.RUNNING and backend.claim_token(trial_id) == token:
                    return NOT_DONE  # still our claim: release it (again)
                return True  # released (then maybe claimed by another worker, or finished): leave it

            retrying(lambda: plain_set(backend, trial_id, TrialState.WAITING), getattr(backend, "label", "storage"),
                     resolve, getattr(backend, "bound_s", None))
            return
    storage.set_trial_state_values(trial_id, TrialState.WAITING)
    replay: Any = getattr(backend, "_replay_result", None)  # a journal storage: forget this thread owns it
    owned = getattr(replay, "_worker_id_to_owned_trial_id", None)
    if replay is not None and isinstance(owned, dict):
        with getattr(backend, "_thread_lock", contextlib.nullcontext()):
            if owned.get(replay.worker_id) == trial_id:
                del owned[replay.worker_id]


if not callable(getattr(optuna.Study, "_pop_waiting_trial_id", None)):  # a renamed method in another Optuna
    raise ImportError(f"optuna.Study has no _pop_waiting_trial_id: sweeps.engine.study.claim_queued needs "
                      f"updating for Optuna {optuna.__version__}")


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def state_counts(study: optuna.Study) -> dict[str, int]:
    """Trials by Optuna state; FAIL trials released unrun past the budget (``lora_sweep.fail:
    over_budget``, `sweeps.engine.trial`) are counted apart, as ``OVER_BUDGET``: they are no failure."""
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        name = t.state.name
        if t.state == TrialState.FAIL and t.user_attrs.get(FAIL_ATTR) == OVER_BUDGET:
            name = OVER_BUDGET.upper()
        counts[name] = counts.get(name, 0) + 1
    return counts

