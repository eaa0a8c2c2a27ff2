"""MLflow tracking: the store (store), one trial as one run (trial_run), runs and adapters read back
(artifacts), and a sweep's trial runs for status (sweep_runs)."""
