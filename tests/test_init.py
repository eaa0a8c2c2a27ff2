"""``lora-sweep init`` (a commented ladder sweep for a model and data set) and the target check of
``run``, ``worker`` and ``train`` (a target set the model lacks is refused before anything is created).

The two ``integration`` tests inspect the built-in models (from the real model cache; only their configs
are read: the models are built on the meta device). The rest use the tiny local models of conftest; one
runs the sweep init wrote, shortened with ``--set``. The Hugging Face Hub is never contacted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from support import assert_user_error, error_lines, load_study, mlflow_runs, tiny_sets, write_sweep

from sweeps.cli.main import main
from sweeps.config.sweep import load_sweep_config
from sweeps.models.inspect import check_targets, inspect_model

pytestmark = pytest.mark.usefixtures("isolated")  # hub offline, a private data cache, quiet progress bars

ALL_PRESETS = "q, k, v, o, attn, mlp, all-linear"


def _init(out: Path, *args: str) -> int:
    return main(["init", *args, "--out", str(out)])


def _written(out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[dict, str]:
    """The YAML init wrote (parsed) and its stdout; the file loads with the sweep loader as it is."""
    printed = capsys.readouterr().out
    doc = yaml.safe_load(out.read_text())
    config = load_sweep_config(out)
    assert config.search.strategy == "ladder" and config.search.ladder.seeds >= 2
    assert not [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")]  # no staging file left
    return doc, printed


def _pairs(folder: Path, rows: int = 40) -> Path:
    words = ["alpha", "beta", "gamma", "delta", "omega"]
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say {words[i % 5]}.", "completion": words[i % 5]}) + "\n"
                            for i in range(rows)))
    return path


# --------------------------------------------------------------------------- the built-in models


@pytest.mark.integration
def test_init_on_the_builtin_encoder_and_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "topics.yaml"
    assert _init(out, "--model", "minilm-l6", "--data", "pydoc-topics") == 0
    doc, printed = _written(out, capsys)
    assert doc["model"] == {"name": "minilm-l6", "task": "classification", "dtype": "auto", "device": "auto"}
    assert doc["data"]["name"] == "pydoc-topics" and doc["data"]["columns"] == {"text": "text", "label": "label"}
    assert doc["search"]["ladder"]["targets"] == ["q,v", "q,k,v,o", "all-linear"]
    assert "BertForSequenceClassification" in printed and f"presets  {ALL_PRESETS}" in printed
    assert "bert.encoder.layer.*.attention.self.query" in printed and "classifier" in printed
    assert "the built-in data set pydoc-topics is made for it" in printed
    check_targets(load_sweep_config(out))  # what run checks first


@pytest.mark.integration
def test_init_on_the_builtin_causal_lm_and_local_pairs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pairs.yaml"
    assert _init(out, "--model", "smollm2-135m", "--data", str(_pairs(tmp_path))) == 0
    doc, printed = _written(out, capsys)
    assert doc["name"] == "smollm2-135m-pairs"
    assert doc["model"]["task"] == "causal-lm"
    assert doc["data"]["files"] == str(tmp_path / "pairs.jsonl") and doc["data"]["name"] is None
    assert doc["data"]["columns"] == {"prompt": "prompt", "completion": "completion"}
    assert doc["data"]["prompt_template"] == "{prompt}\n"
    assert doc["search"]["ladder"]["targets"] == ["q,v", "q,k,v,o", "all-linear"]
    assert "LlamaForCausalLM" in printed and "134.5M parameters" in printed and "x30" in printed
    shape = inspect_model("smollm2-135m", "causal-lm")
    assert set(doc["search"]["ladder"]["targets"][-1:]) <= set(shape.presets)
    assert sum(g.count for g in shape.layers) == 211  # 30 layers x 7 projections + lm_head


# --------------------------------------------------------------------------- the tiny llama, end to end


def test_init_on_a_local_llama_writes_a_sweep_that_runs(tiny_llama_dir: Path, empty_store: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    data = _pairs(tmp_path)
    out = tmp_path / "sweep.yaml"
    assert main(["init", "--model", str(tiny_llama_dir), "--data", "pairs.jsonl"]) == 0  # default --out
    doc, printed = _written(out, capsys)
    assert doc["model"] == {"name": str(tiny_llama_dir), "task": "causal-lm", "dtype": "auto", "device": "auto"}
    assert doc["data"]["files"] == "pairs.jsonl"  # as given: relative to the working directory
    assert doc["data"]["max_length"] == 128  # capped by the model's max_position_embeddings
    assert doc["search"]["ladder"]["targets"] == ["q,v", "q,k,v,o", "all-linear"]
    assert "task     causal-lm (from the data's columns)" in printed
    assert (tmp_path / "lora-sweeps").exists() is False  # init writes the YAML only

    (tmp_path / "lora-sweeps").mkdir()
    shutil.copyfile(empty_store, tmp_path / "lora-sweeps" / "mlflow.db")  # an already migrated store
    shortened = ["search.n_trials=2", "train.steps=2", "train.eval_every=2", "train.batch_size=4",
                 "search.ladder.calibration_steps=2", "model.device=cpu", "data.max_length=16"]
    assert main(["run", "sweep.yaml", *[a for s in shortened for a in ("--set", s)]]) == 0
    assert "stopped: budget" in capsys.readouterr().out
    name = doc["name"]
    study = load_study(tmp_path / "lora-sweeps", name)
    done = [t for t in study.get_trials() if t.state.is_finished()]
    assert [t.state.name for t in done] == ["COMPLETE", "COMPLETE"]  # the cap; the ladder queued the rest
    assert {t.user_attrs["lora_sweep.stage"] for t in done} == {0}  # the learning-rate calibration
    _, children = mlflow_runs(tmp_path / "lora-sweeps", name)
    assert sorted(r.info.status for r in children) == ["FINISHED", "FINISHED"]
    assert data.is_file()


def test_inspect_a_fused_qkv_model(tmp_path: Path) -> None:
    """GPT-2 keeps q, k and v in one Conv1D (c_attn): the presets resolve to its rows."""
    from transformers import GPT2Config

    GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32,
               architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    shape = inspect_model(str(tmp_path), "causal-lm")
    assert shape.model_class == "GPT2LMHeadModel" and shape.presets == tuple(ALL_PRESETS.split(", "))
    roles = {g.name: (g.count, g.in_features, g.out_features, g.role) for g in shape.layers}
    assert roles["transformer.h.*.attn.c_attn"] == (2, 16, 48, "q,k,v fused")
    assert roles["transformer.h.*.attn.c_proj"] == (2, 16, 16, "o")
    assert roles["lm_head"][3] == "head"


def test_columns_are_peeked_and_mapped(tmp_path: Path) -> None:
    """Each file type's columns, read without the Arrow cache; the mapping and the task they suggest."""
    import pandas as pd

    from sweeps.data.peek import peek_data, propose_columns, task_from_columns

    pd.DataFrame({"sentence1": ["a"], "sentence2": ["b"], "label": [1]}).to_csv(tmp_path / "pairs.csv", index=False)
    pd.DataFrame({"instruction": ["a"], "response": ["b"]}).to_parquet(tmp_path / "chat.parquet")
    (tmp_path / "rows.json").write_text(json.dumps([{"Review": "fine", "sentiment": "pos"}, {"Review": "bad"}]))
    (tmp_path / "cols.json").write_text(json.dumps({"question": ["q"], "answer": ["a"]}))
    (tmp_path / "lines.tsv").write_text("text\tlabel\nhello\t0\n")
    expected = {
        "pairs.csv": ("classification", {"text": "sentence1", "text_pair": "sentence2", "label": "label"}),
        "chat.parquet": ("causal-lm", {"prompt": "instruction", "completion": "response"}),
        "rows.json": ("classification", {"text": "Review", "label": "sentiment"}),
        "cols.json": ("causal-lm", {"prompt": "question", "completion": "answer"}),
        "lines.tsv": ("classification", {"text": "text", "label": "label"}),
    }
    for name, (task, mapping) in expected.items():
        found = peek_data(str(tmp_path / name))
        assert found.kind == "file" and task_from_columns(found.columns) == task, name
        assert propose_columns(found, task) == mapping, name
    assert not (tmp_path / "cache").exists()  # LORA_SWEEP_CACHE (the isolated fixture): nothing copied
    assert peek_data("pydoc-names").columns == ("prompt", "completion")


# --------------------------------------------------------------------------- refusals write nothing


def test_init_refusals_exit_2_and_write_nothing(tiny_llama_dir: Path, tiny_model_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    pairs = _pairs(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Say a."}\n{"prompt": "Say b."}\n')
    texts = tmp_path / "texts.csv"
    texts.write_text("body,source\nhello there,web\n")
    out = tmp_path / "out" / "sweep.yaml"
    out.parent.mkdir()
    cases = [
        (["--model", str(tmp_path / "no-such-model"), "--data", str(pairs)], "does not exist"),
        (["--model", str(tiny_llama_dir), "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl does not exist"),
        (["--model", str(tiny_llama_dir), "--data", str(prompts)], "has no completion column for causal-lm"),
        (["--model", str(tiny_model_dir), "--data", str(texts)], "has no label column for classification"),
        (["--model", str(tiny_model_dir), "--data", str(texts), "--task", "classification", "--column",
          "label=nope"], "has no column 'nope'"),
        (["--model", str(tiny_model_dir), "--data", str(pairs), "--task", "causal-lm", "--column", "label=prompt"],
         "'label' is not a causal-lm role"),
    ]
    for args, expected in cases:
        assert_user_error(_init(out, *args), capsys.readouterr().err, expected)
        assert list(out.parent.iterdir()) == []  # nothing written, no staging file left

    # an existing file is kept unless --force
    out.write_text("mine\n")
    assert_user_error(_init(out, "--model", str(tiny_llama_dir), "--data", str(pairs)), capsys.readouterr().err,
                      "already exists")
    assert out.read_text() == "mine\n"
    assert _init(out, "--model", str(tiny_llama_dir), "--data", str(pairs), "--column", "prompt=prompt",
                 "--name", "mine", "--force") == 0
    doc, _ = _written(out, capsys)
    assert doc["name"] == "mine" and sorted(p.name for p in out.parent.iterdir()) == ["sweep.yaml"]


# --------------------------------------------------------------------------- run / worker / train check targets


@pytest.mark.parametrize("command", ["run", "worker", "run-ladder", "train"])
def test_a_target_the_model_lacks_is_refused_before_anything_is_created(
        command: str, tiny_model_dir: Path, tiny_data_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    cache = tmp_path / "cache"  # LORA_SWEEP_CACHE (the isolated fixture): the data cache would go here
    if command == "train":
        argv = ["train", *[a for s in tiny_sets(tiny_model_dir, tiny_data_file, home, "lora.targets=[q, zz]")
                           for a in ("--set", s)]]
        where = "lora.targets"
    else:
        search = ({"strategy": "ladder", "ladder": {"targets": ["q,v", "q,zz"], "seeds": 2}, "n_trials": 10}
                  if command == "run-ladder" else {"targets": ["q,zz"], "n_trials": 3, "rank": [2, 4, 8]})
        path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, home, **search)
        argv = [command.removesuffix("-ladder"), str(path)]
        where = "search.ladder.targets 'q,zz'" if command == "run-ladder" else "search.targets 'q,zz'"
    assert main(argv) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"error: {where}: target 'zz' matches no linear layer")
    assert "BertForSequenceClassification" in lines[0]
    assert lines[1].startswith(f"  hint: presets this model supports: {ALL_PRESETS}; or a layer name such as ")
    assert not home.exists()  # no study journal, no mlflow.db, no artifacts
    assert not (cache / "tokenized").exists() and not (cache / "datasets").exists()  # no data cache
