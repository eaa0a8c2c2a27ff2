"""Tests of ``lora-sweep export`` and model registration.

One tiny sweep (the tiny BERT and keyword data of ``test_train``: a grid of r=2 and r=4, 20 steps each)
runs once for the module, with the real Optuna journal storage and a real MLflow sqlite store; a
PRUNED and a FAIL trial are then told to the same study through Optuna's API. The exports are loaded
back with real PEFT and transformers. Nothing touches the network.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState
from safetensors import safe_open
from safetensors.torch import save_file
from support import LABELS, error_lines, load_study, seeded_home, store_uri, write_sweep

from lora_core import LoraError
from sweeps.cli.main import main
from sweeps.config.sweep import SweepConfig, load_sweep_config
from sweeps.data import prepare as sweeps_data
from sweeps.engine.loop import run_sweep
from sweeps.engine.study import open_study
from sweeps.export.registry import register_best
from sweeps.export.verify import TOLERANCE
from sweeps.models.load import load_model, load_tokenizer
from sweeps.training.evaluate import evaluate

pytestmark = pytest.mark.usefixtures("isolated")  # hub offline, a private data cache, quiet progress bars


@dataclass
class Sweep:
    yaml: Path
    home: Path
    config: SweepConfig
    best: int
    other: int                 # the other COMPLETE trial
    pruned: int
    failed: int
    runs: dict[int, Any]       # trial number -> MLflow run

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=store_uri(self.home), registry_uri=store_uri(self.home))

    def artifact_file(self, number: int) -> Path:
        uri = self.runs[number].info.artifact_uri
        return Path(urllib.parse.urlparse(uri).path) / "adapter" / "adapter_model.safetensors"


@pytest.fixture(scope="module")
def sweep(tiny_model_dir: Path, tiny_data_file: Path, empty_store: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    folder = tmp_path_factory.mktemp("export-sweep")
    home = seeded_home(folder, empty_store)
    path = write_sweep(folder, tiny_model_dir, tiny_data_file, home, rank=[2, 4], lr=[3e-2], n_trials=2,
                       train={"steps": 20, "eval_every": 10})
    with pytest.MonkeyPatch.context() as patch:
        import huggingface_hub.constants

        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setenv("LORA_SWEEP_CACHE", str(folder / "cache"))
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        sweeps_data.clear_memory_cache()
        config = load_sweep_config(path)
        result = run_sweep(config, include_plotlyjs="cdn")
    study = load_study(home)
    pruned, failed = study.ask(), study.ask()
    study.tell(pruned, state=TrialState.PRUNED)
    study.tell(failed, state=TrialState.FAIL)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.COMPLETE,
                                                     TrialState.PRUNED, TrialState.FAIL]
    best = result.best[0].number
    client = MlflowClient(tracking_uri=store_uri(home))
    runs = {t.number: client.get_run(t.user_attrs["mlflow_run_id"]) for t in study.get_trials()[:2]}
    return Sweep(path, home, config, best, 1 - best, pruned.number, failed.number, runs)


def tiny_data(config: SweepConfig) -> sweeps_data.PreparedData:
    tokenizer = load_tokenizer(config.model.name)
    return sweeps_data.prepare_data(config.data, config.model.task, tokenizer, seed=config.seed)


def fresh_base(config: SweepConfig, num_labels: int) -> torch.nn.Module:
    return load_model(config.model.name, "classification", num_labels=num_labels, device="cpu").model


def logged(sweep: Sweep, number: int, key: str) -> float:
    return sweep.runs[number].data.metrics[f"final_{key}"]


def leftovers(folder: Path) -> list[str]:
    """Hidden staging folders an export left next to its destination."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def card_front_matter(out: Path) -> dict[str, Any]:
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


# --------------------------------------------------------------------------- exports that work


def test_export_best_loads_in_peft_and_reproduces_the_logged_metric(sweep: Sweep, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer

    out = tmp_path / "best"
    assert main(["export", str(sweep.yaml), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    accuracy, loss = logged(sweep, sweep.best, "accuracy"), logged(sweep, sweep.best, "eval_loss")
    assert f"trial {sweep.best} (best)" in printed
    assert f"logged {accuracy:.6f}" in printed and f"logged {loss:.6f}" in printed
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    assert not (out / "merged").exists() and leftovers(tmp_path) == []
    # the adapter file is the logged artifact, byte for byte
    assert (out / "adapter_model.safetensors").read_bytes() == sweep.artifact_file(sweep.best).read_bytes()

    data = tiny_data(sweep.config)
    peft_model = PeftModel.from_pretrained(fresh_base(sweep.config, data.num_labels), str(out)).eval()
    metrics = evaluate(peft_model, data, "validation", sweep.config, AutoTokenizer.from_pretrained(out))
    assert metrics["accuracy"] == pytest.approx(accuracy, abs=TOLERANCE)
    assert metrics["eval_loss"] == pytest.approx(loss, abs=TOLERANCE)
    # the adapter changed the model: the base alone does not give the trained loss
    base_metrics = evaluate(fresh_base(sweep.config, data.num_labels), data, "validation", sweep.config, None)
    assert base_metrics["eval_loss"] != pytest.approx(loss, abs=1e-3)

    front = card_front_matter(out)
    assert front["library_name"] == "peft" and front["base_model"] == str(sweep.config.model.name)
    card = (out / "README.md").read_text()
    run_id = sweep.runs[sweep.best].info.run_id
    for text in (f"trial {sweep.best}", f"{accuracy:.6f}", run_id, "tiny-sweep.journal", "PeftModel.from_pretrained",
                 "lora_core.load_adapter", "| r | ", "classifier", "trainable parameters"):
        assert text in card, text


def test_export_a_named_trial_by_sweep_name(sweep: Sweep, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "other"
    out.mkdir()  # an empty directory is fine: the export replaces it
    code = main(["export", "tiny-sweep", "--home", str(sweep.home), "--trial", str(sweep.other), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert (out / "adapter_model.safetensors").read_bytes() == sweep.artifact_file(sweep.other).read_bytes()
    config = yaml.safe_load((out / "adapter_config.json").read_text())
    assert str(config["r"]) == sweep.runs[sweep.other].data.params["lora.r"]
    card = (out / "README.md").read_text()
    assert f"trial {sweep.other} (chosen with --trial)" in card
    assert f"{logged(sweep, sweep.other, 'accuracy'):.6f}" in card


def test_merged_model_loads_with_from_pretrained_and_reproduces(sweep: Sweep, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "merged-export"
    assert main(["export", str(sweep.yaml), "--out", str(out), "--merged"]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    assert (out / "merged" / "model.safetensors").is_file() and not list((out / "merged").glob("*.bin"))
    assert not [k for k in merged.state_dict() if "lora" in k]
    assert sorted(merged.config.id2label.values()) == sorted(LABELS)
    data = tiny_data(sweep.config)
    metrics = evaluate(merged, data, "validation", sweep.config, AutoTokenizer.from_pretrained(out / "merged"))
    assert metrics["accuracy"] == pytest.approx(logged(sweep, sweep.best, "accuracy"), abs=TOLERANCE)
    assert metrics["eval_loss"] == pytest.approx(logged(sweep, sweep.best, "eval_loss"), abs=TOLERANCE)
    assert "merged/" in (out / "README.md").read_text()


# --------------------------------------------------------------------------- refusals


def test_a_non_empty_destination_is_refused_and_left_alone(sweep: Sweep, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(sweep.yaml), "--out", str(out)]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert lines[0].startswith("error: cannot export to") and "not an empty directory" in lines[0]
    assert lines[1].startswith("  hint:")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("case", ["unknown", "pruned", "failed"])
def test_trials_without_an_adapter_are_refused(case: str, sweep: Sweep, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    number = {"unknown": 99, "pruned": sweep.pruned, "failed": sweep.failed}[case]
    out = tmp_path / "out"
    assert main(["export", str(sweep.yaml), "--out", str(out), "--trial", str(number)]) == 2
    lines = error_lines(capsys.readouterr().err)
    expected = {"unknown": "has no trial 99", "pruned": f"trial {sweep.pruned} of sweep 'tiny-sweep' is PRUNED",
                "failed": f"trial {sweep.failed} of sweep 'tiny-sweep' is FAIL"}[case]
    assert expected in lines[0]
    assert lines[1] == f"  hint: COMPLETE trials: {', '.join(str(n) for n in sorted((sweep.best, sweep.other)))}"
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_pareto_sweep_needs_a_trial(tmp_path: Path, tiny_model_dir: Path, tiny_data_file: Path) -> None:
    path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, tmp_path / "home", name="pareto",
                       second_objective="trainable_params", pruner="none")
    config = load_sweep_config(path)
    study = open_study(config)  # a real study; its trials told by hand (no training needed)
    for values in ([0.9, 300.0], [0.8, 100.0], [0.7, 200.0]):
        study.tell(study.ask(), values=values)
    with pytest.raises(LoraError) as err:
        main_export(config, tmp_path / "out")
    assert "two objectives (accuracy, trainable_params)" in err.value.message
    assert "Pareto-optimal trials are 0, 1" in err.value.message and err.value.hint == "choose one with --trial N"
    assert not (tmp_path / "out").exists()


def main_export(config: SweepConfig, out: Path, **kwargs: Any) -> Any:
    from sweeps.export.exporter import export_trial

    return export_trial(config, out, echo=lambda _: None, **kwargs)


@pytest.mark.parametrize("tamper", ["scaled-B", "missing-key"])
def test_a_tampered_adapter_is_refused_and_nothing_is_written(tamper: str, sweep: Sweep, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    artifact = sweep.artifact_file(sweep.best)
    original = artifact.read_bytes()
    with safe_open(str(artifact), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    b_keys = sorted(k for k in tensors if k.endswith("lora_B.weight"))
    if tamper == "scaled-B":
        for key in b_keys:
            tensors[key] = tensors[key] * 3.0
    else:
        del tensors[b_keys[0]]
    save_file(tensors, str(artifact), metadata=meta)
    out = tmp_path / "new" / "out"  # its parent is created for the staging folder, and removed again
    try:
        assert main(["export", str(sweep.yaml), "--out", str(out), "--merged", "--register", "tampered"]) == 2
    finally:
        artifact.write_bytes(original)
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    if tamper == "scaled-B":
        # B x 3 changes what the adapter computes: the first validation metric that differs is named
        assert "refusing to export" in lines[0] and re.search(r"gives validation (accuracy|macro_f1|eval_loss) ", lines[0])
        assert "reproduced" in captured.out and "logged" in captured.out  # both numbers were shown
    else:
        module = b_keys[0].removeprefix("base_model.model.").removesuffix(".lora_B.weight")
        assert lines[0] == f"error: adapter is missing lora_B for {module}"
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []
    assert not sweep.client().search_registered_models("name = 'tampered'")


# --------------------------------------------------------------------------- the model registry


def test_register_twice_makes_one_version_with_alias_best(sweep: Sweep, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import mlflow.artifacts

    assert main(["export", str(sweep.yaml), "--out", str(tmp_path / "a"), "--register", "tiny-lora"]) == 0
    assert "registered as new model 'tiny-lora' version 1; alias 'best' -> version 1" in capsys.readouterr().out
    again = register_best(sweep.config, "tiny-lora")  # what `lora-sweep run --register` calls
    assert (again.version, again.alias, again.created) == ("1", "best", False)
    assert main(["export", str(sweep.yaml), "--out", str(tmp_path / "b"), "--register", "tiny-lora"]) == 0
    assert "already registered as model 'tiny-lora' version 1" in capsys.readouterr().out

    client = sweep.client()
    versions = client.search_model_versions("name = 'tiny-lora'")
    assert len(versions) == 1
    best_run = sweep.runs[sweep.best]
    by_alias = client.get_model_version_by_alias("tiny-lora", "best")
    assert str(by_alias.version) == "1" and by_alias.run_id == best_run.info.run_id
    assert by_alias.source == best_run.info.artifact_uri + "/adapter"
    assert by_alias.tags["lora_sweep.sweep"] == "tiny-sweep"
    assert by_alias.tags["optuna.trial_number"] == str(sweep.best)
    assert float(by_alias.tags["final_accuracy"]) == pytest.approx(logged(sweep, sweep.best, "accuracy"), abs=1e-12)
    # the registered source is the adapter itself
    files = Path(mlflow.artifacts.download_artifacts(artifact_uri=by_alias.source, dst_path=str(tmp_path / "dl")))
    assert (files / "adapter_model.safetensors").read_bytes() == sweep.artifact_file(sweep.best).read_bytes()

    # another trial: a second version, under its own alias; 'best' stays where it was
    other = register_best(sweep.config, "tiny-lora", trial=sweep.other)
    assert (other.version, other.alias, other.created) == ("2", f"trial-{sweep.other}", True)
    assert str(client.get_model_version_by_alias("tiny-lora", "best").version) == "1"
    assert len(client.search_model_versions("name = 'tiny-lora'")) == 2


def test_register_refuses_bad_names_and_trials(sweep: Sweep) -> None:
    with pytest.raises(LoraError, match="registered model name"):
        register_best(sweep.config, "no spaces please")
    with pytest.raises(LoraError, match="is PRUNED"):
        register_best(sweep.config, "tiny-lora-2", trial=sweep.pruned)
    assert not sweep.client().search_registered_models("name = 'tiny-lora-2'")


def test_a_sweep_or_store_that_is_not_there_is_an_error_and_creates_nothing(
        sweep: Sweep, tmp_path: Path, tiny_model_dir: Path, tiny_data_file: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, home, name="never-run")
    with pytest.raises(LoraError, match="has not been run"):
        main_export(load_sweep_config(path), tmp_path / "out")
    assert not (home / "optuna").exists() and not (tmp_path / "out").exists()
    # the study found through --storage, but --home points where the MLflow store is not
    journal = sweep.home / "optuna" / "tiny-sweep.journal"
    assert main(["export", "tiny-sweep", "--storage", str(journal), "--home", str(home), "--out",
                 str(tmp_path / "out")]) == 2
    assert f"error: no MLflow store at {home.resolve() / 'mlflow.db'}" in capsys.readouterr().err
    assert not home.exists() and not (tmp_path / "out").exists()
