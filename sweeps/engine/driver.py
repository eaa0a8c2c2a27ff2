"""TEMPORARY re-exports of the engine's old single module, while the importers move to the modules of
`sweeps.engine` (study, readonly, space, liveness, recovery, parent, selection, progress, loop, trial)."""
# ruff: noqa: F401

from sweeps.engine.liveness import HEARTBEAT_S, STALE_AFTER_S, Heartbeat, Worker, is_stale, live_running
from sweeps.engine.loop import MAX_CONSECUTIVE_FAILURES, observe, prepare_sweep_data, run_sweep
from sweeps.engine.parent import end_parent, open_parent_run
from sweeps.engine.progress import SweepProgress, SweepResult, estimate_left, shown_budget
from sweeps.engine.readonly import load_study_readonly
from sweeps.engine.recovery import recover, recovery_lock
from sweeps.engine.selection import BestTrial, best_trials, ladder_outcome, tag_best
from sweeps.engine.space import PARAM_NAMES, config_key, grid_configs, suggest, trial_config
from sweeps.engine.study import (
    fingerprint,
    journal_path,
    open_study,
    state_counts,
    storage_label,
    sweep_objectives,
)
from sweeps.names import (
    BEST_RUNS_ATTR,
    BEST_TAG,
    FAIL_ATTR,
    FINGERPRINT_ATTR,
    HEARTBEAT_ATTR,
    LADDER_ATTR,
    PARENT_ATTR,
    RETRY_ATTR,
    RUN_ID_ATTR,
    SEED_INDEX,
    WORKER_ATTR,
)
from sweeps.training.trainer import run_trial

_end_parent, _state_counts = end_parent, state_counts
