"""MLflow tracking: the store, one trial as one run, and reading runs and adapters back."""
