"""The test split, read once at the end of a sweep (`sweeps.engine.holdout`, issue 14).

A tiny grid sweep (ranks 1 and 4, two seeds each, 20 steps) on the tiny keyword data, given as three
files (train, validation, test), so that one file's labels can change while the other two stay byte for
byte the same. Trials train the tiny BERT on the CPU with one thread (bit-identical runs).
"""

from __future__ import annotations

import json
import random
import re
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState
from support import (
    assert_user_error,
    load_study,
    mlflow_runs,
    report_data,
    seeded_home,
    store_uri,
    write_sweep,
)

import lora_core
from sweeps.cli.main import main
from sweeps.config.sweep import load_sweep_config
from sweeps.engine.holdout import figures_text, parent_metric
from sweeps.engine.loop import prepare_sweep_data, run_sweep
from sweeps.engine.selection import held_out_choices
from sweeps.engine.study import fingerprint
from sweeps.models.load import load_model
from sweeps.names import TEST_ATTR
from sweeps.tracking.artifacts import download_adapter

pytestmark = pytest.mark.usefixtures("isolated")  # hub offline, a private data cache, quiet progress bars

GRID = {"rank": [1, 4], "targets": ["q,v"], "lr": [1e-2], "seeds": 2, "n_trials": 4, "test_eval": True,
        "train": {"steps": 100, "eval_every": 50, "schedule": "constant"}}
METRICS = ("accuracy", "macro_f1", "eval_loss")


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical trials, and modest on a shared machine
    yield
    torch.set_num_threads(threads)


def split_files(folder: Path, source: Path, shuffle_test: bool) -> dict[str, str]:
    """train (160 rows), validation (40) and test (40) files cut from the tiny data; with ``shuffle_test``
    the test file's labels are shuffled (its texts, and the other two files, are unchanged)."""
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    parts = {"train": rows[:160], "validation": rows[160:200], "test": [dict(r) for r in rows[200:]]}
    if shuffle_test:
        labels = [r["label"] for r in parts["test"]]
        random.Random(7).shuffle(labels)
        for row, label in zip(parts["test"], labels, strict=True):
            row["label"] = label
        assert labels != [r["label"] for r in rows[200:]]
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, part in parts.items():
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
        out[split] = str(path)
    return out


def grid_sweep(folder: Path, model_dir: Path, data_file: Path, store: Path, shuffle_test: bool = False,
               **search: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    home = seeded_home(folder, store)
    path = write_sweep(folder, model_dir, data_file, home, **{**GRID, **search})
    doc = yaml.safe_load(path.read_text())
    doc["data"]["files"] = split_files(folder / "data", data_file, shuffle_test)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def trial_table(home: Path) -> list[tuple[Any, ...]]:
    """Every decision and validation figure of a sweep: each trial's params, seed, state and value, and
    its run's final validation metrics (exactly, as logged)."""
    study = load_study(home)
    _, children = mlflow_runs(home)
    finals = {int(r.data.params["optuna.trial_number"]): {k: r.data.metrics[f"final_{k}"] for k in METRICS}
              for r in children}
    return [(t.number, json.dumps(t.params, sort_keys=True), t.user_attrs["seed_index"], t.state.name, t.values,
             finals[t.number]) for t in study.get_trials()]


def test_the_test_split_is_read_only_after_the_last_decision(tmp_path: Path, tiny_model_dir: Path,
                                                             tiny_data_file: Path, empty_store: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from sweeps.training import evaluate as evaluate_module

    splits: list[str] = []
    real = evaluate_module.evaluate

    def spy(model: Any, data: Any, split: str, *args: Any, **kwargs: Any) -> dict[str, float]:
        splits.append(split)
        return real(model, data, split, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate", spy)  # what the end of a sweep calls (the trainer has its own)
    results, homes, records = [], [], []
    for shuffle in (False, True):
        path = grid_sweep(tmp_path / ("shuffled" if shuffle else "plain"), tiny_model_dir, tiny_data_file,
                          empty_store, shuffle_test=shuffle)
        config = load_sweep_config(path)
        splits.clear()
        results.append(run_sweep(config, include_plotlyjs="cdn"))
        homes.append(Path(config.tracking.home))
        records.append(load_study(homes[-1]).user_attrs[TEST_ATTR])
        evaluated = {t.number for trials in held_out_choices(load_study(homes[-1]), config).values() for t in trials}
        # each chosen trial once: its validation figure reproduced, then the test split, nothing else
        assert splits == ["validation", "test"] * len(evaluated)
        assert sorted(int(n) for n in records[-1]["trials"]) == sorted(evaluated)
    plain, shuffled = results

    # every decision and every validation figure is the same ...
    assert trial_table(homes[0]) == trial_table(homes[1])
    assert all(s == TrialState.COMPLETE for s in (t.state for t in load_study(homes[0]).get_trials()))
    assert [(b.number, b.values) for b in plain.best] == [(b.number, b.values) for b in shuffled.best]
    assert plain.stopped == shuffled.stopped and plain.recommended_trial == shuffled.recommended_trial
    for role in ("recommended", "best_quality"):
        a, b = records[0]["choices"][role], records[1]["choices"][role]
        assert (a["params"], a["trials"], a["validation"]) == (b["params"], b["trials"], b["validation"])
    for n, entry in records[0]["trials"].items():
        assert entry["validation"] == records[1]["trials"][n]["validation"]  # the reloaded adapters agree too
    # ... while the test figures differ: the labels the test split holds are all that changed
    assert records[0]["data"] != records[1]["data"]
    for n, entry in records[0]["trials"].items():
        assert entry["test"]["eval_loss"] != records[1]["trials"][n]["test"]["eval_loss"]
    for role in ("recommended", "best_quality"):
        a, b = records[0]["choices"][role]["test"], records[1]["choices"][role]["test"]
        assert a["n"] == b["n"] == 2 and a["mean"] != b["mean"]
    # shuffled labels are wrong about 2/3 of the time: the real test accuracy is clearly higher (>= 0.15)
    assert records[0]["choices"]["best_quality"]["test"]["mean"] >= \
        records[1]["choices"]["best_quality"]["test"]["mean"] + 0.15


def independent_test_accuracy(home: Path, run_id: str, config: Any, folder: Path) -> float:
    """A trial's test accuracy recomputed here: its adapter loaded with lora_core onto a fresh base, the
    test rows classified one at a time (no padding, no batching)."""
    data = prepare_sweep_data(config)
    adapter = download_adapter(config.tracking, run_id, folder / f"adapter-{run_id}")
    model = load_model(config.model.name, "classification", num_labels=data.num_labels, device="cpu").model
    lora_core.load_adapter(model, adapter)
    model.eval()
    hits = 0
    with torch.inference_mode():
        for ex in data.test:
            batch = data.collate([ex])
            label = int(batch.pop("labels")[0])
            hits += int(model(**batch).logits[0].argmax()) == label
    return hits / len(data.test)


def test_printout_parent_run_report_and_card_show_both_figures(tmp_path: Path, tiny_model_dir: Path,
                                                               tiny_data_file: Path, empty_store: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "240")  # rich: one table row per line
    path = grid_sweep(tmp_path, tiny_model_dir, tiny_data_file, empty_store)
    home = tmp_path / "runs"
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    study = load_study(home)
    record = study.user_attrs[TEST_ATTR]
    assert record["objective"] == "accuracy" and record["rows"] == 40 and record["failed"] == {}
    choices = record["choices"]
    assert set(choices) == {"recommended", "best_quality"}

    # the printout: a labelled table, one row per choice, validation then test
    assert "the test split (40 held-out rows, read once after the last decision)" in out
    assert re.search(r"validation accuracy \(chose it; biased up\)\s*\S*\s*test accuracy \(unbiased\)", out), out
    for role, label in (("recommended", "recommended"), ("best_quality", "best quality")):
        c = choices[role]
        row = next(line for line in out.splitlines() if line.strip("│ ").startswith(label + " "))
        val, test = figures_text(c["validation"]), figures_text(c["test"])
        assert row.index(val) < row.index(test), row
    assert out.count("test split: evaluating trial") == len({n for c in choices.values() for n in c["trials"]})

    # the children: test_<metric> on each evaluated trial's run, nowhere else; the parent: means and stds
    parent, children = mlflow_runs(home)
    by_number = {int(r.data.params["optuna.trial_number"]): r for r in children}
    evaluated = {int(n) for n in record["trials"]}
    for n, run in by_number.items():
        assert (f"test_{METRICS[0]}" in run.data.metrics) == (n in evaluated)
        if n in evaluated:
            for k in METRICS:
                assert run.data.metrics[f"test_{k}"] == pytest.approx(record["trials"][str(n)]["test"][k], abs=1e-12)
    for role, c in choices.items():
        test = [by_number[n].data.metrics["test_accuracy"] for n in c["trials"]]
        val = [by_number[n].data.metrics["final_accuracy"] for n in c["trials"]]
        assert len(test) == 2
        assert parent.data.metrics[parent_metric(role, "test", "accuracy", "mean")] == pytest.approx(
            statistics.fmean(test), abs=1e-9)
        assert parent.data.metrics[parent_metric(role, "test", "accuracy", "std")] == pytest.approx(
            statistics.stdev(test), abs=1e-9)
        assert parent.data.metrics[parent_metric(role, "validation", "accuracy", "mean")] == pytest.approx(
            statistics.fmean(val), abs=1e-9)
        assert [t.value for t in study.get_trials() if t.number in c["trials"]] == pytest.approx(val, abs=1e-12)
    client = MlflowClient(tracking_uri=store_uri(home))
    logged = json.loads(Path(client.download_artifacts(parent.info.run_id, "test_split.json", str(tmp_path))).read_text())
    assert logged["choices"] == choices

    # one trial's figure recomputed independently: at most one of 40 predictions may flip (1.5/40)
    n = choices["best_quality"]["trials"][0]
    config = load_sweep_config(path)
    again = independent_test_accuracy(home, by_number[n].info.run_id, config, tmp_path)
    assert again == pytest.approx(record["trials"][str(n)]["test"]["accuracy"], abs=1.5 / 40)

    # the report: the cards and a table name both figures; its JSON holds the record's choices
    html = (home / "reports" / "tiny-sweep.html").read_text()
    assert "validation accuracy (chose it)" in html and "test accuracy (held out)" in html
    assert "test accuracy (held out; mean ± std (n))" in html
    rec_card = re.search(r'<div class="card" id="recommendation".*?</dl>', html, re.S)
    assert rec_card is not None
    shown = dict(re.findall(r'<dd data-key="([^"]+)">([^<]*)</dd>', rec_card.group(0)))
    rec = choices["recommended"]
    assert shown["accuracy"] == f"{rec['validation']['mean']:.4g} ± {rec['validation']['std']:.4g} (2)"
    assert shown["test_accuracy"] == f"{rec['test']['mean']:.4g} ± {rec['test']['std']:.4g} (2)"
    page = report_data(html)
    assert page["test"] == choices and page["test_rows"] == 40
    table = re.search(r'<table class="test-split">(.*?)</table>', html, re.S)
    assert table is not None
    assert table.group(1).count("<tr>") == 3  # the header and two choices

    # the model card of the exported (best) trial: a validation and a test column, the figures as recorded
    export = tmp_path / "export"
    assert main(["export", "tiny-sweep", "--home", str(home), "--out", str(export)]) == 0
    exported = int(re.search(r"exported trial (\d+)", capsys.readouterr().out).group(1))
    card = (export / "README.md").read_text()
    assert "## Test split (held out)" in card and "| | validation | test |" in card
    mine = record["trials"][str(exported)]
    assert f"| this trial (accuracy) | {mine['validation']['accuracy']:.6f} | {mine['test']['accuracy']:.6f} |" in card
    front = yaml.safe_load(card.split("---\n", 2)[1])
    results = {r["dataset"]["split"]: r["metrics"] for r in front["model-index"][0]["results"]}
    assert {m["name"]: m["value"] for m in results["test"]}["test accuracy"] == round(mine["test"]["accuracy"], 6)

    # resuming the finished sweep evaluates nothing again and shows the same figures
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "test split: evaluating" not in out and figures_text(choices["recommended"]["test"]) in out
    assert load_study(home).user_attrs[TEST_ATTR] == record


def test_test_eval_off_then_on_then_changed_choices(tmp_path: Path, tiny_model_dir: Path, tiny_data_file: Path,
                                                   empty_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``search.test_eval: false`` reads nothing and says so; turned on at a resume (the fingerprint ignores
    it), the sweep evaluates its choices once; when more trials change the choices, only the trials
    without a figure are evaluated and the earlier figures are kept as they were."""
    path = grid_sweep(tmp_path, tiny_model_dir, tiny_data_file, empty_store, n_trials=2, test_eval=False)
    home = tmp_path / "runs"
    assert fingerprint(load_sweep_config(path, ["search.test_eval=true"])) == fingerprint(load_sweep_config(path))
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "test split: the test split was not evaluated (search.test_eval: false)" in out
    assert "test split: evaluating" not in out and TEST_ATTR not in load_study(home).user_attrs
    parent, _ = mlflow_runs(home)
    assert not any("_test_" in k for k in parent.data.metrics)

    on = ["--set", "search.test_eval=true"]
    assert main(["run", str(path), *on]) == 0  # the budget of 2 is spent: r=1, seeds 0 and 1
    out = capsys.readouterr().out
    first = load_study(home).user_attrs[TEST_ATTR]
    assert [line.split(" (")[0] for line in out.splitlines() if "test split: evaluating" in line] == \
        ["test split: evaluating trial 0", "test split: evaluating trial 1"]
    assert first["choices"]["recommended"]["trials"] == first["choices"]["best_quality"]["trials"] == [0, 1]

    assert main(["run", str(path), *on, "--set", "search.n_trials=4"]) == 0  # r=4 joins and wins clearly
    out = capsys.readouterr().out
    second = load_study(home).user_attrs[TEST_ATTR]
    assert second["choices"]["best_quality"]["trials"] == [2, 3]
    evaluated = [int(line.split("trial ")[1].split(" ")[0]) for line in out.splitlines() if "test split: evaluating" in line]
    chosen = {n for c in second["choices"].values() for n in c["trials"]}
    assert evaluated == sorted(chosen - {0, 1}) and set(evaluated) == {2, 3}
    assert {n: second["trials"][n] for n in ("0", "1")} == first["trials"]  # kept, not evaluated again
    parent, children = mlflow_runs(home)
    by_number = {int(r.data.params["optuna.trial_number"]): r for r in children}
    for role, c in second["choices"].items():
        assert parent.data.metrics[parent_metric(role, "test", "accuracy", "mean")] == pytest.approx(
            statistics.fmean(by_number[n].data.metrics["test_accuracy"] for n in c["trials"]), abs=1e-9)


def make_study(values: dict[int, tuple[dict[str, Any], float, float]], attrs: dict[str, Any] | None = None) -> Any:
    """An in-memory study of COMPLETE trials: number -> (params, objective, trainable params)."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    study = optuna.create_study(direction="maximize")
    for number in sorted(values):
        params, value, cost = values[number]
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: CategoricalDistribution([v]) for k, v in params.items()}, value=value,
            user_attrs={"seed_index": number % 2, "lora_sweep.cost": {"trainable_params": cost, "train_s": 1.0}}))
    for key, value in (attrs or {}).items():
        study.set_user_attr(key, value)
    return study


def test_the_choices_are_the_ladders_or_the_reports_rule(tmp_path: Path, tiny_model_dir: Path,
                                                        tiny_data_file: Path) -> None:
    small, large = {"r": 1, "targets": "q,v"}, {"r": 8, "targets": "q,v"}
    # the larger rank is better by 0.0125 with seed noise ~0.007 (2 seeds each): the smaller one's difference
    # to the best has the lower bound -0.0125 - t(0.95, 2 dof) x 0.00707 = -0.033: not shown within the default
    # margin (0.01 of accuracy), so the best is recommended; shown within a margin of 0.05
    trials = {0: (small, 0.800, 10.0), 1: (small, 0.810, 10.0), 2: (large, 0.815, 80.0), 3: (large, 0.820, 80.0)}
    path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, tmp_path / "home", seeds=2)
    config = load_sweep_config(path)
    got = held_out_choices(make_study(trials), config)
    assert [t.number for t in got["best_quality"]] == [2, 3] and [t.number for t in got["recommended"]] == [2, 3]
    wide = load_sweep_config(path, ["search.margin=0.05"])
    got = held_out_choices(make_study(trials), wide)
    assert [t.number for t in got["best_quality"]] == [2, 3] and [t.number for t in got["recommended"]] == [0, 1]
    assert load_sweep_config(path, ["search.margin=0.04"]).search.margin_value("classification") == 0.04
    one_seed = load_sweep_config(path, ["search.seeds=1", "search.margin=0.05"])  # one seed: nothing shown, the best
    got = held_out_choices(make_study(trials), one_seed)
    assert [t.number for t in got["recommended"]] == [t.number for t in got["best_quality"]] == [2, 3]
    # a ladder's are its record's, whatever the values say; none before it recommends
    ladder = load_sweep_config(path, ["search.strategy=ladder"])
    record = {"recommendation": {"params": large, "trials": [2, 3]}, "best_quality": {"params": small, "trials": [0, 1, 9]}}
    got = held_out_choices(make_study(trials, {"lora_sweep.ladder": record}), ladder)
    assert [t.number for t in got["recommended"]] == [2, 3] and [t.number for t in got["best_quality"]] == [0, 1]
    assert held_out_choices(make_study(trials, {"lora_sweep.ladder": {"decisions": []}}), ladder) == {}


class InProcessWorker:
    """A worker that runs the sweep as ``lora-sweep worker`` does (``owner=False``), inside this process,
    the first time it is polled (no process start-up: the test stays short)."""

    def __init__(self, config: Any, lines: list[str]) -> None:
        self.config, self.lines, self.code = config, lines, None

    def poll(self) -> int | None:
        if self.code is None:
            run_sweep(self.config, progress=lambda p: self.lines.append(f"[worker] {p.event}") if p.event else None,
                      owner=False)
            self.code = 0
        return self.code

    def interrupt(self) -> None:
        pass

    def kill(self) -> None:
        pass


class InProcessLauncher:
    workers = 1

    def __init__(self, config: Any, lines: list[str]) -> None:
        self.config, self.lines = config, lines

    def describe(self) -> list[str]:
        return ["1 worker in this process"]

    def start(self, index: int, replacing: Any = None) -> InProcessWorker:
        return InProcessWorker(self.config, self.lines)


def test_with_workers_the_owner_evaluates_once(tmp_path: Path, tiny_model_dir: Path, tiny_data_file: Path,
                                               empty_store: Path) -> None:
    """``run --workers N`` (`supervise`): the workers train and never read the test split; the owner reads
    it once, after they have ended."""
    from sweeps.engine.workers import supervise

    path = grid_sweep(tmp_path, tiny_model_dir, tiny_data_file, empty_store, n_trials=2, train={"steps": 30})
    config = load_sweep_config(path)
    lines: list[str] = []
    result = supervise(config, InProcessLauncher(config, lines), say=lines.append)
    worker_lines = [line for line in lines if line.startswith("[worker]")]
    assert sum("COMPLETE" in line for line in worker_lines) == 2 and not any("test split" in x for x in worker_lines)
    evaluating = [line.split(" (")[0] for line in lines if line.startswith("test split: evaluating")]
    assert evaluating == ["test split: evaluating trial 0", "test split: evaluating trial 1"]
    assert lines.index(next(x for x in lines if x.startswith("test split"))) > \
        max(i for i, x in enumerate(lines) if x.startswith("[worker]"))  # after the last trial
    home = Path(config.tracking.home)
    record = load_study(home).user_attrs[TEST_ATTR]
    assert result.test is not None and result.test.record == record and result.test.evaluated == 2
    assert record["failed"] == {} and record["choices"]["recommended"]["trials"] == [0, 1]
    parent, children = mlflow_runs(home)
    assert parent.info.status == "FINISHED"
    for run in children:
        n = run.data.params["optuna.trial_number"]
        assert run.data.metrics["test_accuracy"] == pytest.approx(record["trials"][n]["test"]["accuracy"], abs=1e-12)


def test_a_bad_switch_is_one_error_line(tmp_path: Path, tiny_model_dir: Path, tiny_data_file: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, tmp_path / "home")
    assert_user_error(main(["run", str(path), "--set", "search.test_eval=maybe"]), capsys.readouterr().err,
                      "search.test_eval must be true or false, got 'maybe'")
    assert not (tmp_path / "home").exists()  # nothing ran
