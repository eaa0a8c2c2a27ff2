"""The Python API (``import sweeps``) on the real built-in model and data, with tiny budgets.

Three runs of one grid sweep (2 ranks x 2 seeds, 3 steps of 8 rows, 32 validation rows)
are made once for the module: by the command line, by ``sweeps.run`` from a dict, and by ``sweeps.run``
from the YAML, which is interrupted in its first trial (the notebook's stop button: SIGINT to the main
thread) and run again. They must hold the same trials; the API's tables, choices, figures, report and
export are checked against the study, the MLflow runs, ``lora-sweep status`` and the report's JSON.
"""

from __future__ import annotations

import _thread
import contextlib
import io
import json
import logging
import os
import re
import signal
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState
from support import REPO, load_study, report_data, seeded_home, store_uri

import sweeps
from sweeps.cli.main import main
from sweeps.engine import trial as engine_trial

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("test_api")]

NAME = "api-grid"
SWEEP: dict[str, Any] = {
    "name": NAME, "seed": 0,
    "model": {"name": "minilm-l6", "task": "classification", "device": "cpu"},
    "data": {"name": "pydoc-topics", "max_length": 24, "max_train_samples": 64, "max_eval_samples": 32},
    "lora": {"modules_to_save": "auto"},
    "train": {"steps": 3, "batch_size": 8, "eval_every": 3, "lr": 1e-2},
    "search": {"strategy": "grid", "rank": [1, 2], "targets": ["q,v"], "alpha": 8, "lr": [1e-2],
               "dropout": [0.0], "seeds": 2, "n_trials": 4, "pruner": "none", "test_eval": False},
}
# the dict's run also reads the test split at its end (the others skip it: it changes no trial)
WITH_TEST = {**SWEEP, "search": {**SWEEP["search"], "test_eval": True}}


def _state() -> dict[str, Any]:
    """The process-wide state an API call must leave as it found it."""
    root = logging.getLogger()
    return {"cwd": os.getcwd(), "threads": torch.get_num_threads(), "root_handlers": list(root.handlers),
            "root_level": root.level, "optuna_level": logging.getLogger("optuna").level,
            "optuna_handlers": list(logging.getLogger("optuna").handlers),
            "record_factory": logging.getLogRecordFactory(), "excepthook": __import__("sys").excepthook,
            "signals": {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)},
            "env": {k: os.environ.get(k) for k in ("MLFLOW_DISABLE_TELEMETRY", "TRANSFORMERS_VERBOSITY",
                                                    "HF_HUB_DISABLE_PROGRESS_BARS")}}


@dataclass
class Runs:
    folder: Path
    yaml: Path
    cli_home: Path
    dict_home: Path
    yaml_home: Path
    cli_out: str
    dict_out: str
    dict_sweep: sweeps.Sweep
    interrupted: sweeps.Sweep
    interrupted_states: list[TrialState]
    interrupted_fail: str | None
    resumed: sweeps.Sweep
    state_before: dict[str, Any]
    state_after_run: dict[str, Any]
    state_after_interrupt: dict[str, Any]
    seconds: dict[str, float]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, empty_store: Path) -> Any:
    folder = tmp_path_factory.mktemp("api")
    homes = {}
    for key in ("cli", "dict", "yaml"):
        (folder / key).mkdir()
        homes[key] = seeded_home(folder / key, empty_store)
    path = folder / f"{NAME}.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, "tracking": {"home": str(homes["cli"])}}, sort_keys=False))
    seconds: dict[str, float] = {}
    with pytest.MonkeyPatch.context() as patch:
        import huggingface_hub.constants

        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        patch.chdir(folder)
        previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)  # a notebook kernel's Ctrl-C
        try:
            cli_out, err = io.StringIO(), io.StringIO()
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(cli_out), contextlib.redirect_stderr(err):
                assert main(["run", str(path)]) == 0, err.getvalue()[-3000:]
            seconds["cli"] = time.perf_counter() - t0

            before = _state()
            dict_out = io.StringIO()
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(dict_out):
                from_dict = sweeps.run({**WITH_TEST, "tracking": {"home": str(homes["dict"])}})
            seconds["dict"] = time.perf_counter() - t0
            after_run = _state()

            calls: list[int] = []
            real = engine_trial.run_trial

            def stop_button_in_the_first_trial(config: Any, **kwargs: Any) -> Any:
                calls.append(config.lora.r)
                if len(calls) == 1:
                    inner = kwargs.get("report")

                    def hook(step: int, metrics: dict[str, float]) -> Any:
                        _thread.interrupt_main()  # SIGINT to the main thread, as the stop button sends the kernel
                        time.sleep(30)            # the KeyboardInterrupt lands here
                        return inner(step, metrics) if inner else None

                    kwargs["report"] = hook
                return real(config, **kwargs)

            patch.setattr(engine_trial, "run_trial", stop_button_in_the_first_trial)
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                interrupted = sweeps.run(path, home=homes["yaml"])
            seconds["interrupted"] = time.perf_counter() - t0
            after_interrupt = _state()
            study = load_study(homes["yaml"], NAME)
            states = [t.state for t in study.get_trials()]
            fail = study.trials[0].user_attrs.get("lora_sweep.fail")
            patch.setattr(engine_trial, "run_trial", real)
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                resumed = sweeps.run(path, home=homes["yaml"])
            seconds["resumed"] = time.perf_counter() - t0
        finally:
            signal.signal(signal.SIGINT, previous_int)
        print(f"api-grid runs, seconds: {seconds}")
        yield Runs(folder, path, homes["cli"], homes["dict"], homes["yaml"], cli_out.getvalue(), dict_out.getvalue(),
                   from_dict, interrupted, states, fail, resumed, before, after_run, after_interrupt, seconds)


def _trials(home: Path) -> list[tuple[str, int, float]]:
    """(params, seed index, value) of each COMPLETE trial, in configuration-and-seed order."""
    study = load_study(home, NAME)
    return sorted((json.dumps(t.params, sort_keys=True), t.user_attrs["seed_index"], t.values[0])
                  for t in study.get_trials(states=(TrialState.COMPLETE,)))


def test_run_from_a_dict_and_from_a_yaml_give_the_cli_trials(runs: Runs) -> None:
    cli = _trials(runs.cli_home)
    assert len(cli) == 4 and {p for p, _, _ in cli} == {
        json.dumps({"alpha": 8.0, "dropout": 0.0, "lr": 0.01, "r": r, "targets": "q,v"}, sort_keys=True) for r in (1, 2)}
    for other in (_trials(runs.dict_home), _trials(runs.yaml_home)):
        assert [(p, s) for p, s, _ in other] == [(p, s) for p, s, _ in cli]
        for (_, _, a), (_, _, b) in zip(other, cli, strict=True):
            assert a == pytest.approx(b, abs=1e-6)
    assert runs.dict_sweep.stopped == "budget" and runs.resumed.stopped == "budget"
    # the same printout as the command's (the command adds its shell commands; the API its Python ones)
    for line in ("sweep api-grid: minilm-l6 on pydoc-topics, grid, 4 trials", "stopped: budget; study trials: 4 complete",
                 "trial 3 COMPLETE accuracy"):
        assert line in runs.cli_out and line in runs.dict_out, line
    assert "lora-sweep export" in runs.cli_out and "lora-sweep export" not in runs.dict_out
    assert "sweep.export(DIR)" in runs.dict_out
    assert "\x1b[" not in runs.dict_out  # not a terminal: plain text
    for home in (runs.cli_home, runs.dict_home, runs.yaml_home):  # each run wrote the sweep's report
        assert (home / "reports" / f"{NAME}.html").is_file()


def test_an_interrupt_ends_the_running_trial_and_a_rerun_resumes(runs: Runs) -> None:
    assert runs.interrupted.stopped == "interrupted"
    assert TrialState.RUNNING not in runs.interrupted_states
    assert runs.interrupted_states[0] == TrialState.FAIL and runs.interrupted_fail == "interrupted"
    study = load_study(runs.yaml_home, NAME)
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    assert [t.state for t in study.trials].count(TrialState.COMPLETE) == 4
    assert study.trials[0].state == TrialState.FAIL  # kept; its seed ran again as a new trial
    again = [t for t in study.trials[1:] if t.params == study.trials[0].params
             and t.user_attrs["seed_index"] == study.trials[0].user_attrs["seed_index"]]
    assert len(again) == 1 and again[0].state == TrialState.COMPLETE
    assert runs.resumed.trials["state"].tolist().count("COMPLETE") == 4


def test_a_call_leaves_the_process_as_it_found_it(runs: Runs) -> None:
    assert runs.state_after_run == runs.state_before
    assert runs.state_after_interrupt == runs.state_before


def test_trials_frame_has_every_trial_with_real_values(runs: Runs) -> None:
    frame = runs.dict_sweep.trials
    for column in ("number", "state", "r", "alpha", "targets", "lr", "dropout", "seed_index", "seed", "value",
                   "final_accuracy", "final_macro_f1", "final_eval_loss", "test_accuracy", "trainable_params",
                   "train_s", "peak_memory_bytes", "adapter_bytes", "pack", "mlflow_run_id"):
        assert column in frame.columns, column
    assert frame.attrs["objective"] == "accuracy"
    study = load_study(runs.dict_home, NAME)
    client = MlflowClient(tracking_uri=store_uri(runs.dict_home))
    assert frame["number"].tolist() == [t.number for t in study.trials] == [0, 1, 2, 3]
    for t, row in zip(study.trials, frame.itertuples(), strict=True):
        assert row.state == "COMPLETE" and row.r == t.params["r"] and row.targets == "q,v" and row.alpha == 8.0
        assert row.seed == row.seed_index == t.user_attrs["seed_index"]
        assert row.value == t.values[0] == row.final_accuracy
        assert row.mlflow_run_id == t.user_attrs["mlflow_run_id"]
        metrics = client.get_run(row.mlflow_run_id).data.metrics
        assert row.trainable_params == metrics["trainable_params"] > 0
        assert row.final_eval_loss == metrics["final_eval_loss"] and row.train_s == metrics["train_s"] > 0
        assert row.pack is None  # trained alone
    rec = runs.dict_sweep.recommendation
    assert rec is not None
    tested = frame[frame["number"].isin(rec.trials)]
    assert tested["test_accuracy"].notna().all() and ((tested["test_accuracy"] >= 0) & (tested["test_accuracy"] <= 1)).all()


def test_configurations_and_the_two_choices(runs: Runs) -> None:
    sweep = runs.dict_sweep
    frame = sweep.configurations
    assert len(frame) == 2 and sorted(frame["r"]) == [1, 2]
    study = load_study(runs.dict_home, NAME)
    for row in frame.itertuples():
        values = [t.values[0] for t in study.trials if t.params["r"] == row.r]
        assert row.seeds == 2 and sorted(row.values) == sorted(values)
        assert row.mean == pytest.approx(statistics.fmean(values), abs=1e-12)
        assert row.std == pytest.approx(statistics.stdev(values), abs=1e-12)
        assert row.trainable_params > 0
    assert frame["mean"].iloc[0] >= frame["mean"].iloc[1]  # best first
    rec, best = sweep.recommendation, sweep.best_quality
    assert rec is not None and best is not None
    assert best.mean == frame["mean"].max() and best.source == "rule"
    row = frame[frame["recommended"]].iloc[0].to_dict()
    assert (rec.r, rec.mean, rec.n, rec.trials) == (row["r"], row["mean"], 2, list(row["trials"]))
    assert rec.trial in rec.trials and rec.objective == "accuracy" and rec.why
    assert rec.test_n == 2 and rec.test_mean == pytest.approx(row["test_mean"], abs=1e-9)
    assert sweep.decisions == []  # a grid has no ladder


def test_load_of_a_cli_sweep_gives_the_recommendation_status_and_the_report_show(
        runs: Runs, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = sweeps.load(NAME, home=runs.cli_home)
    rec = sweep.recommendation
    assert rec is not None and sweep.stopped is None
    capsys.readouterr()
    assert main(["status", NAME, "--home", str(runs.cli_home)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "recommended (" in x)
    assert f"r={rec.r} " in line and f"accuracy {rec.mean:.4f}" in line
    assert f"(trials {','.join(map(str, rec.trials))};" in line
    best = re.search(r"best: trial (\d+)", out)
    assert best and sweep.best_quality is not None and int(best.group(1)) in sweep.best_quality.trials
    report = report_data((runs.cli_home / "reports" / f"{NAME}.html").read_text())
    assert report["recommendation"]["params"] == rec.params
    assert report["recommendation"]["trials"] == rec.trials
    # a YAML names the same sweep; a dict too; refresh reads it again and finds the same
    assert sweeps.load(runs.yaml, home=runs.cli_home).recommendation == rec
    assert sweeps.load({**SWEEP, "tracking": {"home": str(runs.cli_home)}}).recommendation == rec
    numbers = sweep.trials["number"].tolist()
    assert sweep.refresh() is sweep and sweep.trials["number"].tolist() == numbers == [0, 1, 2, 3]


def test_figures_report_and_export(runs: Runs, tmp_path: Path) -> None:
    sweep = runs.dict_sweep
    figures = sweep.figures(analyses=False)
    assert {"rank", "cost", "curves", "optuna-timeline"} <= set(figures)
    rank = figures["rank"]
    assert type(rank).__name__ == "Figure" and hasattr(rank, "_repr_mimebundle_") and rank.data
    ys = [float(y) for trace in rank.data for y in (trace.y or []) if y is not None]
    assert any(y == pytest.approx(sweep.configurations["mean"].max(), abs=1e-12) for y in ys)
    path = sweep.report(tmp_path / "report.html")
    assert path == (tmp_path / "report.html").resolve() and "report-data" in path.read_text()
    with pytest.raises(sweeps.SweepError, match="exists"):
        sweep.report(tmp_path / "report.html")
    exported = sweep.export(tmp_path / "adapter", echo=False)
    assert exported.trial == sweep.trials.query("best")["number"].item()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert exported.reproduced["accuracy"] == pytest.approx(exported.logged["accuracy"], abs=1e-4)


def test_train_one_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    home = tmp_path / "runs"
    result = sweeps.train(overrides={"train.steps": 2, "train.batch_size": 8, "train.eval_every": 2,
                                     "data.max_length": 24, "data.max_train_samples": 32,
                                     "data.max_eval_samples": 32, "lora.r": 2, "tracking.home": str(home)},
                          quiet=True)
    assert isinstance(result, sweeps.TrialResult)
    assert result.state == "COMPLETE" and result.steps_done == 2
    assert result.value == result.final_metrics["accuracy"] and 0 <= result.value <= 1
    assert result.trainable_params > 0 and result.model is not None
    run = MlflowClient(tracking_uri=store_uri(home)).get_run(result.run_id)
    assert run.data.metrics["final_accuracy"] == pytest.approx(result.value, abs=1e-12)


def test_a_bad_config_raises_the_cli_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = {**SWEEP, "lora": {"rr": 4}, "tracking": {"home": str(tmp_path / "home")}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(sweeps.SweepError) as caught:
        sweeps.run(bad)
    assert isinstance(caught.value, ValueError)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"error: {caught.value.message}" and "unknown key 'lora.rr'" in err[0]
    assert err[1] == f"  hint: {caught.value.hint}"
    with pytest.raises(sweeps.SweepError) as targets:
        sweeps.run(SWEEP, overrides=["search.targets=[q,zz]"], home=tmp_path / "home", quiet=True)
    assert "zz" in targets.value.message and not (tmp_path / "home").exists()  # nothing written
    with pytest.raises(sweeps.SweepError) as missing:
        sweeps.load("no-such-sweep", home=tmp_path / "home")
    assert main(["status", "no-such-sweep", "--home", str(tmp_path / "home")]) == 2
    assert capsys.readouterr().err.splitlines()[0] == f"error: {missing.value.message}"
    with pytest.raises(sweeps.SweepError, match="--workers must be >= 0"):
        sweeps.run(SWEEP, workers=-1, home=tmp_path / "home")


def test_process_state_is_put_back_after_anything() -> None:
    from sweeps.api.state import kept_process_state

    before = _state()
    rng = torch.get_rng_state()
    handler = logging.StreamHandler(io.StringIO())
    with pytest.raises(KeyboardInterrupt), kept_process_state():
        os.chdir("/")
        torch.set_num_threads(max(1, torch.get_num_threads() + 1))
        torch.manual_seed(123)
        logging.getLogger().addHandler(handler)
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        signal.signal(signal.SIGTERM, lambda *_: None)
        os.environ["TRANSFORMERS_VERBOSITY"] = "debug"
        raise KeyboardInterrupt
    assert _state() == before
    assert torch.equal(torch.get_rng_state(), rng)


def test_docs_api_lists_every_public_name_and_each_imports() -> None:
    text = (REPO / "docs" / "API.md").read_text()
    listed = set(re.findall(r"^#+ `sweeps\.(\w+)", text, re.M))
    assert listed == set(sweeps.__all__), (listed ^ set(sweeps.__all__))
    for name in listed:
        assert getattr(sweeps, name) is not None
    members = set(re.findall(r"^#+ `Sweep\.(\w+)", text, re.M))
    assert {"trials", "configurations", "recommendation", "best_quality", "decisions", "figures", "report",
            "export", "refresh"} <= members
    for name in members:
        assert hasattr(sweeps.Sweep, name), name
