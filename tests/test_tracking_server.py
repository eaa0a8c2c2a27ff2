"""A trial tracked through a real MLflow tracking server (``mlflow server`` on 127.0.0.1, started and
stopped by the test): what a sweep on several machines logs to."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch
from support import STEPS, make_trial

import lora_core
from sweeps.config.trial import TrackingConfig
from sweeps.tracking.artifacts import download_adapter
from sweeps.tracking.trial_run import log_trial

# --------------------------------------------------------------------------- a real tracking server

def _get_json(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def test_trial_through_a_real_tracking_server(tiny, tmp_path, mlflow_server):
    """(``mlflow_server``: the session's server, conftest.py.)"""
    url = mlflow_server.url
    cfg = TrackingConfig(uri=url, home=str(tmp_path / "unused"), experiment="served")
    trial = make_trial(tiny)
    run_id = log_trial(cfg, trial, tags={"optuna.trial_number": 1})
    assert not (tmp_path / "unused").exists()

    api = f"{url}/api/2.0/mlflow"
    exp = _get_json(f"{api}/experiments/get-by-name?experiment_name=served")["experiment"]
    runs = _get_json(f"{api}/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    assert [r["info"]["run_id"] for r in runs] == [run_id]
    run = _get_json(f"{api}/runs/get?run_id={run_id}")["run"]
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert params["lora.r"] == "2" and params["lora.targets"] == "q,v"
    assert tags["lora_sweep.state"] == "COMPLETE" and tags["optuna.trial_number"] == "1"
    assert metrics["final_accuracy"] == pytest.approx(0.5)
    history = _get_json(f"{api}/metrics/get-history?run_id={run_id}&metric_key=train_loss")["metrics"]
    assert sorted(m["step"] for m in history) == list(range(1, STEPS + 1))

    # Artifacts went through the server's proxy; the adapter comes back and loads.
    path = download_adapter(cfg, run_id, tmp_path / "adapter")
    fresh = tiny.bert(seed=0)
    lora_core.load_adapter(fresh, path)
    ids = tiny.ids()
    torch.testing.assert_close(tiny.logits(fresh, ids), tiny.logits(trial.model, ids), atol=0, rtol=0)
    assert any(mlflow_server.artifacts.rglob(f"{run_id}/**/adapter_model.safetensors"))


def test_a_spooling_client_marks_its_experiments_as_model_training(tmp_path, mlflow_server):
    """The experiment kind through a sweep's client (sweeps.tracking.spool_client): on the experiment it
    creates, and on one made before that it first looks up on the server."""
    from mlflow import MlflowClient

    from sweeps.tracking import store
    from sweeps.tracking.spool_client import SpoolingClient

    plain = MlflowClient(tracking_uri=mlflow_server.url)
    old = plain.create_experiment("made-before")
    client = SpoolingClient(mlflow_server.url, tmp_path / "home")
    try:
        made = store.ensure_experiment(client, "made-now")
        assert store.ensure_experiment(client, "made-before") == old
        assert store.ensure_experiment(client, "made-now") == made  # now from the client's cache
    finally:
        assert client.close(30) == 0
    for exp_id in (made, old):
        assert plain.get_experiment(exp_id).tags.get(store.EXPERIMENT_KIND_TAG) == store.EXPERIMENT_KIND
