"""Tests of the sweep: config validation, the Optuna driver end to end, pruning, resume after a killed
worker, and Ctrl-C.

Trials train the tiny BERT of ``test_train`` (hidden 32, 2 layers) on its tiny keyword data set for a
few dozen steps on the CPU; the Optuna storage is the default journal file under the test's home and
the MLflow store a copy of one migrated sqlite file. Nothing touches the network.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState
from support import (
    assert_loaded_as_written,
    load_study,
    mlflow_runs,
    planned,
    seeded_home,
    store_uri,
    write_sweep,
)

from lora_core import LoraError
from sweeps.cli.main import main
from sweeps.config.sweep import DEMO_SWEEP, load_sweep_config
from sweeps.engine import trial as engine_trial
from sweeps.engine.loop import run_sweep
from sweeps.engine.selection import best_trials
from sweeps.engine.space import grid_configs, trial_config
from sweeps.engine.study import open_study
from sweeps.training.trainer import run_trial

pytestmark = pytest.mark.usefixtures("isolated")  # hub offline, a private data cache, quiet progress bars


REPO = Path(__file__).resolve().parents[1]
TPE_DEMO = REPO / "examples" / "demo-sweep.yaml"


# --------------------------------------------------------------------------- config


def test_the_builtin_demo_is_the_ladder_example_file() -> None:
    demo = load_sweep_config(None)
    assert demo == load_sweep_config(DEMO_SWEEP) and DEMO_SWEEP.name == "ladder-demo.yaml"
    assert demo.name == "ladder-demo" and demo.model.name == "minilm-l6" and demo.search.strategy == "ladder"
    assert demo.search.ladder.ranks() == [1, 2, 4, 8] and demo.search.ladder.seeds == 2
    assert demo.search.pruner_name() == "none"


def test_tpe_demo_sweep_validates() -> None:
    demo = load_sweep_config(TPE_DEMO)
    assert demo.name == "demo-sweep" and demo.model.name == "minilm-l6"
    assert demo.search.objective_name("classification") == "accuracy"
    assert demo.search.objective_direction("classification") == "maximize"
    assert demo.search.target_subsets() == [["q", "v"]]
    assert demo.search.alpha_mode() == ("multiple", [2.0])
    assert 4 <= demo.search.n_trials <= 6 and demo.train.steps <= 60 and demo.data.max_length == 48
    base = demo.base_trial()
    assert type(base).__name__ == "TrialConfig" and not hasattr(base, "search")


@pytest.mark.parametrize(("override", "message"), [
    ("search.rank=[0, 4]", "search.rank values must be >= 1, got 0"),
    ("search.rank=[]", "search.rank is empty"),
    ('search.targets=["q,v", "q,,v"]', "empty subset"),
    ('search.targets=["q,v", "v,q"]', "twice"),
    ("search.lr={low: 1.0e-3, high: 1.0e-4}", "low (0.001) must be below high (0.0001)"),
    ("search.strategy=bayes", "search.strategy must be one of 'tpe' | 'random' | 'grid'"),
    ("search.pruner=asha", "search.pruner must be"),
    ("search.seeds=2", "must be a multiple of search.seeds"),
    ("search.strategy=grid", "grid needs search.lr as a list"),
    ("search.objective=bleu", "not a metric of task classification"),
    ("search.second_objective=trainable_params", "cannot prune a two-objective"),
    ("search.alpha=two", "not a number or a multiple of r"),
    ("search.dropout=[1.5]", "search.dropout values must be in [0, 1)"),
    ("search.rnak=[4]", "unknown key 'search.rnak'"),
    ("name=my sweep", "sweep name 'my sweep'"),
])
def test_bad_sweep_configs_are_reported(override: str, message: str) -> None:
    with pytest.raises(LoraError) as err:
        load_sweep_config(TPE_DEMO, [override])
    assert message in err.value.message


def test_search_forms() -> None:
    cfg = load_sweep_config(TPE_DEMO, ["search.targets=q,k,v,o", "search.alpha=[8, 16]", "search.lr=[1.0e-3, 3.0e-4]",
                                   "search.strategy=grid", "search.second_objective=train_s", "search.pruner=none",
                                   "search.objective=eval_loss"])
    assert cfg.search.target_choices() == ["q,k,v,o"]  # one string is one subset
    assert cfg.search.alpha_mode() == ("fixed", [8.0, 16.0])
    assert cfg.search.directions("classification") == ["minimize", "minimize"]
    assert cfg.search.grid_size() == 3 * 2 * 1 * 2 * 1
    assert cfg.search.budget() == 5  # n_trials is smaller than the grid
    params = {"r": 4, "alpha_per_r": 2.0, "targets": "q,k,v,o", "lr": 1e-3, "dropout": 0.1}
    trial = trial_config(load_sweep_config(TPE_DEMO), params, seed_index=2)
    assert (trial.lora.r, trial.lora.alpha, trial.lora.targets) == (4, 8.0, ["q", "k", "v", "o"])
    assert (trial.train.lr, trial.lora.dropout, trial.seed) == (1e-3, 0.1, 2)
    assert trial.tracking.experiment == "demo-sweep"


@pytest.mark.parametrize("name", ["demo-sweep.yaml", "ladder-demo.yaml", "paper-table5.yaml"])
def test_sweep_examples_validate(name: str) -> None:
    config = load_sweep_config(REPO / "examples" / name)
    assert config.name == name.removesuffix(".yaml") or config.name.startswith(name.removesuffix(".yaml"))
    assert_loaded_as_written(yaml.safe_load((REPO / "examples" / name).read_text()), config.to_dict())


def test_paper_table5_pairs_hold_one_rank_budget() -> None:
    config = load_sweep_config(REPO / "examples" / "paper-table5.yaml")
    pairs = config.search.grid_pairs()
    assert pairs == [(8, "q"), (8, "k"), (8, "v"), (8, "o"), (4, "q,k"), (4, "q,v"), (2, "q,k,v,o")]
    assert {r * len(t.split(",")) for r, t in pairs} == {8}  # the same rank x matrices everywhere
    grid = grid_configs(config.search)
    assert [(g["r"], g["targets"]) for g in grid] == pairs and config.search.budget() == 14


@pytest.mark.parametrize(("override", "message"), [
    ("search.configs=[{r: 4, targets: q}]", "needs strategy: grid"),
    ("search.configs=[]", "search.configs is empty"),
    ('search.configs=[{r: 4, targets: "q,v"}, {r: 4, targets: "v,q"}]', "twice"),
    ("search.configs=[{r: 0, targets: q}]", "search.rank values must be >= 1"),
])
def test_bad_explicit_pairs(override: str, message: str) -> None:
    sets = ["search.lr=[1.0e-3]", override]
    if "needs strategy" not in message:
        sets.append("search.strategy=grid")
    with pytest.raises(LoraError) as err:
        load_sweep_config(TPE_DEMO, sets)
    assert message in err.value.message


def test_with_seed_repeats_the_best_is_the_best_configuration_mean() -> None:
    study = optuna.create_study(direction="maximize")
    dist = {"r": optuna.distributions.CategoricalDistribution([2, 4])}
    for r, seed, value in [(2, 0, 0.90), (2, 1, 0.10), (4, 0, 0.70), (4, 1, 0.72)]:
        study.add_trial(optuna.trial.create_trial(params={"r": r}, distributions=dist, value=value,
                                                  user_attrs={"seed_index": seed}))
    best = best_trials(study)
    assert [t.params["r"] for t in best] == [4] and best[0].value == 0.72  # mean 0.71 beats 0.50
    assert study.best_trial.value == 0.90  # Optuna's own best: one lucky seed
    single = optuna.create_study(direction="minimize")
    for r, value in [(2, 0.3), (4, 0.2)]:
        single.add_trial(optuna.trial.create_trial(params={"r": r}, distributions=dist, value=value))
    assert [t.value for t in best_trials(single)] == [0.2]  # no repeats: Optuna's best


def test_a_changed_sweep_is_not_resumed(tmp_path: Path) -> None:
    sets = [f"tracking.home={tmp_path}"]
    open_study(load_sweep_config(TPE_DEMO, sets))
    open_study(load_sweep_config(TPE_DEMO, [*sets, "search.n_trials=6"]))  # a bigger budget is fine
    with pytest.raises(LoraError, match="another search space"):
        open_study(load_sweep_config(TPE_DEMO, [*sets, "search.rank=[2, 8]"]))


# --------------------------------------------------------------------------- end to end


def test_sweep_end_to_end(tiny_model_dir: Path, tiny_data_file: Path, empty_store: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    home = seeded_home(tmp_path, empty_store)
    path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, home, strategy="tpe", rank=[2, 4],
                       targets=["q,v", "q,k,v,o"], lr={"low": 1e-3, "high": 3e-2}, seeds=2, n_trials=4,
                       startup_trials=1, pruner="median")
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "best trial" in out and "sweep overhead" in out
    runs_url = re.search(r"browse in MLflow: +lora-sweep ui .*\(runs: (\S+)\)", out)
    assert runs_url, out

    assert (home / "optuna" / "tiny-sweep.journal").is_file()
    study = load_study(home)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    # two sampled configurations, each run at seed indices 0 and 1 (the repeat enqueued with its params)
    by_config = Counter(json.dumps(t.params, sort_keys=True) for t in trials)
    assert sorted(by_config.values()) == [2, 2]
    assert sorted(planned(study).values()) == [1, 1, 1, 1]
    assert set(trials[0].params) == {"r", "alpha_per_r", "targets", "lr", "dropout"}

    parent, children = mlflow_runs(home)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["optuna.study_name"] == "tiny-sweep"
    assert parent.data.params["search.strategy"] == "tpe"
    assert runs_url.group(1) == (f"http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}/runs?"
                                 "workflowType=machine_learning&orderByKey=metrics.%60final_accuracy%60&orderByAsc=false")
    assert parent.data.params["search.storage"].endswith("tiny-sweep.journal")
    assert study.user_attrs["lora_sweep.parent_run_id"] == parent.info.run_id
    assert len(children) == 4
    by_number = {int(r.data.params["optuna.trial_number"]): r for r in children}
    assert sorted(by_number) == [0, 1, 2, 3]
    for t in trials:
        run = by_number[t.number]
        assert run.info.status == "FINISHED"
        assert run.data.tags["lora_sweep.state"] == "COMPLETE" and run.data.tags["optuna.state"] == "COMPLETE"
        assert run.data.tags["optuna.trial_number"] == str(t.number)
        assert run.data.params["seed"] == str(t.user_attrs["seed_index"])
        assert run.data.params["lora.r"] == str(t.params["r"])
        assert float(run.data.params["train.lr"]) == pytest.approx(t.params["lr"], rel=1e-12)
        assert run.data.metrics["final_accuracy"] == pytest.approx(t.value, abs=1e-9)
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id
        # named by what the search varies (r, targets and lr here; the experiment names the sweep)
        assert run.info.run_name == (f"t{t.number}·r{t.params['r']}·{t.params['targets']}·lr{t.params['lr']:.3g}"
                                     f"·s{t.user_attrs['seed_index']}")
    best = [n for n, r in by_number.items() if r.data.tags.get("lora_sweep.best") == "true"]
    means = {}
    for t in trials:
        means.setdefault(json.dumps(t.params, sort_keys=True), []).append(t)
    top = max(means.values(), key=lambda g: sum(t.value for t in g) / len(g))  # the best seed mean
    expected = max(top, key=lambda t: (t.value, -t.number))
    assert best == [expected.number]
    assert parent.data.tags["lora_sweep.best_trial"] == str(expected.number)
    assert parent.data.metrics["best_accuracy"] == pytest.approx(expected.value)

    # running the finished sweep again does nothing and duplicates nothing
    assert main(["run", str(path)]) == 0
    assert len(load_study(home).get_trials()) == 4
    assert len(mlflow_runs(home)[1]) == 4


def test_pruning_stops_a_configuration_that_cannot_learn(tiny_model_dir: Path, tiny_data_file: Path,
                                                         empty_store: Path, tmp_path: Path) -> None:
    home = seeded_home(tmp_path, empty_store)
    # the grid runs in the order written: lr 3e-2 learns; lr 1e-9 leaves the model where it started
    path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, home, rank=[4], lr=[3e-2, 1e-9], n_trials=2,
                       pruner="median", prune_startup_trials=1)
    result = run_sweep(load_sweep_config(path))
    study = load_study(home)
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED]
    pruned = study.trials[1]
    assert pruned.params["lr"] == 1e-9 and max(pruned.intermediate_values) <= 30
    _, children = mlflow_runs(home)
    run = next(r for r in children if r.data.params["optuna.trial_number"] == "1")
    assert run.info.status == "KILLED" and run.data.tags["lora_sweep.state"] == "PRUNED"
    assert run.data.tags["lora_sweep.reason"].startswith("pruned at step")
    assert result.best[0].number == 0 and result.stopped == "budget"
    print(f"\nsweep overhead: {result.overhead_s:.2f} s of {result.wall_s:.2f} s wall "
          f"({result.overhead_fraction:.1%}); train {result.trial_train_s:.2f} s, eval {result.trial_eval_s:.2f} s")


def test_a_grid_whose_trial_failed_stops_without_repeating_a_configuration(
        tiny_model_dir: Path, tiny_data_file: Path, empty_store: Path, tmp_path: Path) -> None:
    """lr 1e30 fails (the loss overflows), so the budget of 2 is never spent; the grid has nothing left
    and the sweep stops there, instead of making up a trial (a random repeat of a grid configuration)."""
    home = seeded_home(tmp_path, empty_store)
    path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, home, rank=[4], lr=[1e30, 3e-2], n_trials=2,
                       train={"steps": 10, "eval_every": 10})
    result = run_sweep(load_sweep_config(path))
    study = load_study(home)
    assert [(t.state, t.params["lr"]) for t in study.trials] == [(TrialState.FAIL, 1e30), (TrialState.COMPLETE, 3e-2)]
    assert result.stopped == "grid" and result.trials_run == 2


def _signal_a_running_sweep(path: Path, home: Path, tmp_path: Path, sig: signal.Signals,
                            ready: Callable[[list[optuna.trial.FrozenTrial]], bool]) -> tuple[list[int], int, str]:
    """``lora-sweep run`` in a subprocess, sent ``sig`` as soon as ``ready(trials)`` holds for the study's
    trials: (the trials RUNNING with their MLflow run then, its exit code, its stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "TRANSFORMERS_VERBOSITY": "error", "LORA_SWEEP_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "run", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    signalled: list[int] = []
    journal = home / "optuna" / "tiny-sweep.journal"
    try:
        deadline = time.monotonic() + 600  # bounds a hang only: the signal comes as soon as it can
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(KeyError):  # KeyError: the journal exists, the study not yet
                trials = load_study(home).get_trials(deepcopy=False) if journal.is_file() else []
                if ready(trials):
                    proc.send_signal(sig)
                    signalled = [t.number for t in trials
                                 if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs]
                    break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and not signalled:
            proc.kill()
        _, err = proc.communicate(timeout=300)  # bounds a hang only: stopping takes seconds
    return signalled, proc.returncode, err.decode()


def _running_with_run(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    return [t for t in trials if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs]


@pytest.mark.parametrize("pack", [1, 2])
def test_resume_after_a_killed_worker(tiny_model_dir: Path, tiny_data_file: Path, empty_store: Path,
                                      tmp_path: Path, pack: int) -> None:
    home = seeded_home(tmp_path, empty_store)
    # 2 configurations x 2 seeds; trials long enough (~1-2 s) to be killed in the middle of one. With
    # pack 2 the worker trains two at a time: the kill leaves every trial of its pack RUNNING.
    path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, home, rank=[1, 2], seeds=2, n_trials=4,
                       train={"steps": 250, "eval_every": 50}, pack=pack)
    killed, code, err = _signal_a_running_sweep(
        path, home, tmp_path, signal.SIGKILL,
        lambda trials: any(t.state == TrialState.COMPLETE for t in trials) and len(_running_with_run(trials)) == pack)
    assert killed, f"the sweep never ran a second trial: {err[-2000:]}"
    assert code == -signal.SIGKILL

    before = load_study(home)
    assert all(before.trials[n].state == TrialState.RUNNING for n in killed)  # what a crash leaves behind
    assert {t.number for t in before.trials if t.state == TrialState.RUNNING} == set(killed)
    parent_before, _ = mlflow_runs(home)

    result = run_sweep(load_sweep_config(path))
    assert result.recovered == killed
    study = load_study(home)
    counts = Counter(t.state for t in study.get_trials())
    assert counts == {TrialState.COMPLETE: 4, TrialState.FAIL: len(killed)}
    assert all(study.trials[n].state == TrialState.FAIL for n in killed)
    # every planned (configuration, seed) ran to the end exactly once: no loss, no duplicate
    assert sorted(planned(study).values()) == [1, 1, 1, 1]
    assert len({key for key, _ in planned(study)}) == 2
    for n in killed:
        retried = [t for t in study.trials if t.state == TrialState.COMPLETE
                   and t.params == study.trials[n].params
                   and t.user_attrs["seed_index"] == study.trials[n].user_attrs["seed_index"]]
        assert len(retried) == 1 and retried[0].number > n

    parent, children = mlflow_runs(home)
    assert parent.info.run_id == parent_before.info.run_id and parent.info.status == "FINISHED"
    statuses = Counter(r.info.status for r in children)
    assert statuses == {"FINISHED": 4, "FAILED": len(killed)}
    for n in killed:
        orphan = next(r for r in children if r.data.tags["optuna.trial_number"] == str(n))
        assert orphan.info.status == "FAILED" and "worker died" in orphan.data.tags["lora_sweep.error"]
    assert sum(r.data.tags.get("lora_sweep.best") == "true" for r in children) == 1
    client = MlflowClient(tracking_uri=store_uri(home))
    for t in study.get_trials(states=(TrialState.COMPLETE,)):  # each COMPLETE trial kept its adapter
        files = {f.path for f in client.list_artifacts(t.user_attrs["mlflow_run_id"], "adapter")}
        assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= files, t.number
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.metrics["pack_size"] == pack
        assert ("lora_sweep.pack" in t.user_attrs) is (pack > 1)


def test_ctrl_c_fails_the_running_trial_and_loses_nothing(tiny_model_dir: Path, tiny_data_file: Path,
                                                          empty_store: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    home = seeded_home(tmp_path, empty_store)
    path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, home, rank=[2, 4], n_trials=2)
    calls = []
    real = run_trial

    def interrupted_second(config, **kwargs):
        calls.append(config.lora.r)
        if len(calls) == 2:
            def hook(step, metrics):
                raise KeyboardInterrupt
            kwargs["report"] = hook
        return real(config, **kwargs)

    monkeypatch.setattr(engine_trial, "run_trial", interrupted_second)
    result = run_sweep(load_sweep_config(path))
    assert result.stopped == "interrupted"
    study = load_study(home)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert study.trials[1].user_attrs["lora_sweep.fail"] == "interrupted"
    parent, children = mlflow_runs(home)
    assert parent.info.status == "KILLED"
    killed = next(r for r in children if r.data.params["optuna.trial_number"] == "1")
    assert killed.info.status == "KILLED" and killed.data.tags["lora_sweep.state"] == "FAILED"

    monkeypatch.setattr(engine_trial, "run_trial", real)
    result = run_sweep(load_sweep_config(path))
    assert result.stopped == "budget" and result.requeued == 1 and result.trials_run == 1
    study = load_study(home)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[2].params == study.trials[1].params
    assert mlflow_runs(home)[0].info.status == "FINISHED"


def test_sigterm_stops_a_sweep_as_ctrl_c_does(tiny_model_dir: Path, tiny_data_file: Path, empty_store: Path,
                                              tmp_path: Path) -> None:
    """A scheduler's stop (Kubernetes, Slurm, docker stop: SIGTERM) ends the running trial FAIL in Optuna
    and KILLED in MLflow at once, as Ctrl-C does, instead of leaving it RUNNING for recovery."""
    home = seeded_home(tmp_path, empty_store)
    path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, home, rank=[1, 2], n_trials=2,
                       train={"steps": 400, "eval_every": 100})
    stopped, code, err = _signal_a_running_sweep(path, home, tmp_path, signal.SIGTERM,
                                                 lambda trials: bool(_running_with_run(trials)))
    assert stopped, f"the sweep never ran a trial: {err[-2000:]}"
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert "terminated by SIGTERM" in err

    study = load_study(home)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]  # nothing left for recovery
    for n in stopped:
        assert study.trials[n].state == TrialState.FAIL and study.trials[n].user_attrs["lora_sweep.fail"] == "interrupted"
    parent, children = mlflow_runs(home)
    assert parent.info.status == "KILLED"
    for n in stopped:
        run = next(r for r in children if r.data.params["optuna.trial_number"] == str(n))
        assert run.info.status == "KILLED" and run.data.tags["lora_sweep.state"] == "FAILED"


def test_the_fingerprint_ignores_settings_that_change_no_result(tiny_model_dir: Path, tiny_data_file: Path,
                                                                tmp_path: Path) -> None:
    """A sweep may resume with checkpointing or micro-batches turned on; fields added later at their
    default (model.quantize: none) leave the fingerprint of a sweep created before them unchanged."""
    from sweeps.engine.study import fingerprint

    path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, tmp_path / "home")
    base = fingerprint(load_sweep_config(path))
    assert "quantize" not in json.loads(base)["model"]
    assert not {"gradient_checkpointing", "micro_batch_size"} & set(json.loads(base)["train"])
    same = load_sweep_config(path, ["train.gradient_checkpointing=true", "train.micro_batch_size=4"])
    assert fingerprint(same) == base
    assert fingerprint(load_sweep_config(path, ["model.quantize=4bit"])) != base
    assert fingerprint(load_sweep_config(path, ["train.batch_size=8"])) != base
