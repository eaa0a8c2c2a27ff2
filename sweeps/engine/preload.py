"""Imported once by the forkserver of local CPU workers (`sweeps.engine.forked`): the modules every
``lora-sweep worker`` imports, so each forked worker starts with them loaded. Importing this module only
loads code: it starts no thread, opens no file or connection and touches no GPU."""

import datasets  # noqa: F401
import mlflow
import mlflow.tracking  # noqa: F401
import optuna  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401
from transformers import AutoConfig, AutoModel, AutoTokenizer  # noqa: F401

import sweeps.cli.main
import sweeps.cli.sweep
import sweeps.data.prepare
import sweeps.engine.loop
import sweeps.engine.trial
import sweeps.models.load
import sweeps.tracking.trial_run
import sweeps.training.loop
import sweeps.training.trainer  # noqa: F401
