"""The sweep engine: the study and its storage, the search space, liveness and recovery, the MLflow parent
run, selection of the best and recommended trials, progress, the ladder plan, workers, and the loop."""
