"""The sweep driver: an Optuna study run through ask/tell, one tracked trial (MLflow child run) at a time.

    >>> result = run_sweep(load_sweep_config("examples/demo-sweep.yaml"))   # a TPE sweep
    >>> result.best[0].values, result.best[0].params

Storage: by default a journal file ``<home>/optuna/<sweep name>.journal`` (safe for several processes on
one machine: Optuna's journal backend takes a file lock per write); ``search.storage`` may instead be an
RDB URL (``postgresql://...``, ``sqlite:///...``) for several machines, or another journal path. The
study is named after the sweep and is loaded if it exists, so running the same sweep again resumes it.

Trials:

- each Optuna trial is one configuration at one seed. A configuration the sampler proposes is trial
  ``seed_index`` 0; its repeats (``seed_index`` 1 .. seeds-1) are enqueued at once with the same
  params (``study.enqueue_trial``), so TPE sees every seed as one observation of the same point and
  any worker sharing the storage can claim them. The trial's seed is ``config.seed + seed_index``;
  the data split always uses ``config.seed`` (prepared once per sweep), so every trial is judged
  on the same validation set.
- ``strategy: grid`` enqueues the whole grid (configurations in the order written, then seeds); the
  sampler is never consulted. (Optuna's ``GridSampler`` calls ``study.stop()`` when the grid runs
  out, which raises outside ``study.optimize``; enqueued trials avoid that and are claimable by
  several workers in the same way.)
- the budget ``n_trials`` counts COMPLETE + PRUNED trials in the study plus RUNNING trials of live
  workers; FAIL trials do not count. No new trial starts after ``timeout`` seconds (of this run).
- pruning (single objective only): the trainer's report hook calls ``trial.report(value, step)``
  after each evaluation and raises ``StopTrial`` when ``trial.should_prune()``.

Resume, and what "a trial left RUNNING by a crash" means: each trial carries a ``lora_sweep.worker``
user attr (host, pid, process start time) and a ``lora_sweep.heartbeat`` time refreshed every
``HEARTBEAT_S`` by a background thread. At start-up, a RUNNING trial is stale when its worker is on
this host and that process no longer exists (pid gone or reused), or, for other hosts, when its
heartbeat is older than ``STALE_AFTER_S``. (Optuna's own heartbeat works only for RDB storages and
only inside ``study.optimize``, so the driver keeps its own, for both storages.) Stale trials are
told FAIL, their MLflow runs are ended FAILED, and every configuration then gets back the seeds it
is missing: a seed is missing when no trial of it is COMPLETE, PRUNED, RUNNING or WAITING, unless
the configuration already FAILED by an error of its own (NaN loss, an unknown target...), which a
retry would only repeat. The MLflow parent run's id is kept in the study's user attrs and reused.

Ctrl-C: the running trial is told FAIL (user attr ``lora_sweep.fail: interrupted``) and its MLflow run
ends KILLED; the parent run ends KILLED; the next run re-queues the trial with the same params.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from lora_core import LoraError
from sweeps.config.ref import CONFIG_ATTR, stored_config
from sweeps.config.sweep import LogRange, SearchConfig, SweepConfig
from sweeps.config.trial import TrialConfig
from sweeps.data.prepare import PreparedData, prepare_data
from sweeps.engine.ladder import (
    COST_ATTR,
    RUNG_ATTR,
    STAGE_ATTR,
    STEPS_ATTR,
    LadderSpec,
    Observation,
    ladder_spec,
)
from sweeps.engine.ladder import plan as ladder_plan
from sweeps.models.load import BaseModelCache, load_tokenizer
from sweeps.tracking.store import (
    KIND_TAG,
    STATE_TAG,
    TrialRun,
    artifact_location,
    client_for,
    default_run_name,
    ensure_experiment,
    param_value,
    quiet_mlflow,
    tracking_uri,
    trial_params,
)
from sweeps.training.trainer import StopTrial, run_trial

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = [
    "BestTrial",
    "SweepProgress",
    "SweepResult",
    "estimate_left",
    "load_study_readonly",
    "open_study",
    "recover",
    "run_sweep",
    "storage_label",
]

log = logging.getLogger(__name__)

SEED_INDEX = "seed_index"
WORKER_ATTR = "lora_sweep.worker"
HEARTBEAT_ATTR = "lora_sweep.heartbeat"
RUN_ID_ATTR = "mlflow_run_id"
FAIL_ATTR = "lora_sweep.fail"           # "error" (not retried) or "interrupted" (retried)
RETRY_ATTR = "lora_sweep.retry_of"
PARENT_ATTR = "lora_sweep.parent_run_id"  # study user attr
FINGERPRINT_ATTR = "lora_sweep.fingerprint"  # study user attr: what must not change on resume
BEST_RUNS_ATTR = "lora_sweep.best_run_ids"   # study user attr
BEST_TAG = "lora_sweep.best"
LADDER_ATTR = "lora_sweep.ladder"           # study user attr: the ladder's decisions (sweeps.ladder.Plan)
LADDER_POLL_S = 2.0
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
MAX_CONSECUTIVE_FAILURES = 3
PARAM_NAMES = ("r", "alpha", "targets", "lr", "dropout")  # alpha is alpha_per_r for multiples of r


# --------------------------------------------------------------------------- results and progress

@dataclass
class BestTrial:
    number: int
    values: list[float]
    params: dict[str, Any]
    seed_index: int
    run_id: str | None


@dataclass
class SweepProgress:
    """A snapshot for a progress display; passed to ``run_sweep(progress=...)`` on every change."""

    budget: int
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int | None = None          # this worker's trial number
    running_params: dict[str, Any] = field(default_factory=dict)
    running_seed: int = 0
    step: int = 0
    steps: int = 0
    best_value: float | None = None
    best_number: int | None = None
    objective: str = ""
    event: str = ""                     # what just happened, in words ("" for step updates)
    running_total: int = 0              # RUNNING trials of the study (all workers)
    elapsed_s: float = 0.0              # since this run started
    eta_s: float | None = None          # estimated time to finish the budget (None: no estimate yet)
    workers: int = 1
    ladder: bool = False                # the budget is the most a ladder can plan; it may stop sooner

    def read_counts(self, study: optuna.Study) -> None:
        """Trials by state and the best so far (single objective), from the study."""
        counts = _state_counts(study)
        self.complete, self.pruned = counts.get("COMPLETE", 0), counts.get("PRUNED", 0)
        self.failed, self.running_total = counts.get("FAIL", 0), counts.get("RUNNING", 0)
        if len(study.directions) == 1:
            best = best_trials(study)
            self.best_value = best[0].value if best else None
            self.best_number = best[0].number if best else None


def shown_budget(config: SweepConfig) -> int:
    """The trials a progress display counts towards: the budget, or for a ladder the most it can plan."""
    if config.search.strategy == "ladder":
        from sweeps.engine.ladder import planned_total

        return min(config.search.budget(), planned_total(ladder_spec(config)))
    return config.search.budget()


def estimate_left(study: optuna.Study, budget: int, workers: int, timeout_left: float | None,
                  now: float | None = None) -> float | None:
    """Seconds until the budget is done: the median duration of finished (COMPLETE/PRUNED) trials
    times the trials still to start, spread over the workers, plus what the running ones still need;
    capped by the timeout. None before any trial finished."""
    now = time.time() if now is None else now
    trials = study.get_trials(deepcopy=False)
    durations = sorted(t.duration.total_seconds() for t in trials
                       if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.duration is not None)
    if not durations:
        return None
    typical = durations[len(durations) // 2]
    done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    running_left = [max(0.0, typical - (now - t.datetime_start.timestamp())) for t in running
                    if t.datetime_start is not None]
    to_start = max(0, budget - done - len(running))
    workers = max(1, workers)
    left = (max(running_left) if running_left else 0.0) if to_start == 0 else \
        (sum(running_left) + to_start * typical) / workers
    return min(left, timeout_left) if timeout_left is not None else left


@dataclass
class SweepResult:
    """What one ``run_sweep`` call did. Times in seconds."""

    study_name: str
    storage: str
    experiment: str
    parent_run_id: str
    stopped: str                        # "budget" | "timeout" | "interrupted" | "ladder" (its plan is done)
    states: dict[str, int]              # trials of the study by Optuna state, after this run
    best: list[BestTrial]               # the best trial (single objective) or the Pareto front
    objectives: list[str]
    directions: list[str]
    trials_run: int = 0                 # by this call
    recovered: list[int] = field(default_factory=list)  # stale trial numbers failed at start-up
    ladder: dict[str, Any] | None = None  # a ladder's decisions and recommendation (LADDER_ATTR)
    recommended_trial: int | None = None  # a ladder's recommended configuration: its best seed's trial
    requeued: int = 0
    wall_s: float = 0.0                 # this call, from start to return
    trial_train_s: float = 0.0          # sum of this call's trials' train_s
    trial_eval_s: float = 0.0

    @property
    def overhead_s(self) -> float:
        """Wall time not spent training or evaluating (data preparation, model loading, tracking, Optuna)."""
        return self.wall_s - self.trial_train_s - self.trial_eval_s

    @property
    def overhead_fraction(self) -> float:
        return self.overhead_s / self.wall_s if self.wall_s > 0 else 0.0


# --------------------------------------------------------------------------- storage and study

def storage_label(config: SweepConfig) -> str:
    """Where the study lives, in words (passwords in URLs masked)."""
    url = config.search.storage
    if url and "://" in url:
        return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url)
    return str(journal_path(config))


def journal_path(config: SweepConfig) -> Path:
    if config.search.storage:
        return Path(config.search.storage).expanduser().resolve()
    return Path(config.tracking.home).expanduser().resolve() / "optuna" / f"{config.name}.journal"


def open_storage(config: SweepConfig) -> optuna.storages.BaseStorage:
    url = config.search.storage
    if url and "://" in url:
        try:
            return optuna.storages.RDBStorage(url)
        except Exception as exc:
            raise LoraError(f"cannot open the Optuna storage {storage_label(config)}: {_first_line(exc)}",
                            hint="check search.storage (postgresql://user:pass@host/db, sqlite:///abs.db)") from None
    path = journal_path(config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LoraError(f"cannot create {path.parent}: {exc.strerror or exc}",
                        hint="set tracking.home or search.storage to a writable place") from None
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def make_sampler(search: SearchConfig) -> optuna.samplers.BaseSampler:
    """Every setting that differs between Optuna 4 and 5 is given explicitly."""
    if search.strategy == "tpe":
        return optuna.samplers.TPESampler(seed=search.sampler_seed, n_startup_trials=search.startup_trials,
                                          n_ei_candidates=search.ei_candidates, multivariate=False,
                                          group=False, constant_liar=False)
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
    data["search"] = {k: v for k, v in data["search"].items() if k not in ("n_trials", "timeout", "storage")}
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
            backend: Any = optuna.storages.RDBStorage(url, skip_table_creation=True)
        else:
            path = journal_path(config)
            if not path.is_file():
                raise LoraError(f"sweep {config.name!r} has not been run: {path} does not exist", hint=hint)
            from optuna.storages.journal import JournalFileBackend

            backend = optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    except LoraError:
        raise
    except Exception as exc:
        raise LoraError(f"cannot open the Optuna storage {label}: {_first_line(exc)}",
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
            raise LoraError(f"cannot read the study {config.name!r} in {label}: {_first_line(exc)}",
                            hint="check search.storage / --storage") from None
    stored = study.user_attrs.get(FINGERPRINT_ATTR)
    if same_sweep and stored is not None and stored != fingerprint(config):
        raise LoraError(f"this YAML is not the sweep {config.name!r} that ran in {label}: its search space or "
                        "base trial differs",
                        hint=f"name the sweep instead (e.g. lora-sweep export {config.name} --home DIR): the "
                             "study stores the config it ran with")
    return study


# --------------------------------------------------------------------------- sampling

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


# --------------------------------------------------------------------------- workers and recovery

@dataclass(frozen=True)
class Worker:
    host: str
    pid: int
    started: str  # the process start time in clock ticks since boot (Linux), to detect a reused pid

    @classmethod
    def current(cls) -> Worker:
        return cls(socket.gethostname(), os.getpid(), _process_start(os.getpid()))

    def as_attr(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "started": self.started}


def _process_start(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 (starttime), counted after "pid (comm)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(trial: FrozenTrial, me: Worker, now: float | None = None) -> bool:
    """Whether a RUNNING trial belongs to no live worker (see the module docstring)."""
    now = time.time() if now is None else now
    worker = trial.user_attrs.get(WORKER_ATTR)
    if not isinstance(worker, dict):  # asked, but the worker died before naming itself
        started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
        return now - started > STALE_AFTER_S
    if worker.get("host") == me.host:
        pid = int(worker.get("pid", -1))
        if pid == me.pid and worker.get("started") == me.started:
            return False  # ours (cannot happen at start-up, but keeps the rule total)
        if not _pid_alive(pid):
            return True
        started = worker.get("started") or ""
        return bool(started) and _process_start(pid) not in ("", started)
    beat = float(trial.user_attrs.get(HEARTBEAT_ATTR, 0.0))
    return now - beat > STALE_AFTER_S


def _tell(study: optuna.Study, trial: optuna.Trial | int, **kwargs: Any) -> bool:
    """``study.tell``; False when another process finished the trial first."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study.tell(trial, **kwargs)
        return True
    except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError, ValueError) as exc:
        log.warning("could not tell trial %s: %s", trial if isinstance(trial, int) else trial.number,
                    _first_line(exc))
        return False


@contextlib.contextmanager
def recovery_lock(config: SweepConfig, study: optuna.Study) -> Iterator[None]:
    """Serialise `recover` between workers, so two that start (or restart) at the same moment cannot
    both re-queue a missing seed: an exclusive lock file next to a journal or sqlite storage, a
    PostgreSQL advisory lock (MySQL ``GET_LOCK``) for a server storage."""
    url = config.search.storage or ""
    if "://" not in url or url.startswith("sqlite"):
        import fcntl

        target = Path(url.split(":///", 1)[1]) if url.startswith("sqlite") else journal_path(config)
        lock_path = target.with_name(target.name + ".recover.lock")
        with open(lock_path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    storage = getattr(study, "_storage", None)
    engine = getattr(getattr(storage, "_backend", storage), "engine", None)  # RDB storages come cached
    dialect = engine.dialect.name if engine is not None else ""
    if dialect not in ("postgresql", "mysql"):
        log.debug("no recovery lock for a %s storage", dialect or "non-RDB")
        yield
        return
    from sqlalchemy import text

    key = int.from_bytes(hashlib.sha256(f"lora-sweep:{config.name}".encode()).digest()[:8], "big", signed=True)
    with engine.connect() as conn:
        if dialect == "postgresql":
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        else:
            conn.execute(text("SELECT GET_LOCK(:k, -1)"), {"k": f"lora-sweep:{config.name}"[:64]})
        try:
            yield
        finally:
            if dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            else:
                conn.execute(text("SELECT RELEASE_LOCK(:k)"), {"k": f"lora-sweep:{config.name}"[:64]})


def recover(study: optuna.Study, config: SweepConfig, client: MlflowClient | None = None,
            me: Worker | None = None) -> tuple[list[int], int]:
    """Fail stale RUNNING trials (ending their MLflow runs FAILED), then enqueue every seed a
    configuration is missing (and, for a grid, every configuration not yet in the study). Runs under
    `recovery_lock`.

    Returns (numbers of the trials failed, number of trials enqueued).
    """
    with recovery_lock(config, study):
        return _recover(study, config, client, me)


def _recover(study: optuna.Study, config: SweepConfig, client: MlflowClient | None,
             me: Worker | None) -> tuple[list[int], int]:
    me = me or Worker.current()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if is_stale(t, me) and _tell(study, t.number, state=TrialState.FAIL):
            failed.append(t.number)
            if client is not None:
                for run_id in _orphan_run_ids(client, config, study.study_name, t):
                    _end_orphan_run(client, run_id, t)
    search = config.search
    if search.strategy == "ladder":  # the ladder's plan enqueues every slot that has no live trial
        return failed, 0
    trials = study.get_trials(deepcopy=False)
    covered: dict[str, set[int]] = {}
    broken: set[str] = set()
    known: dict[str, dict[str, Any]] = {}
    keep = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    for t in trials:
        params = _planned_params(t)
        if params is None or len(params) < len(PARAM_NAMES):  # crashed while sampling: nothing to repeat
            continue
        key = config_key(params)
        known.setdefault(key, params)
        if t.state in keep:
            covered.setdefault(key, set()).add(int(t.user_attrs.get(SEED_INDEX, 0)))
        elif t.state == TrialState.FAIL and t.user_attrs.get(FAIL_ATTR) == "error":
            broken.add(key)
    if search.strategy == "grid":
        for params in grid_configs(search):
            known.setdefault(config_key(params), params)
    enqueued = 0
    for key, params in known.items():  # dicts keep insertion order: study order, then the grid's
        if key in broken:
            continue
        for k in range(search.seeds):
            if k not in covered.get(key, set()):
                with _quiet_optuna():
                    study.enqueue_trial(params, user_attrs={SEED_INDEX: k}, skip_if_exists=False)
                enqueued += 1
    return failed, enqueued


def _planned_params(t: FrozenTrial) -> dict[str, Any] | None:
    if t.state == TrialState.WAITING:
        return dict(t.system_attrs.get("fixed_params") or {}) or None
    return dict(t.params) or None


def _orphan_run_ids(client: MlflowClient, config: SweepConfig, study_name: str, t: FrozenTrial) -> list[str]:
    """The MLflow run(s) of a stale trial: from its user attr, else (killed before it was set) by tags."""
    from mlflow.exceptions import MlflowException

    run_id = t.user_attrs.get(RUN_ID_ATTR)
    if run_id:
        return [run_id]
    try:
        with quiet_mlflow():
            exp = client.get_experiment_by_name(config.experiment())
            if exp is None:
                return []
            runs = client.search_runs([exp.experiment_id], max_results=10, filter_string=(
                f"tags.`optuna.study_name` = '{study_name}' and tags.`optuna.trial_number` = '{t.number}' "
                "and attributes.status = 'RUNNING'"))
    except MlflowException as exc:
        log.warning("could not look for the MLflow run of trial %d: %s", t.number, _first_line(exc))
        return []
    return [r.info.run_id for r in runs]


def _end_orphan_run(client: MlflowClient, run_id: str, t: FrozenTrial) -> None:
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    worker = t.user_attrs.get(WORKER_ATTR) or {}
    why = f"worker died: process {worker.get('pid', '?')} on {worker.get('host', '?')} left the trial RUNNING"
    try:
        with quiet_mlflow():
            if client.get_run(run_id).info.status != "RUNNING":
                return
            client.log_batch(run_id, tags=[RunTag(STATE_TAG, "FAILED"), RunTag("lora_sweep.error", why),
                                           RunTag("optuna.state", "FAIL")], synchronous=True)
            client.set_terminated(run_id, status="FAILED")
    except MlflowException as exc:
        log.warning("could not end the MLflow run %s of trial %d: %s", run_id, t.number, _first_line(exc))


class Heartbeat:
    """Refresh ``lora_sweep.heartbeat`` on a trial every ``interval`` seconds from a daemon thread."""

    def __init__(self, trial: optuna.Trial, interval: float = HEARTBEAT_S) -> None:
        self.trial, self.interval = trial, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{trial.number}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.trial.set_user_attr(HEARTBEAT_ATTR, time.time())
            except Exception as exc:  # the trial was told meanwhile, or the storage hiccupped
                log.debug("heartbeat of trial %d: %s", self.trial.number, _first_line(exc))

    def __enter__(self) -> Heartbeat:
        self.trial.set_user_attr(HEARTBEAT_ATTR, time.time())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- MLflow parent run

def _parent_params(config: SweepConfig) -> dict[str, str]:
    params = trial_params(config.base_trial())
    for key, value in dataclasses.asdict(config.search).items():
        params[f"search.{key}"] = param_value(value)
    params["search.storage"] = storage_label(config)
    return params


def open_parent_run(study: optuna.Study, config: SweepConfig, client: MlflowClient) -> str:
    """The sweep's parent run: found again from the study's user attrs (set RUNNING again), or created."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    run_id = study.user_attrs.get(PARENT_ATTR)
    experiment_id = ensure_experiment(client, config.experiment(), artifact_location(config.tracking))
    if run_id:
        try:
            with quiet_mlflow():
                run = client.get_run(run_id)
                if run.info.lifecycle_stage != "deleted":
                    client.update_run(run_id, status="RUNNING")
                    return run_id
        except MlflowException:
            log.warning("the sweep's parent run %s is gone from %s; starting a new one", run_id,
                        tracking_uri(config.tracking))
    tags = {KIND_TAG: "sweep", "lora_sweep.sweep": config.name, "optuna.study_name": config.name,
            "optuna.storage": storage_label(config), "lora_sweep.strategy": config.search.strategy,
            "lora_sweep.objective": ",".join(sweep_objectives(config)),
            "lora_sweep.direction": ",".join(config.search.directions(config.model.task))}
    with quiet_mlflow():
        run = client.create_run(experiment_id, tags=tags, run_name=config.name)
        run_id = run.info.run_id
        params = [Param(k, v) for k, v in _parent_params(config).items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i:i + 100], synchronous=True)
        client.log_text(run_id, yaml.safe_dump(config.to_dict(), sort_keys=False), "sweep.yaml")
    study.set_user_attr(PARENT_ATTR, run_id)
    return run_id


def sweep_objectives(config: SweepConfig) -> list[str]:
    first = config.search.objective_name(config.model.task)
    return [first] + ([config.search.second_objective] if config.search.second_objective else [])


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best COMPLETE trial (single objective) or the Pareto front; [] when nothing completed.

    With seed repeats (single objective), the best is judged by configuration, not by one lucky seed:
    the configuration (params, and a ladder's stage) with the best mean over its COMPLETE seeds wins
    (ties: more seeds, then the earlier trial), and its best seed's trial is returned."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return []
    if len(study.directions) > 1:
        return study.best_trials
    groups: dict[str, list[FrozenTrial]] = {}
    for t in complete:
        key = config_key({**t.params, "stage": t.user_attrs.get(STAGE_ATTR)})
        groups.setdefault(key, []).append(t)
    if all(len(g) == 1 for g in groups.values()):
        return [study.best_trial]
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0

    def rank(group: list[FrozenTrial]) -> tuple[float, int, int]:
        mean = sum(t.values[0] for t in group) / len(group)
        return (sign * mean, len(group), -min(t.number for t in group))

    group = max(groups.values(), key=rank)
    return [max(group, key=lambda t: (sign * t.values[0], -t.number))]


def tag_best(study: optuna.Study, config: SweepConfig, client: MlflowClient, parent_run_id: str) -> list[BestTrial]:
    """Tag the best trial's child run ``lora_sweep.best=true`` (untagging earlier bests) and log the best
    value, params and run to the parent run."""
    from mlflow.entities import Metric, RunTag

    best = [BestTrial(t.number, list(t.values), dict(t.params), int(t.user_attrs.get(SEED_INDEX, 0)),
                      t.user_attrs.get(RUN_ID_ATTR)) for t in best_trials(study)]
    new_ids = [b.run_id for b in best if b.run_id]
    old_ids = study.user_attrs.get(BEST_RUNS_ATTR) or []
    with quiet_mlflow():
        for run_id in old_ids:
            if run_id not in new_ids:
                client.set_tag(run_id, BEST_TAG, "false")
        for run_id in new_ids:
            client.set_tag(run_id, BEST_TAG, "true")
    if new_ids != old_ids:
        study.set_user_attr(BEST_RUNS_ATTR, new_ids)
    counts = _state_counts(study)
    now = int(time.time() * 1000)
    done = counts.get("COMPLETE", 0) + counts.get("PRUNED", 0)
    metrics = [Metric(f"n_{state.lower()}", float(n), now, 0) for state, n in counts.items()]
    tags = []
    objectives = sweep_objectives(config)
    if best and len(best) == 1:
        b = best[0]
        metrics.append(Metric(f"best_{objectives[0]}", b.values[0], now, done))
        tags += [RunTag("lora_sweep.best_trial", str(b.number)), RunTag("lora_sweep.best_run_id", b.run_id or "")]
        tags += [RunTag(f"lora_sweep.best.{k}", param_value(v)) for k, v in b.params.items()]
        tags.append(RunTag("lora_sweep.best.seed_index", str(b.seed_index)))
    elif best:
        tags.append(RunTag("lora_sweep.pareto_trials", ",".join(str(b.number) for b in best)))
    with quiet_mlflow():
        client.log_batch(parent_run_id, metrics=metrics, tags=tags, synchronous=True)
    return best


def _state_counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


# --------------------------------------------------------------------------- the loop

def prepare_sweep_data(config: SweepConfig) -> PreparedData:
    """Tokenise the data once per sweep (split with the base seed; see the module docstring)."""
    tokenizer = load_tokenizer(config.model.name, trust_remote_code=config.model.trust_remote_code)
    return prepare_data(config.data, config.model.task, tokenizer, seed=config.seed)


def run_sweep(config: SweepConfig, progress: Callable[[SweepProgress], None] | None = None,
              include_plotlyjs: bool | str = "cdn", owner: bool = True,
              models: BaseModelCache | None = None) -> SweepResult:
    """Run (or resume) the sweep until its budget or timeout; see the module docstring.

    ``owner``: this process owns the sweep's MLflow parent run: when the budget is spent it waits
    for other workers' running trials, then ends the parent run. A joining worker (``lora-sweep
    worker``, or a process started by ``--workers``) only tags the best trial. ``models`` keeps the
    base model loaded between trials (one is made when None). Trials' learning_curve.html loads
    plotly.js from its CDN by default (``True`` embeds its 4.8 MB in every trial); MLflow's own
    charts of the logged step metrics need neither.

    Raises:
        LoraError: a user-fixable problem before any trial (storage, data, a changed sweep), or
            ``MAX_CONSECUTIVE_FAILURES`` trials failing in a row (the last error in the message).
    """
    t_start = time.perf_counter()
    search, task = config.search, config.model.task
    data = prepare_sweep_data(config)
    models = models if models is not None else BaseModelCache()
    study = open_study(config)
    client = client_for(config.tracking)
    me = Worker.current()
    recovered, requeued = recover(study, config, client, me)
    parent_run_id = open_parent_run(study, config, client)
    objectives, directions = sweep_objectives(config), search.directions(task)
    budget = search.budget()
    result = SweepResult(study.study_name, storage_label(config), config.experiment(), parent_run_id, "budget",
                         {}, [], objectives, directions, recovered=recovered, requeued=requeued)
    state = SweepProgress(budget=shown_budget(config), objective=objectives[0], steps=config.train.steps,
                          ladder=search.strategy == "ladder")
    eta_base: tuple[float, float | None] = (0.0, None)  # (when, estimate then)

    def refresh(event: str = "") -> None:
        """Report progress; the study is read again only for events, not for step updates."""
        nonlocal eta_base
        elapsed = time.perf_counter() - t_start
        timeout_left = max(0.0, search.timeout - elapsed) if search.timeout is not None else None
        if event:
            state.read_counts(study)
            eta_base = (elapsed, estimate_left(study, state.budget, 1, timeout_left))
        state.elapsed_s = elapsed
        state.eta_s = None if eta_base[1] is None else max(0.0, eta_base[1] - (elapsed - eta_base[0]))
        state.event = event
        if progress:
            progress(state)

    parent_status = "FINISHED"
    failures_in_a_row = 0
    last_error = ""
    ladder = ladder_spec(config) if search.strategy == "ladder" else None
    try:
        refresh(f"resumed: failed {len(recovered)} stale trial(s) {recovered}, re-queued their seeds"
                if recovered else f"sweep {config.name} started")
        while True:
            if search.timeout is not None and time.perf_counter() - t_start >= search.timeout:
                result.stopped = "timeout"
                break
            trials = study.get_trials(deepcopy=False,
                                      states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
            if len(trials) >= budget:
                if owner and live_running(study, me):  # they may fail, leaving budget to this worker
                    wait_for_other_workers(study, me, refresh)
                    continue
                break
            if ladder is not None:
                step = ladder_step(study, config, ladder, client, parent_run_id, refresh)
                if step == "done":
                    result.stopped = "ladder"
                    break
                if step == "wait":  # a rung is running on other workers; fail theirs if they die
                    time.sleep(LADDER_POLL_S)
                    recover(study, config, client, me)
                    continue
            outcome = _one_trial(study, config, data, models, client, parent_run_id, me, state, refresh,
                                 include_plotlyjs, ladder)
            result.trials_run += 1
            result.trial_train_s += outcome.train_s
            result.trial_eval_s += outcome.eval_s
            if outcome.error:
                failures_in_a_row += 1
                last_error = outcome.error
                if failures_in_a_row >= MAX_CONSECUTIVE_FAILURES:
                    raise LoraError(f"{failures_in_a_row} trials in a row failed; the last: {last_error}",
                                    hint="see the failed runs' lora_sweep.error tag in MLflow")
            else:
                failures_in_a_row = 0
    except KeyboardInterrupt:
        result.stopped, parent_status = "interrupted", "KILLED"
    except BaseException:
        parent_status = "FAILED"
        raise
    finally:
        try:
            result.best = tag_best(study, config, client, parent_run_id)
            result.states = _state_counts(study)
            result.ladder, result.recommended_trial = ladder_outcome(study)
        finally:
            result.wall_s = time.perf_counter() - t_start
            if owner:
                _end_parent(client, parent_run_id, parent_status, result)
            else:
                _log_worker(client, parent_run_id, me, result)
    return result


def ladder_outcome(study: optuna.Study) -> tuple[dict[str, Any] | None, int | None]:
    """A ladder's record, and the trial to export for its recommendation (the best of its seeds)."""
    record = study.user_attrs.get(LADDER_ATTR)
    rec = (record or {}).get("recommendation")
    if not rec:
        return record, None
    numbers = set(rec.get("trials") or [])
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.number in numbers]
    if not done:
        return record, None
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
    return record, max(done, key=lambda t: (sign * t.values[0], -t.number)).number


def observe(study: optuna.Study) -> list[Observation]:
    """The ladder's view of the study: every trial tagged with a stage, with its value and cost."""
    out = []
    for t in study.get_trials(deepcopy=False):
        if STAGE_ATTR not in t.user_attrs:
            continue
        params = _planned_params(t) or {}
        value = t.values[0] if t.state == TrialState.COMPLETE and t.values else None
        out.append(Observation(stage=int(t.user_attrs[STAGE_ATTR]), rung=int(t.user_attrs[RUNG_ATTR]),
                               seed_index=int(t.user_attrs.get(SEED_INDEX, 0)), params=params,
                               state=t.state.name, value=value, cost=dict(t.user_attrs.get(COST_ATTR) or {}),
                               number=t.number,
                               retried=t.state == TrialState.FAIL and t.user_attrs.get(FAIL_ATTR) != "error"))
    return out


def ladder_step(study: optuna.Study, config: SweepConfig, spec: LadderSpec, client: MlflowClient,
                parent_run_id: str, refresh: Callable[[str], None]) -> str:
    """Plan the ladder's next trials (under the sweep's lock, so workers agree), enqueue them, and
    store the decisions. Returns "run" (a trial is waiting), "wait" (others are running a rung)
    or "done"."""
    with recovery_lock(config, study):
        p = ladder_plan(observe(study), spec)
        with _quiet_optuna():
            for slot in p.enqueue:
                attrs = {SEED_INDEX: slot.seed_index, STAGE_ATTR: slot.stage, RUNG_ATTR: slot.rung}
                if slot.steps is not None:
                    attrs[STEPS_ATTR] = slot.steps
                study.enqueue_trial(slot.params, user_attrs=attrs, skip_if_exists=False)
        record = p.as_attr()
        before = study.user_attrs.get(LADDER_ATTR) or {}
        changed = before != record
        if changed:
            study.set_user_attr(LADDER_ATTR, record)
        waiting = bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    if changed:
        _log_ladder(client, parent_run_id, record)
        known = len(before.get("decisions") or [])
        for d in record["decisions"][known:]:
            refresh(f"ladder: {d['text']}")
    if p.done:
        return "done"
    return "run" if waiting else "wait"


def _log_ladder(client: MlflowClient, run_id: str, record: dict[str, Any]) -> None:
    """The decisions on the parent run: ``ladder.json`` and tags for the recommendation."""
    from mlflow.entities import RunTag

    tags = [RunTag("lora_sweep.ladder.done", str(bool(record.get("done"))).lower())]
    for key in ("recommendation", "best_quality"):
        rec = record.get(key)
        if rec:
            tags += [RunTag(f"lora_sweep.{key}.{k}", param_value(v)) for k, v in rec["params"].items()]
            tags.append(RunTag(f"lora_sweep.{key}.mean", f"{rec['mean']:.6g}"))
    if record.get("chosen_rank") is not None:
        tags.append(RunTag("lora_sweep.ladder.chosen_rank", str(record["chosen_rank"])))
    try:
        with quiet_mlflow():
            client.log_dict(run_id, record, "ladder.json")
            client.log_batch(run_id, tags=tags, synchronous=True)
    except Exception as exc:
        log.warning("could not log the ladder's decisions to the parent run %s: %s", run_id, _first_line(exc))


def live_running(study: optuna.Study, me: Worker) -> list[FrozenTrial]:
    """RUNNING trials of the study whose worker is alive (see `is_stale`)."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if not is_stale(t, me)]


def wait_for_other_workers(study: optuna.Study, me: Worker, refresh: Callable[[str], None],
                           poll_s: float = 2.0) -> None:
    """Block until no live worker has a trial RUNNING, so the owner's final best includes them."""
    others = live_running(study, me)
    if not others:
        return
    refresh(f"budget reached; waiting for {len(others)} trial(s) of other workers: "
            f"{', '.join(str(t.number) for t in others)}")
    while others:
        time.sleep(poll_s)
        before = {t.number for t in others}
        others = live_running(study, me)
        if {t.number for t in others} != before:
            refresh(f"{len(others)} trial(s) of other workers still running")


def _log_worker(client: MlflowClient, run_id: str, me: Worker, result: SweepResult) -> None:
    """A joining worker records what it did on the parent run (as a tag; it does not end the run)."""
    try:
        with quiet_mlflow():
            client.set_tag(run_id, f"lora_sweep.worker.{me.host}.{me.pid}",
                           f"{result.trials_run} trials, {result.wall_s:.0f} s, stopped: {result.stopped}")
    except Exception as exc:
        log.warning("could not tag the sweep's parent run %s: %s", run_id, _first_line(exc))


def _end_parent(client: MlflowClient, run_id: str, status: str, result: SweepResult) -> None:
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    metrics = [Metric("last_run_wall_s", result.wall_s, now, 0),
               Metric("last_run_overhead_s", result.overhead_s, now, 0),
               Metric("last_run_overhead_fraction", result.overhead_fraction, now, 0)]
    try:
        with quiet_mlflow():
            client.log_batch(run_id, metrics=metrics, tags=[RunTag("lora_sweep.stopped", result.stopped)],
                             synchronous=True)
            client.set_terminated(run_id, status=status)
    except Exception as exc:
        log.warning("could not end the sweep's parent run %s: %s", run_id, _first_line(exc))


@dataclass
class _Outcome:
    train_s: float = 0.0
    eval_s: float = 0.0
    error: str = ""


def _one_trial(study: optuna.Study, config: SweepConfig, data: PreparedData, models: BaseModelCache,
               client: MlflowClient,
               parent_run_id: str, me: Worker, state: SweepProgress, refresh: Callable[[str], None],
               include_plotlyjs: bool | str, ladder: LadderSpec | None = None) -> _Outcome:
    from mlflow.entities import Param

    search = config.search
    single = len(study.directions) == 1
    objective = search.objective_name(config.model.task)
    with _quiet_optuna():
        trial = study.ask()
    trial.set_user_attr(WORKER_ATTR, me.as_attr())
    fresh = SEED_INDEX not in trial.user_attrs
    if ladder is not None and fresh:
        # another worker claimed the last planned trial between our look and our ask: Optuna made a
        # new one, which the ladder did not plan. Fail it at once (no params: nothing re-queues it).
        trial.set_user_attr(FAIL_ATTR, "unplanned")
        _tell(study, trial, state=TrialState.FAIL)
        return _Outcome()
    params = suggest(trial, search, ladder)
    seed_index = int(trial.user_attrs.get(SEED_INDEX, 0))
    slot_tags = {k: trial.user_attrs[k] for k in (STAGE_ATTR, RUNG_ATTR) if k in trial.user_attrs}
    if fresh:
        trial.set_user_attr(SEED_INDEX, 0)
        with _quiet_optuna():
            for k in range(1, search.seeds):
                study.enqueue_trial(params, user_attrs={SEED_INDEX: k}, skip_if_exists=False)
    outcome = _Outcome()
    state.running, state.running_params, state.running_seed, state.step = trial.number, params, seed_index, 0
    refresh(f"trial {trial.number} started")

    def report(step: int, metrics: dict[str, float]) -> None:
        value = metrics.get(objective)
        if not single or value is None or not math.isfinite(value):
            return
        trial.report(value, step)
        if trial.should_prune():
            raise StopTrial(f"pruned at step {step}")

    def on_progress(step: int, total: int, loss: float | None) -> None:
        state.step, state.steps = step, total
        refresh("")

    try:
        cfg = trial_config(config, params, seed_index)
        if STEPS_ATTR in trial.user_attrs:  # a ladder's calibration trial: shorter
            cfg.train.steps = int(trial.user_attrs[STEPS_ATTR])
            cfg.train.eval_every = min(cfg.train.eval_every, cfg.train.steps)
            state.steps = cfg.train.steps
        with Heartbeat(trial), TrialRun.start(
                config.tracking, cfg, experiment=config.experiment(), client=client,
                run_name=f"t{trial.number}-{default_run_name(cfg)}", parent_run_id=parent_run_id,
                tags={"optuna.trial_number": trial.number, "optuna.study_name": study.study_name,
                      "lora_sweep.sweep": config.name, "lora_sweep.seed_index": seed_index, **slot_tags},
                include_plotlyjs=include_plotlyjs) as run:
            with quiet_mlflow():
                client.log_batch(run.run_id, params=[Param("optuna.trial_number", str(trial.number)),
                                                     Param("lora_sweep.seed_index", str(seed_index))],
                                 synchronous=True)
            trial.set_user_attr(RUN_ID_ATTR, run.run_id)  # (recovery also finds the run by its tags)
            done = run_trial(cfg, report=report, progress=on_progress, data=data, models=models)
            r = done.result
            outcome.train_s, outcome.eval_s = r.train_s, r.eval_s
            values = _values(r, search, objective)
            optuna_state = r.state if r.state != "FAILED" else "FAIL"
            if r.state == "COMPLETE" and values is None:
                optuna_state, r.state, r.reason = "FAIL", "FAILED", f"no finite {objective} at the end"
            run.set_tags({"optuna.state": optuna_state})
            run.log_trial(done)
            trial.set_user_attr(COST_ATTR, {"trainable_params": r.trainable_params, "lora_params": r.lora_params,
                                            "train_s": r.train_s, "peak_memory_bytes": r.peak_memory_bytes})
            del done
    except KeyboardInterrupt:
        trial.set_user_attr(FAIL_ATTR, "interrupted")
        _tell(study, trial, state=TrialState.FAIL)
        refresh(f"trial {trial.number} interrupted")
        raise
    except Exception as exc:
        outcome.error = _first_line(exc) or type(exc).__name__
        trial.set_user_attr(FAIL_ATTR, "error")
        _tell(study, trial, state=TrialState.FAIL)
        state.running = None
        refresh(f"trial {trial.number} FAIL: {outcome.error}")
        return outcome
    if optuna_state == "COMPLETE":
        _tell(study, trial, values=values)
    elif optuna_state == "PRUNED":
        _tell(study, trial, state=TrialState.PRUNED)
    else:
        outcome.error = r.reason or "failed"
        trial.set_user_attr(FAIL_ATTR, "error")
        _tell(study, trial, state=TrialState.FAIL)
    state.running = None
    shown = f" {objective} {values[0]:.4f}" if values and optuna_state == "COMPLETE" else \
        (f" ({r.reason})" if r.reason else "")
    refresh(f"trial {trial.number} {optuna_state}{shown}")
    return outcome


def _values(r: Any, search: SearchConfig, objective: str) -> list[float] | None:
    value = r.final_metrics.get(objective)
    if value is None or not math.isfinite(value):
        return None
    values = [float(value)]
    if search.second_objective == "trainable_params":
        values.append(float(r.trainable_params))
    elif search.second_objective == "train_s":
        values.append(float(r.train_s))
    return values


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""

