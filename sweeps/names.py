"""Every name lora-sweep writes into Optuna and MLflow, in one place: study and trial attributes, run tags.

These strings are a file format: studies and runs written by one version are read by the next, and
`lora-sweep status`, `export` and the report find trials and runs by them. Change one only with a
migration.
"""

from __future__ import annotations

# --------------------------------------------------------------------------- Optuna study user attributes
CONFIG_ATTR = "lora_sweep.config"              # the sweep config as a dict (a sweep is found by name)
PARENT_ATTR = "lora_sweep.parent_run_id"       # the MLflow parent run of the sweep
FINGERPRINT_ATTR = "lora_sweep.fingerprint"    # what must not change on resume
BEST_RUNS_ATTR = "lora_sweep.best_run_ids"     # the MLflow runs tagged best
LADDER_ATTR = "lora_sweep.ladder"              # the ladder's decisions (sweeps.engine.ladder_types.Plan)
TEST_ATTR = "lora_sweep.test"                  # the test-split figures, read after the last decision (engine.holdout)

# --------------------------------------------------------------------------- Optuna trial user attributes
SEED_INDEX = "seed_index"                      # which repeat of its configuration a trial is
WORKER_ATTR = "lora_sweep.worker"              # {host, pid, started} of the worker running it
PACK_ATTR = "lora_sweep.pack"                  # "<host>:<pid>:<n>": the pack a packed trial trained in
HEARTBEAT_ATTR = "lora_sweep.heartbeat"        # last sign of life of that worker
RUN_ID_ATTR = "mlflow_run_id"                  # the trial's MLflow run
FAIL_ATTR = "lora_sweep.fail"                  # "error" (not retried), "interrupted" (retried), OVER_BUDGET
OVER_BUDGET = "over_budget"                    # FAIL_ATTR of a fresh trial released unrun past n_trials (never retried)
RETRY_ATTR = "lora_sweep.retry_of"             # the trial a re-queued one repeats
STAGE_ATTR = "lora_sweep.stage"                # ladder: stage of a planned trial
RUNG_ATTR = "lora_sweep.rung"                  # ladder: rung (rank or target set) of a planned trial
STEPS_ATTR = "lora_sweep.train_steps"          # ladder: a calibration trial's shorter step count
COST_ATTR = "lora_sweep.cost"                  # {trainable_params, lora_params, train_s, peak_memory_bytes}

# --------------------------------------------------------------------------- Optuna trial system attributes
CREATE_TOKEN_ATTR = "lora_sweep.create"        # a unique token per trial creation (sweeps.engine.dbretry)
CLAIM_TOKEN_ATTR = "lora_sweep.claim"          # a unique token per claim of a queued trial (ask; dbretry)

# --------------------------------------------------------------------------- MLflow run tags
KIND_TAG = "lora_sweep.kind"                   # "sweep" (the parent run) or "trial"
STATE_TAG = "lora_sweep.state"                 # COMPLETE / PRUNED / FAILED of a trial's run
ERROR_TAG = "lora_sweep.error"                 # a failed trial's error line
REASON_TAG = "lora_sweep.reason"               # why a trial ended early (pruned at step N, ...)
BEST_TAG = "lora_sweep.best"                   # "true" on the best trial's run
SWEEP_TAG = "lora_sweep.sweep"                 # the sweep a trial's run belongs to
SEED_INDEX_TAG = "lora_sweep.seed_index"
STOPPED_TAG = "lora_sweep.stopped"             # parent run: why the last run of the sweep stopped
WORKER_TAG_PREFIX = "lora_sweep.worker."       # parent run: lora_sweep.worker.<host>.<pid> = what it ran
TRIAL_NUMBER_TAG = "optuna.trial_number"
STUDY_NAME_TAG = "optuna.study_name"
OPTUNA_STATE_TAG = "optuna.state"
PARENT_TAG = "mlflow.parentRunId"
STORAGE_TAG = "optuna.storage"                 # parent run: where the study lives (password masked)
STRATEGY_TAG = "lora_sweep.strategy"
OBJECTIVE_TAG = "lora_sweep.objective"
DIRECTION_TAG = "lora_sweep.direction"
BEST_TRIAL_TAG = "lora_sweep.best_trial"       # parent run: the best trial's number, run and params
BEST_RUN_ID_TAG = "lora_sweep.best_run_id"
BEST_PREFIX = "lora_sweep.best."               # + a param name, or seed_index
PARETO_TAG = "lora_sweep.pareto_trials"
LADDER_DONE_TAG = "lora_sweep.ladder.done"
CHOSEN_RANK_TAG = "lora_sweep.ladder.chosen_rank"
WEIGHTS_TAG = "lora_sweep.weights"             # trial run: which weights it holds (adapter / head / none)
CONFIG_NAME_TAG = "lora_sweep.config_name"     # trial run: the config file it came from
MEMORY_KIND_TAG = "lora_sweep.memory_kind"     # trial run: how peak memory was measured (cuda / rss)
