"""Plain helpers shared by the test modules (no fixtures: those are in conftest.py): the tiny data set's
words, trial and sweep files for the tiny model, reading a sweep's study and MLflow runs back, and
checking a user error's two lines."""

from __future__ import annotations

import json
import re
import shutil
import socket
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

import lora_core
from lora_core import LoraConfig
from sweeps.config.sweep import SweepConfig, load_sweep_config
from sweeps.config.trial import TrialConfig
from sweeps.data import prepare as sweeps_data
from sweeps.engine.loop import run_sweep
from sweeps.names import STEPS_ATTR
from sweeps.tracking.store import DEFAULT_EXPERIMENT
from sweeps.training.trainer import Trial, TrialResult

REPO = Path(__file__).resolve().parents[1]

LABELS = ("fruit", "water", "machine")


KEYWORDS = {"fruit": ["apple", "pear", "plum"], "water": ["river", "lake", "ocean"],
            "machine": ["engine", "motor", "piston"]}


FILLER = ["the", "a", "of", "to", "and", "in", "is", "it", "that", "was", "for", "on", "are", "with", "as",
          "his", "they", "be", "at", "one", "have", "this", "from", "or", "had", "by", "we", "you", "all",
          "were", "when", "there", "can", "an", "which", "their", "said", "if", "do", "will", "each"]


def tiny_sets(model_dir: Path, data_file: Path | str, home: Path | None, *extra: str) -> list[str]:
    """``--set`` values for a 30-step trial of the tiny model on the tiny data, evaluated every 10 steps."""
    sets = [f"model.name={model_dir}", "model.device=cpu", "data.name=null", f"data.files={data_file}",
            "data.max_length=32", "lora.r=4", "lora.alpha=8", "train.steps=30", "train.eval_every=10",
            "train.batch_size=16", "train.lr=1e-2"]
    if home is not None:
        sets.append(f"tracking.home={home}")
    return [*sets, *extra]


def argv(sets: list[str], *before: str) -> list[str]:
    return ["train", *before, *[a for s in sets for a in ("--set", s)]]


def seeded_home(tmp_path: Path, empty_store: Path) -> Path:
    home = tmp_path / "runs"
    home.mkdir()
    shutil.copyfile(empty_store, home / "mlflow.db")
    return home


def store_uri(home: Path) -> str:
    return f"sqlite:///{home.resolve() / 'mlflow.db'}"


def plain_search_runs(home: Path, monkeypatch: pytest.MonkeyPatch,
                      experiment: str = DEFAULT_EXPERIMENT) -> pd.DataFrame:
    """``mlflow.search_runs`` through MLflow's global tracking URI, as a user would; the URI (and the
    environment variable ``set_tracking_uri`` also sets) are restored afterwards."""
    import mlflow.tracking._tracking_service.utils as tracking_utils

    with monkeypatch.context() as patch:
        patch.setattr(tracking_utils, "_tracking_uri", None)
        patch.setenv("MLFLOW_TRACKING_URI", "")  # recorded, so that the old value (or none) comes back
        mlflow.set_tracking_uri(store_uri(home))
        return mlflow.search_runs(experiment_names=[experiment])


def assert_user_error(code: int, err: str, expected: str) -> None:
    """Exit code 2, one error line naming ``expected`` and at most one hint line."""
    assert code == 2
    lines = error_lines(err)
    assert 1 <= len(lines) <= 2, err
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert all(line.startswith("  hint: ") for line in lines[1:])


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------- sweeps


def write_sweep(folder: Path, model_dir: Path, data_file: Path, home: Path, name: str = "tiny-sweep",
                train: dict[str, Any] | None = None, **search: Any) -> Path:
    doc = {"name": name, "seed": 0,
           "model": {"name": str(model_dir), "device": "cpu"},
           "data": {"name": None, "files": str(data_file), "max_length": 32},
           "train": {"steps": 30, "eval_every": 10, "batch_size": 16, **(train or {})},
           "tracking": {"home": str(home)},
           "search": {"rank": [2, 4], "alpha": "2r", "targets": ["q,v"], "lr": [1e-2], "dropout": [0.0],
                      "seeds": 1, "strategy": "grid", "n_trials": 2, "pruner": "none",
                      "test_eval": False,  # the end-of-sweep test split: on only where a test is about it
                      **search}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def load_study(home: Path, name: str = "tiny-sweep") -> optuna.Study:
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(home / "optuna" / f"{name}.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def mlflow_runs(home: Path, experiment: str = "tiny-sweep") -> tuple[Any, list[Any]]:
    """(the parent run, the child runs) of the sweep's experiment."""
    client = MlflowClient(tracking_uri=store_uri(home))
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("lora_sweep.kind") == "sweep"]
    assert len(parents) == 1, "exactly one parent run per sweep"
    children = [r for r in runs if r.data.tags.get("lora_sweep.kind") == "trial"]
    assert all(r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id for r in children)
    return parents[0], children


def planned(study: optuna.Study) -> Counter:
    """(configuration, seed index) of the COMPLETE and PRUNED trials, counted."""
    return Counter((json.dumps(t.params, sort_keys=True), t.user_attrs["seed_index"])
                   for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)))


# --------------------------------------------------------------------------- the report tests' sweeps

MAIN, OTHER, LADDER = "tiny-report", "tiny-other", "tiny-ladder"
LADDER_SWEEP: dict[str, Any] = {  # the tiny ladder sweep (write_sweep's keywords)
    "strategy": "ladder", "n_trials": 40, "train": {"steps": 20, "eval_every": 10},
    "ladder": {"r_start": 1, "r_max": 4, "targets": ["q,v", "q,k,v,o"], "seeds": 2, "calibration_lrs": [1e-2, 3e-2],
               "calibration_steps": 10, "patience": 2,
               "retune_lr": False}}  # one rate per rank and target set here (tests/test_ladder.py runs the lr bracket)


@dataclass
class Sweeps:
    home: Path
    main: SweepConfig
    other: SweepConfig
    ladder: SweepConfig
    main_yaml: Path
    folder: Path

    def study(self, name: str = MAIN, storage: Path | None = None) -> optuna.Study:
        path = storage or self.home / "optuna" / f"{name}.journal"
        return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(JournalFileBackend(str(path))))

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=store_uri(self.home))


def build_sweeps(model_dir: Path, data_file: Path, store: Path, factory: pytest.TempPathFactory) -> Sweeps:
    """Run the report tests' three sweeps (tiny-report, tiny-other, tiny-ladder) into one home."""
    folder = factory.mktemp("report-sweeps")
    home = seeded_home(folder, store)
    train = {"steps": 20, "eval_every": 10}
    main_yaml = write_sweep(folder, model_dir, data_file, home, name=MAIN, rank=[1, 4], targets=["q,v", "q,k,v,o"],
                            lr=[1e-2], seeds=2, n_trials=8, train=train)
    other_yaml = write_sweep(folder, model_dir, data_file, home, name=OTHER, rank=[2, 8], targets=["q,v"],
                             lr=[1e-2], seeds=1, n_trials=2, train=train)
    ladder_yaml = write_sweep(folder, model_dir, data_file, home, name=LADDER, **LADDER_SWEEP)
    with pytest.MonkeyPatch.context() as patch:
        import huggingface_hub.constants

        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setenv("LORA_SWEEP_CACHE", str(folder / "cache"))
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        sweeps_data.clear_memory_cache()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny trials: one thread is as fast, and modest on a shared machine
        configs = []
        try:
            for path in (main_yaml, other_yaml, ladder_yaml):
                config = load_sweep_config(path)
                run_sweep(config, include_plotlyjs="cdn")
                configs.append(config)
        finally:
            torch.set_num_threads(threads)
    return Sweeps(home, configs[0], configs[1], configs[2], main_yaml, folder)


def complete_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(states=(TrialState.COMPLETE,))


def rank_stats(study: optuna.Study) -> dict[tuple[str, int], tuple[float, float | None, int, list[int]]]:
    """(targets, r) -> (mean, sample std, n, trial numbers) of the COMPLETE full-length trials' objective,
    computed straight from the study (one configuration per cell in these sweeps; a ladder's shorter
    calibration trials left out)."""
    groups: dict[tuple[str, int], list[optuna.trial.FrozenTrial]] = defaultdict(list)
    for t in complete_trials(study):
        if STEPS_ATTR in t.user_attrs:
            continue
        groups[(t.params["targets"], t.params["r"])].append(t)
    out = {}
    for key, ts in groups.items():
        values = [t.value for t in ts]
        out[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values),
                    sorted(t.number for t in ts))
    return out


def report_data(text: str) -> dict[str, Any]:
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S)
    assert m, "the report embeds its numbers as JSON"
    return json.loads(m.group(1))


def assert_loaded_as_written(written: Any, loaded: Any, where: str = "") -> None:
    """Every value an example file writes is in the loaded config, unchanged: the loader neither drops nor
    alters a key (numbers written as strings, like YAML's ``1e-3``, and comma lists compare by value)."""
    if isinstance(written, dict):
        assert isinstance(loaded, dict), f"{where}: {loaded!r} is not a mapping"
        for key, value in written.items():
            assert key in loaded, f"{where}.{key} written but not loaded"
            assert_loaded_as_written(value, loaded[key], f"{where}.{key}".lstrip("."))
    elif isinstance(written, list) and isinstance(loaded, list):
        assert len(written) == len(loaded), f"{where}: {written!r} loaded as {loaded!r}"
        for i, (w, got) in enumerate(zip(written, loaded, strict=True)):
            assert_loaded_as_written(w, got, f"{where}[{i}]")
    elif isinstance(written, str) and isinstance(loaded, list):
        assert [p.strip() for p in written.split(",")] == loaded, f"{where}: {written!r} loaded as {loaded!r}"
    elif isinstance(loaded, float) and isinstance(written, (int, float, str)) and not isinstance(written, bool):
        assert float(written) == loaded, f"{where}: {written!r} loaded as {loaded!r}"
    else:
        assert written == loaded, f"{where}: {written!r} loaded as {loaded!r}"


# --------------------------------------------------------------------------- a fake tracked trial (tracking tests)

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


STEPS = 20
EVAL_STEPS = (10, 20)


def trial_config(enabled: bool = True) -> TrialConfig:
    cfg = TrialConfig(name="tiny", seed=3)
    cfg.model.name, cfg.model.dtype, cfg.model.device = "tiny-bert", "float32", "cpu"
    cfg.data.columns = {"text": "body", "label": "topic"}
    cfg.lora.r, cfg.lora.alpha, cfg.lora.targets = 2, 4.0, ["q", "v"]
    cfg.lora.modules_to_save, cfg.lora.enabled = ["classifier"], enabled
    cfg.train.steps, cfg.train.eval_every, cfg.train.lr = STEPS, 10, 2e-3
    return cfg.validate()


def trial_result(state: str = "COMPLETE", reason: str | None = None, steps: int = STEPS) -> TrialResult:
    curve = [(s, 1.1 - 0.01 * s) for s in range(1, steps + 1)]
    history = [{"step": s, "accuracy": 0.3 + s / 100, "macro_f1": 0.2 + s / 100, "eval_loss": 1.2 - s / 50}
               for s in EVAL_STEPS if s <= steps]
    last = {k: v for k, v in history[-1].items() if k != "step"}
    return TrialResult(state=state, reason=reason, objective="accuracy", direction="maximize",
                       final_metrics=last, best_metrics=dict(last), best_step=history[-1]["step"],
                       steps_done=steps, history=history, train_curve=curve, tokens_per_s=1234.5,
                       step_time_s=0.012, peak_memory_bytes=123_456_789, memory_kind="process_peak_rss",
                       trainable_params=555, lora_params=256, trainable_fraction=0.01, adapter_bytes=2220,
                       train_s=0.5, eval_s=0.1, wall_s=0.7)


def make_trial(tiny, state: str = "COMPLETE", reason: str | None = None, enabled: bool = True,
               steps: int = STEPS) -> Trial:
    config = trial_config(enabled)
    model = tiny.bert(seed=0)
    if enabled:
        lora_core.inject(model, LoraConfig(r=2, alpha=4, targets=["q", "v"], modules_to_save=["classifier"]))
        tiny.randomize_lora(model, seed=1)
        tiny.perturb_saved(model, seed=2)
    else:
        _perturb_head(model)
    # Trial.loaded and Trial.data are not used by tracking; a fake trial has neither.
    return Trial(config=config, result=trial_result(state, reason, steps), model=model, loaded=None, data=None)


def _perturb_head(model) -> None:
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.add_(0.5)


# --------------------------------------------------------------------------- data files (data tests)

def write_rows(path: Path, rows: list[dict[str, Any]]) -> str:
    """Write ``rows`` in the format named by ``path``'s extension; returns the path as a string."""
    if path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path, index=False)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return str(path)
