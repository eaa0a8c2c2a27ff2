"""What a sweep reports while it runs and when it ends: progress snapshots, time left, the result."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from sweeps.config.sweep import SweepConfig
from sweeps.engine.ladder_types import ladder_spec, planned_total
from sweeps.engine.selection import BestTrial, best_trials
from sweeps.engine.study import state_counts

if TYPE_CHECKING:
    from sweeps.engine.holdout import HoldoutResult


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
        counts = state_counts(study)
        self.complete, self.pruned = counts.get("COMPLETE", 0), counts.get("PRUNED", 0)
        self.failed, self.running_total = counts.get("FAIL", 0), counts.get("RUNNING", 0)
        if len(study.directions) == 1:
            best = best_trials(study)
            self.best_value = best[0].value if best else None
            self.best_number = best[0].number if best else None


def shown_budget(config: SweepConfig) -> int:
    """The trials a progress display counts towards: the budget, or for a ladder the most it can plan."""
    if config.search.strategy == "ladder":
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
    stopped: str                        # "budget" | "timeout" | "interrupted" | "ladder" (its plan is done) | "grid" (none left)
    states: dict[str, int]              # trials of the study by Optuna state, after this run
    best: list[BestTrial]               # the best trial (single objective) or the Pareto front
    objectives: list[str]
    directions: Sequence[str]
    trials_run: int = 0                 # by this call
    recovered: list[int] = field(default_factory=list)  # stale trial numbers failed at start-up
    ladder: dict[str, Any] | None = None  # a ladder's decisions and recommendation (LADDER_ATTR)
    recommended_trial: int | None = None  # a ladder's recommended configuration: its best seed's trial
    recommendation_why: str | None = None  # why the recommendation (shown within the margin, or the best and why)
    requeued: int = 0
    wall_s: float = 0.0                 # this call, from start to return
    trial_train_s: float = 0.0          # sum of this call's trials' train_s
    trial_eval_s: float = 0.0
    unsent_writes: int = 0              # MLflow writes left in the spool at the end (lora-sweep sync sends them)
    test: HoldoutResult | None = None       # the owner's test-split figures, after the last decision (engine.holdout)

    @property
    def test_s(self) -> float:
        """The time the end of the sweep spent on the test split (reloading adapters and evaluating)."""
        return self.test.seconds if self.test is not None else 0.0

    @property
    def overhead_s(self) -> float:
        """Wall time not spent training or evaluating, nor on the test split at the end (data preparation,
        model loading, tracking, Optuna)."""
        return self.wall_s - self.trial_train_s - self.trial_eval_s - self.test_s

    @property
    def overhead_fraction(self) -> float:
        return self.overhead_s / self.wall_s if self.wall_s > 0 else 0.0

