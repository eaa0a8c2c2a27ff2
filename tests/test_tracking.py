"""MLflow tracking of one trial, against real sqlite stores in tmp (a real ``mlflow server``: test_tracking_server.py).

The trial is fake but real: a tiny BERT classifier with a LoRA adapter (random nonzero A and B, a
perturbed head) and a ``TrialResult`` filled with small fixed numbers; nothing is trained.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import peft
import pytest
import torch
import yaml
from safetensors.torch import load_file
from support import EVAL_STEPS, STEPS, free_port, make_trial, trial_config

import lora_core
from lora_core import LoraError
from sweeps.config.sweep import SearchConfig
from sweeps.config.trial import TrackingConfig, TrialConfig, from_dict
from sweeps.tracking import store as tracking
from sweeps.tracking import trial_run
from sweeps.tracking.artifacts import download_adapter, find_runs
from sweeps.tracking.store import tracking_uri
from sweeps.tracking.trial_run import TrialRun, log_trial

# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def store(tmp_path_factory) -> TrackingConfig:
    """One sqlite store for the module (creating its tables costs about a second)."""
    return TrackingConfig(home=str(tmp_path_factory.mktemp("store") / "home"), experiment="tests")


@pytest.fixture
def experiment(store, request) -> TrackingConfig:
    """The module's store, with an experiment of this test's own."""
    return TrackingConfig(home=store.home, experiment=request.node.name)


@pytest.fixture
def global_uri(monkeypatch):
    """Point plain ``mlflow.*`` calls at a store through the environment, restored after the test."""

    def point(cfg: TrackingConfig) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(cfg))
        assert mlflow.get_tracking_uri() == tracking_uri(cfg), "something set mlflow's global tracking URI"

    return point


def client(cfg: TrackingConfig) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=tracking_uri(cfg))


# --------------------------------------------------------------------------- the store

def test_tracking_uri_default_relative_home_and_explicit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrackingConfig()
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path.resolve()}/lora-sweeps/mlflow.db"
    assert (tmp_path / "lora-sweeps").is_dir()
    assert tracking.artifact_location(cfg) == (tmp_path / "lora-sweeps" / "artifacts").resolve().as_uri()
    server = TrackingConfig(uri="http://127.0.0.1:5000", home=str(tmp_path / "unused"))
    assert tracking_uri(server) == "http://127.0.0.1:5000"
    assert tracking.artifact_location(server) is None
    assert not (tmp_path / "unused").exists()
    other = TrackingConfig(uri="sqlite:////somewhere/x.db", home="h")
    assert tracking.artifact_location(other) == (tmp_path / "h" / "artifacts").resolve().as_uri()


def test_unreachable_server_is_a_lora_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{free_port()}", experiment="x")
    with pytest.raises(LoraError, match=r"cannot reach the MLflow store http://127\.0\.0\.1:") as err:
        TrialRun.start(cfg, trial_config())
    assert "mlflow server" in err.value.hint


def test_default_experiment_is_the_same_for_writing_and_reading(tiny, store):
    cfg = TrackingConfig(home=store.home)  # the only test using the default experiment of this store
    run_id = log_trial(cfg, make_trial(tiny))
    assert tracking.experiment_name(cfg) == "lora-sweep"
    assert list(find_runs(cfg).run_id) == [run_id]


def test_ensure_experiment_gets_creates_and_restores(experiment):
    c = tracking.client_for(experiment)
    loc = tracking.artifact_location(experiment)
    exp_id = tracking.ensure_experiment(c, "exp-a", loc)
    assert tracking.ensure_experiment(c, "exp-a", loc) == exp_id
    assert c.get_experiment(exp_id).artifact_location == loc
    c.delete_experiment(exp_id)
    with pytest.raises(LoraError, match="is deleted") as err:
        tracking.ensure_experiment(c, "exp-a", loc, restore_deleted=False)
    assert "restore" in err.value.hint
    assert tracking.ensure_experiment(c, "exp-a", loc) == exp_id
    assert c.get_experiment(exp_id).lifecycle_stage == "active"


def test_experiments_are_marked_as_model_training(experiment):
    """MLflow 3's experiment kind: set when lora-sweep creates an experiment, added to an older one, and a
    kind chosen in the UI is kept."""
    c = tracking.client_for(experiment)
    kind = {tracking.EXPERIMENT_KIND_TAG: tracking.EXPERIMENT_KIND}
    assert kind == {"mlflow.experimentKind": "custom_model_development"}
    made = tracking.ensure_experiment(c, "exp-kind-new", None)
    assert c.get_experiment(made).tags.items() >= kind.items()
    old = c.create_experiment("exp-kind-old")  # as lora-sweep made them before
    assert tracking.ensure_experiment(c, "exp-kind-old", None) == old
    assert c.get_experiment(old).tags.items() >= kind.items()
    chosen = c.create_experiment("exp-kind-genai", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    tracking.ensure_experiment(c, "exp-kind-genai", None)
    assert c.get_experiment(chosen).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"


def test_trial_run_names_show_what_the_search_varies():
    cfg = trial_config()  # r2 a4 q,v lr0.002 seed 3
    assert trial_run.trial_run_name(12, cfg) == "t12·r2·q,v·s3"
    assert trial_run.trial_run_name(0, cfg, {"alpha", "lr", "dropout"}) == "t0·r2·q,v·a4·d0·lr0.002·s3"
    assert trial_run.trial_run_name(5, trial_config(enabled=False), {"lr"}) == "t5·head-only·lr0.002·s3"
    assert SearchConfig(lr=[1e-2], alpha="2r").varied() == frozenset()
    assert SearchConfig(lr=[1e-2, 1e-3], alpha=["1r", "2r"], dropout=[0.0, 0.1]).varied() == {"alpha", "lr", "dropout"}
    assert SearchConfig(alpha=16).varied() == {"lr"}  # a log range of lr, one alpha
    assert SearchConfig(strategy="ladder", lr=[1e-2]).varied() == frozenset()  # one lr to calibrate
    assert SearchConfig(strategy="ladder").varied() == {"lr"}  # the calibration's lrs differ


# --------------------------------------------------------------------------- a complete trial

def test_complete_trial_is_readable_with_plain_mlflow(tiny, experiment, global_uri):
    trial = make_trial(tiny)
    run_id = log_trial(experiment, trial, tags={"optuna.trial_number": 7})
    global_uri(experiment)
    frame = mlflow.search_runs(experiment_names=[experiment.experiment])
    assert list(frame.run_id) == [run_id]
    row = frame.iloc[0]
    assert row.status == "FINISHED"
    assert row["tags.lora_sweep.kind"] == "trial"
    assert row["tags.lora_sweep.state"] == "COMPLETE"
    assert row["tags.lora_sweep.objective"] == "accuracy"
    assert row["tags.lora_sweep.direction"] == "maximize"
    assert row["tags.lora_sweep.memory_kind"] == "process_peak_rss"
    assert row["tags.lora_sweep.weights"] == "adapter"
    assert row["tags.optuna.trial_number"] == "7"
    assert row["tags.mlflow.runName"] == "tiny-r2-a4-q,v-lr0.002-s3"
    expected_params = {
        "model.name": "tiny-bert", "model.task": "classification", "model.dtype": "float32", "model.device": "cpu",
        "data.name": "pydoc-topics", "data.config": "null", "data.files": "null",
        "data.columns": '{"label": "topic", "text": "body"}', "data.max_length": "64",
        "lora.r": "2", "lora.alpha": "4.0", "lora.targets": "q,v", "lora.dropout": "0.0", "lora.init": "kaiming",
        "lora.rslora": "false", "lora.modules_to_save": "classifier", "lora.enabled": "true",
        "train.lr": "0.002", "train.schedule": "linear", "train.warmup_ratio": "0.06", "train.steps": "20",
        "train.batch_size": "32", "train.grad_accum": "1", "train.max_grad_norm": "1.0", "seed": "3",
        "name": "tiny", "version.python": f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}",
        "version.torch": torch.__version__, "version.mlflow": mlflow.__version__,
    }
    for key, value in expected_params.items():
        assert row[f"params.{key}"] == value, key
    assert row["params.version.lora_sweep"] != "unknown"
    assert row["params.version.transformers"] != "unknown"
    assert not any(c.startswith("params.tracking") for c in frame.columns)
    summary = trial.result.summary()
    for key, value in summary.items():
        assert row[f"metrics.{key}"] == pytest.approx(value, rel=1e-12), key
    assert row["metrics.peak_memory_bytes"] == 123_456_789
    assert row["metrics.train_loss"] == pytest.approx(1.1 - 0.01 * STEPS)  # the value at the last step
    assert row["metrics.val_accuracy"] == pytest.approx(0.5)

    c = client(experiment)
    history = c.get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    assert {m.step: m.value for m in history} == pytest.approx({s: 1.1 - 0.01 * s for s in range(1, STEPS + 1)})
    for key in ("val_accuracy", "val_macro_f1", "val_eval_loss"):
        assert sorted(m.step for m in c.get_metric_history(run_id, key)) == list(EVAL_STEPS), key
    names = {a.path for a in c.list_artifacts(run_id)}
    assert names == {"adapter", "config.yaml", "learning_curve.html"}
    assert {a.path for a in c.list_artifacts(run_id, "adapter")} == {
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors"}


def test_adapter_downloads_and_loads_in_lora_core_and_peft(tiny, experiment, tmp_path):
    trial = make_trial(tiny)
    ids = tiny.ids()
    reference = tiny.logits(trial.model, ids)
    run_id = log_trial(experiment, trial)

    path = download_adapter(experiment, run_id, tmp_path / "adapter")
    assert path == (tmp_path / "adapter").resolve()
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = tiny.bert(seed=0)
    assert not torch.equal(tiny.logits(fresh, ids), reference)
    lora_core.load_adapter(fresh, path)
    torch.testing.assert_close(tiny.logits(fresh, ids), reference, atol=0, rtol=0)

    pm = peft.PeftModel.from_pretrained(tiny.bert(seed=0), str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, reference, atol=1e-5, rtol=0)

    with pytest.raises(LoraError, match="not an empty directory"):
        download_adapter(experiment, run_id, path)
    with pytest.raises(LoraError, match="cannot read MLflow run"):
        download_adapter(experiment, "0123456789abcdef0123456789abcdef", tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_config_yaml_round_trips_and_curve_is_self_contained(tiny, experiment, tmp_path):
    trial = make_trial(tiny)
    run_id = log_trial(experiment, trial)
    c = client(experiment)
    config_file = Path(c.download_artifacts(run_id, "config.yaml", str(tmp_path)))
    again = from_dict(TrialConfig, yaml.safe_load(config_file.read_text())).validate()
    assert again == trial.config
    curve = Path(c.download_artifacts(run_id, "learning_curve.html", str(tmp_path)))
    html = curve.read_text()
    assert "train loss" in html and "validation accuracy" in html
    assert '<script src="http' not in html and len(html) > 1_000_000  # plotly.js embedded: works offline


# --------------------------------------------------------------------------- states and failures

def test_pruned_trial_is_killed_with_state_and_reason_and_no_adapter(tiny, experiment, tmp_path):
    trial = make_trial(tiny, state="PRUNED", reason="pruned by median at step 10", steps=10)
    run_id = log_trial(experiment, trial)
    run = client(experiment).get_run(run_id)
    assert run.info.status == "KILLED"
    tags = run.data.tags
    assert tags["lora_sweep.state"] == "PRUNED"
    assert tags["lora_sweep.reason"] == "pruned by median at step 10"
    assert tags["lora_sweep.weights"] == "none"
    assert run.data.metrics["steps_done"] == 10
    assert {a.path for a in client(experiment).list_artifacts(run_id)} == {"config.yaml", "learning_curve.html"}
    with pytest.raises(LoraError, match="no adapter artifact"):
        download_adapter(experiment, run_id, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_failed_state_maps_to_failed_status(tiny, experiment):
    trial = make_trial(tiny, state="FAILED", reason="loss became nan at step 10", steps=10)
    run = client(experiment).get_run(log_trial(experiment, trial))
    assert (run.info.status, run.data.tags["lora_sweep.state"]) == ("FAILED", "FAILED")
    assert run.data.tags["lora_sweep.reason"] == "loss became nan at step 10"


def test_exception_inside_the_run_leaves_a_failed_run(tiny, experiment):
    config = trial_config()
    with pytest.raises(RuntimeError, match="boom"), TrialRun.start(experiment, config) as run:
        raise RuntimeError("boom: CUDA out of memory\nlong details on the next line")
    got = client(experiment).get_run(run.run_id)
    assert got.info.status == "FAILED"
    assert got.info.end_time is not None
    assert got.data.tags["lora_sweep.error"] == "RuntimeError: boom: CUDA out of memory"
    assert got.data.tags["lora_sweep.state"] == "FAILED"
    assert got.data.params["lora.r"] == "2"  # logged at the start: a crashed run stays reproducible

    with pytest.raises(KeyboardInterrupt), TrialRun.start(experiment, config) as run:
        raise KeyboardInterrupt
    got = client(experiment).get_run(run.run_id)
    assert got.info.status == "KILLED"
    assert got.data.tags["lora_sweep.error"] == "KeyboardInterrupt"

    frame = find_runs(experiment)
    assert len(frame) == 2 and "RUNNING" not in set(frame.status)


def test_nested_under_a_parent_run_with_extra_tags(tiny, experiment):
    c = tracking.client_for(experiment)
    exp_id = tracking.ensure_experiment(c, experiment.experiment, tracking.artifact_location(experiment))
    parent = c.create_run(exp_id, run_name="sweep", tags={"lora_sweep.kind": "sweep"})
    run_id = log_trial(experiment, make_trial(tiny), parent_run_id=parent.info.run_id, client=c,
                       run_name="trial-0", tags={"optuna.trial_number": 0})
    c.set_terminated(parent.info.run_id)
    tags = c.get_run(run_id).data.tags
    assert tags["mlflow.parentRunId"] == parent.info.run_id
    assert tags["mlflow.runName"] == "trial-0"
    assert tags["optuna.trial_number"] == "0"
    children = find_runs(experiment, filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert list(children.run_id) == [run_id]


def test_head_only_baseline_logs_the_head_in_safetensors(tiny, experiment, tmp_path):
    trial = make_trial(tiny, enabled=False)
    run_id = log_trial(experiment, trial)
    c = client(experiment)
    run = c.get_run(run_id)
    assert run.data.params["lora.enabled"] == "false"
    assert run.data.tags["lora_sweep.weights"] == "head"
    assert "adapter" not in {a.path for a in c.list_artifacts(run_id)}
    head = load_file(c.download_artifacts(run_id, "head/head_model.safetensors", str(tmp_path)))
    assert sorted(head) == ["classifier.bias", "classifier.weight"]
    torch.testing.assert_close(head["classifier.weight"], trial.model.classifier.weight, atol=0, rtol=0)
    with pytest.raises(LoraError, match="no adapter artifact"):
        download_adapter(experiment, run_id, tmp_path / "adapter")


# --------------------------------------------------------------------------- batching and reading back

def test_long_curves_are_logged_in_few_batches(tiny, experiment):
    trial = make_trial(tiny, steps=2500)
    trial.result.history = [{"step": s, "accuracy": 0.5, "macro_f1": 0.4, "eval_loss": 1.0} for s in range(10, 2501, 10)]
    calls = []
    with TrialRun.start(experiment, trial.config) as run:
        real = run.client.log_batch

        def counting(*args, **kwargs):
            calls.append(len(kwargs["metrics"]) + len(kwargs["params"]) + len(kwargs["tags"]))
            return real(*args, **kwargs)

        run.client.log_batch = counting
        run.log_trial(trial)
    n_metrics = 2500 + 3 * 250 + len(trial.result.summary())
    assert len(calls) == -(-(n_metrics + 5) // 1000)  # the 5 end tags ride along in the first call
    assert max(calls) <= 1000
    assert len(client(experiment).get_metric_history(run.run_id, "train_loss")) == 2500


def test_batches_respect_mlflow_limits():
    from mlflow.entities import Metric, Param, RunTag

    metrics = [Metric(f"m{i}", 0.0, 0, 0) for i in range(2100)]
    params = [Param(f"p{i}", "v") for i in range(150)]
    tags = [RunTag(f"t{i}", "v") for i in range(30)]
    chunks = list(trial_run._batches(metrics, params, tags))
    assert [(len(m), len(p), len(t)) for m, p, t in chunks] == [(870, 100, 30), (950, 50, 0), (280, 0, 0)]


def test_two_stores_in_one_process_never_mix(tiny, tmp_path):
    a = TrackingConfig(home=str(tmp_path / "a"), experiment="same-name")
    b = TrackingConfig(home=str(tmp_path / "b"), experiment="same-name")
    before = mlflow.get_tracking_uri()
    run_a = log_trial(a, make_trial(tiny))
    run_b = log_trial(b, make_trial(tiny, state="PRUNED", steps=10))
    assert list(find_runs(a).run_id) == [run_a]
    assert list(find_runs(b).run_id) == [run_b]
    assert mlflow.get_tracking_uri() == before
    art_a = client(a).get_run(run_a).info.artifact_uri
    assert art_a.startswith((tmp_path / "a" / "artifacts").as_uri())
    assert (tmp_path / "a" / "artifacts").is_dir() and not (tmp_path / "mlruns").exists()
    with pytest.raises(LoraError, match="no MLflow experiment named 'missing'") as err:
        find_runs(a, "missing")
    assert "same-name" in err.value.hint


def test_find_runs_has_search_runs_columns(tiny, experiment, global_uri):
    log_trial(experiment, make_trial(tiny))
    ours = find_runs(experiment)
    global_uri(experiment)
    theirs = mlflow.search_runs(experiment_names=[experiment.experiment])
    assert set(ours.columns) == set(theirs.columns)
    assert list(ours.columns[:6]) == ["run_id", "experiment_id", "status", "artifact_uri", "start_time", "end_time"]
    assert str(ours.start_time.dtype) == str(theirs.start_time.dtype)
    for col in theirs.columns:
        assert ours[col].iloc[0] == theirs[col].iloc[0], col
