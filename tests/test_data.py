"""Tests for sweeps.data.prepare: sources, splits, columns, labels, tokenization, collation and caching.

Tokenizers are the built-in models' (cached locally, loaded once per module); the Hugging Face Hub is
never contacted. Every test gets its own empty ``$LORA_SWEEP_CACHE`` and an empty in-memory cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from support import write_rows as write

from lora_core import LoraError
from sweeps.config.trial import DataConfig
from sweeps.data import builtin as builtin_data
from sweeps.data import prepare as sd
from sweeps.data.prepare import (
    PreparedData,
    clear_memory_cache,
    load_raw_dataset,
    prepare_data,
    tokenized_cache_dir,
)

pytestmark = pytest.mark.usefixtures("fresh_data_caches")


@pytest.fixture(scope="module")
def topics(bert_tok: Any, tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORA_SWEEP_CACHE", str(tmp_path_factory.mktemp("cache")))
        return prepare_data(DataConfig(), "classification", bert_tok, seed=0)


def labelled_rows(n: int, labels: tuple[Any, ...] = ("neg", "pos"), prefix: str = "row") -> list[dict[str, Any]]:
    return [{"text": f"{prefix} {i} says {labels[i % len(labels)]}", "label": labels[i % len(labels)]}
            for i in range(n)]


def texts(raw: Any, split: str) -> list[str]:
    return list(raw[split].to_dict()["text"])


# --- built-in data sets --------------------------------------------------------------------------


def test_builtin_topics_prepared(topics: PreparedData) -> None:
    raw = builtin_data.load_builtin_dataset("pydoc-topics", seed=0)
    assert topics.task == "classification"
    assert topics.sizes() == {split: raw[split].num_rows for split in sd.SPLITS}
    assert topics.label_names == list(builtin_data.TOPIC_LABELS)
    assert topics.num_labels == len(builtin_data.TOPIC_LABELS)
    assert topics.generation == {}
    assert "pydoc-topics" in topics.source and len(topics.fingerprint) == 64
    for split in sd.SPLITS:
        examples = getattr(topics, split)
        assert [e["labels"] for e in examples] == raw[split]["label"]
        assert all(2 < len(e["input_ids"]) <= 64 for e in examples)
        assert all(len(e["token_type_ids"]) == len(e["input_ids"]) for e in examples)
    train_counts = torch.bincount(torch.tensor([e["labels"] for e in topics.train]))
    top = int(train_counts.argmax())
    expected = sum(e["labels"] == top for e in topics.validation) / len(topics.validation)
    assert topics.majority_rate == pytest.approx(expected, abs=1e-12)
    assert 0.1 < topics.majority_rate < 0.4


def test_classification_tokens_match_the_tokenizer(topics: PreparedData, bert_tok: Any) -> None:
    raw = builtin_data.load_builtin_dataset("pydoc-topics", seed=0)["validation"]
    for i in (0, 7, 31):
        assert topics.validation[i]["input_ids"] == bert_tok(raw[i]["text"], truncation=True,
                                                              max_length=64)["input_ids"]


def test_collate_pads_to_the_longest(topics: PreparedData, bert_tok: Any) -> None:
    examples = sorted(topics.train[:16], key=lambda e: len(e["input_ids"]))[::5]  # different lengths
    lengths = [len(e["input_ids"]) for e in examples]
    assert len(set(lengths)) > 1
    batch = topics.collate(examples)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].shape == (len(examples), max(lengths))
    assert batch["labels"].shape == (len(examples),) and batch["labels"].dtype == torch.long
    for row, (e, n) in enumerate(zip(examples, lengths, strict=True)):
        assert batch["input_ids"][row, :n].tolist() == e["input_ids"]
        assert (batch["input_ids"][row, n:] == bert_tok.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["token_type_ids"][row, n:] == 0).all()
    assert batch["labels"].tolist() == [e["labels"] for e in examples]
    assert examples[0]["input_ids"] == topics.train[topics.train.index(examples[0])]["input_ids"]  # not mutated


def test_builtin_split_mapping_makes_validation_from_train(bert_tok: Any) -> None:
    raw = builtin_data.load_builtin_dataset("pydoc-topics", seed=0)
    mapped = load_raw_dataset(DataConfig(splits={"test": "validation"}), "classification", seed=0)
    assert texts(mapped, "test") == list(raw["validation"]["text"])
    assert set(texts(mapped, "train")) | set(texts(mapped, "validation")) == set(raw["train"]["text"])
    assert not set(texts(mapped, "train")) & set(texts(mapped, "validation"))
    assert mapped["validation"].num_rows == round(raw["train"].num_rows * 0.1 / 0.9)
    with pytest.raises(LoraError, match="no split 'dev'"):
        load_raw_dataset(DataConfig(splits={"validation": "dev"}), "classification")
    with pytest.raises(LoraError, match="two of our splits"):
        load_raw_dataset(DataConfig(splits={"validation": "test", "test": "test"}), "classification")


def test_names_subsets_are_seeded(lm_tok: Any) -> None:
    cfg = DataConfig(name="pydoc-names", prompt_template=builtin_data.NAMES_PROMPT_TEMPLATE,
                     max_train_samples=40, max_eval_samples=10)
    raw = load_raw_dataset(cfg, "causal-lm", seed=0)
    assert {split: raw[split].num_rows for split in sd.SPLITS} == {"train": 40, "validation": 10, "test": 10}
    assert raw["train"].to_dict() == load_raw_dataset(cfg, "causal-lm", seed=0)["train"].to_dict()
    data = prepare_data(cfg, "causal-lm", lm_tok, seed=0)
    assert data.sizes() == {"train": 40, "validation": 10, "test": 10}
    prompt, expected = data.generation["validation"][0]
    assert prompt.endswith("\nName:") and expected == raw["validation"][0]["completion"]
    assert "train: 40 of" in data.source


# --- local files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet"])
def test_single_file_split_by_fractions(tmp_path: Path, suffix: str) -> None:
    rows = labelled_rows(40)
    cfg = DataConfig(files=write(tmp_path / f"all{suffix}", rows))
    raw = load_raw_dataset(cfg, "classification", seed=0)
    sizes = {split: raw[split].num_rows for split in sd.SPLITS}
    assert sizes == {"train": 32, "validation": 4, "test": 4}
    parts = [set(texts(raw, split)) for split in sd.SPLITS]
    assert set().union(*parts) == {r["text"] for r in rows} and sum(map(len, parts)) == 40
    assert raw["train"].features["label"].names == ["neg", "pos"]
    for split in ("validation", "test"):  # stratified: two of each label
        assert sorted(raw[split]["label"]) == [0, 0, 1, 1]


def test_single_file_is_deterministic_per_seed(tmp_path: Path) -> None:
    cfg = DataConfig(files=write(tmp_path / "all.csv", labelled_rows(60)))
    a, b = load_raw_dataset(cfg, "classification", seed=0), load_raw_dataset(cfg, "classification", seed=0)
    c = load_raw_dataset(cfg, "classification", seed=1)
    assert all(a[s].to_dict() == b[s].to_dict() for s in sd.SPLITS)
    assert texts(a, "validation") != texts(c, "validation")


def test_split_mapping_for_files(tmp_path: Path, bert_tok: Any) -> None:
    train = write(tmp_path / "train.csv", labelled_rows(30))
    dev_rows = labelled_rows(6, prefix="dev")
    dev = write(tmp_path / "dev.jsonl", dev_rows)
    cfg = DataConfig(files={"train": train, "dev": dev}, splits={"validation": "dev"})
    data = prepare_data(cfg, "classification", bert_tok, seed=0)
    raw = load_raw_dataset(cfg, "classification", seed=0)
    assert texts(raw, "validation") == [r["text"] for r in dev_rows]
    assert data.sizes() == {"train": 27, "validation": 6, "test": 3}  # test: 1/9 of train, stratified
    assert "validation <- dev" in data.source and "test 3 rows made from train" in data.source
    assert data.majority_rate == pytest.approx(0.5)
    assert prepare_data(DataConfig(files={"train": train, "dev": dev}), "classification", bert_tok) is data
    with pytest.raises(LoraError, match="heldout, which are not used"):
        prepare_data(DataConfig(files={"train": train, "heldout": dev}), "classification", bert_tok)


def test_labels_int_and_string(tmp_path: Path, bert_tok: Any) -> None:
    ints = write(tmp_path / "ints.csv", labelled_rows(30, labels=(0, 2, 1)))
    data = prepare_data(DataConfig(files=ints), "classification", bert_tok, seed=0)
    assert data.label_names == ["0", "1", "2"] and data.num_labels == 3
    raw = load_raw_dataset(DataConfig(files=ints), "classification", seed=0)
    assert all(f" says {y}" in t for t, y in zip(texts(raw, "train"), raw["train"]["label"], strict=True))

    strings = write(tmp_path / "strings.jsonl", labelled_rows(30, labels=("sport", "art", "news")))
    data = prepare_data(DataConfig(files=strings), "classification", bert_tok, seed=0)
    assert data.label_names == ["art", "news", "sport"]
    raw = load_raw_dataset(DataConfig(files=strings), "classification", seed=0)
    names = raw["train"].features["label"].names
    assert all(t.endswith(names[y]) for t, y in zip(texts(raw, "train"), raw["train"]["label"], strict=True))


def test_unseen_validation_label(tmp_path: Path, bert_tok: Any) -> None:
    cfg = DataConfig(files={"train": write(tmp_path / "t.csv", labelled_rows(20)),
                            "validation": write(tmp_path / "v.csv", labelled_rows(4, labels=("neg", "other")))})
    with pytest.raises(LoraError, match="'other' does not occur in train"):
        prepare_data(cfg, "classification", bert_tok)


def test_column_mapping_and_pairs(tmp_path: Path, bert_tok: Any) -> None:
    rows = [{"body": f"body {i}", "title": f"title {i}", "category": i % 2, "noise": 1.5} for i in range(20)]
    cfg = DataConfig(files=write(tmp_path / "d.parquet", rows),
                     columns={"text": "body", "text_pair": "title", "label": "category"})
    raw = load_raw_dataset(cfg, "classification", seed=0)
    assert raw["train"].column_names == ["text", "text_pair", "label"]
    data = prepare_data(cfg, "classification", bert_tok, seed=0)
    first = raw["train"][0]
    assert data.train[0]["input_ids"] == bert_tok(first["text"], first["text_pair"])["input_ids"]
    assert 1 in data.train[0]["token_type_ids"]  # the pair segment

    sentences = write(tmp_path / "s.csv", [{"sentence": f"s {i}", "label": i % 2} for i in range(20)])
    assert load_raw_dataset(DataConfig(files=sentences), "classification")["train"].column_names == ["text", "label"]


def test_missing_column_error(tmp_path: Path, bert_tok: Any) -> None:
    cfg = DataConfig(files=write(tmp_path / "d.csv", [{"body": "x", "label": 0}, {"body": "y", "label": 1}] * 5))
    with pytest.raises(LoraError) as info:
        prepare_data(cfg, "classification", bert_tok)
    err = info.value
    assert "'text'" in err.message and "role text" in err.message and "body, label" in err.message
    assert err.hint is not None and "data.columns.text" in err.hint
    assert len(str(err).splitlines()) <= 2
    with pytest.raises(LoraError, match="'answer' \\(role completion\\)"):
        load_raw_dataset(DataConfig(files=cfg.files, columns={"prompt": "body", "completion": "answer"}), "causal-lm")
    with pytest.raises(LoraError, match="not a classification role"):
        load_raw_dataset(DataConfig(files=cfg.files, columns={"prompt": "body"}), "classification")


def test_file_errors(tmp_path: Path, bert_tok: Any) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(LoraError, match="does not exist") as info:
        prepare_data(DataConfig(files=str(missing)), "classification", bert_tok)
    assert str(missing) in info.value.message
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(LoraError, match=r"unsupported data file type '\.txt'") as info:
        prepare_data(DataConfig(files=str(tmp_path / "d.txt")), "classification", bert_tok)
    assert ".csv" in (info.value.hint or "")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LoraError, match="could not read data file"):
        load_raw_dataset(DataConfig(files=str(tmp_path / "bad.json")), "classification")
    rows = labelled_rows(10)
    rows[3]["text"] = None
    with pytest.raises(LoraError, match="row 4: column 'text' \\(text\\) is empty"):
        load_raw_dataset(DataConfig(files=write(tmp_path / "holes.jsonl", rows)), "classification")


def test_files_the_arrow_readers_reject(tmp_path: Path) -> None:
    rows = labelled_rows(20)
    rows[7]["label"] = 3  # a column mixing strings and integers: read by our own reader, then refused
    with pytest.raises(LoraError, match="the labels mix integers and strings"):
        load_raw_dataset(DataConfig(files=write(tmp_path / "mixed.jsonl", rows)), "classification")
    rows = labelled_rows(20)
    rows[7]["text"] = 7
    with pytest.raises(LoraError, match="column 'text' \\(text\\) holds int values, not text"):
        load_raw_dataset(DataConfig(files=write(tmp_path / "mixed.jsonl", rows)), "classification")
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": 1}\n{"text": oops}\n')
    with pytest.raises(LoraError, match=r"broken\.jsonl, line 2: not valid JSON"):
        load_raw_dataset(DataConfig(files=str(tmp_path / "broken.jsonl")), "classification")
    columns = {"text": [r["text"] for r in labelled_rows(20)], "label": [r["label"] for r in labelled_rows(20)]}
    (tmp_path / "columns.json").write_text(json.dumps(columns))  # an object of column lists
    assert load_raw_dataset(DataConfig(files=str(tmp_path / "columns.json")), "classification").num_rows == \
        {"train": 16, "validation": 2, "test": 2}


def test_splits_are_sequences_over_arrow(tmp_path: Path, bert_tok: Any) -> None:
    import pickle

    data = prepare_data(DataConfig(files=write(tmp_path / "d.jsonl", labelled_rows(40))), "classification",
                        bert_tok, seed=0)
    train = data.train
    assert isinstance(train, sd.ExampleRows) and train.dataset.cache_files  # memory-mapped from the cache
    listed = list(train)
    assert len(train) == len(listed) == 32 and train == listed and train[-1] == listed[-1]
    assert train[3:7] == listed[3:7] and train[::5] == listed[::5]
    assert train.lengths() == [len(e["input_ids"]) for e in listed]
    train[0]["input_ids"].append(0)  # each read is a fresh copy
    assert train[0] == listed[0]
    with pytest.raises(IndexError):
        train[32]
    again = pickle.loads(pickle.dumps(data))
    assert again.train == train and again.validation == data.validation and again.sizes() == data.sizes()


def test_hub_failure_is_a_lora_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LoraError) as info:
        load_raw_dataset(DataConfig(name="no-such-org/no-such-dataset-3141"), "classification")
    assert "no-such-org/no-such-dataset-3141" in info.value.message
    assert len(info.value.message.splitlines()) == 1
    assert "pydoc-topics" in (info.value.hint or "") and "pydoc-names" in (info.value.hint or "")
    with pytest.raises(LoraError) as info:
        load_raw_dataset(DataConfig(name="pydoc-topic"), "classification")
    assert "did you mean the built-in 'pydoc-topics'" in (info.value.hint or "")


# --- caching -------------------------------------------------------------------------------------


def test_memory_cache_returns_the_same_object(tmp_path: Path, bert_tok: Any) -> None:
    cfg = DataConfig(files=write(tmp_path / "d.csv", labelled_rows(30)))
    first = prepare_data(cfg, "classification", bert_tok, seed=0)
    assert prepare_data(cfg, "classification", bert_tok, seed=0) is first
    assert prepare_data(DataConfig(files=cfg.files), "classification", bert_tok, seed=0) is first
    other = prepare_data(cfg, "classification", bert_tok, seed=1)
    assert other is not first and other.fingerprint != first.fingerprint


def test_disk_cache_is_used(tmp_path: Path, bert_tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DataConfig(files=write(tmp_path / "d.csv", labelled_rows(30)))
    first = prepare_data(cfg, "classification", bert_tok, seed=0)
    assert tokenized_cache_dir() == tmp_path / "cache" / "tokenized"
    cached = tokenized_cache_dir() / first.fingerprint
    assert cached.is_dir() and [p.name for p in cached.parent.iterdir()] == [cached.name]  # no temp files
    assert sorted(p.name for p in cached.iterdir()) == ["meta.json", "test.arrow", "train.arrow", "validation.arrow"]

    clear_memory_cache()

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("tokenized again despite the disk cache")

    with monkeypatch.context() as patch:
        patch.setattr(sd, "_tokenize", fail)
        again = prepare_data(cfg, "classification", bert_tok, seed=0)
    assert again is not first and again.fingerprint == first.fingerprint
    assert (again.train, again.validation, again.test) == (first.train, first.validation, first.test)
    assert (again.label_names, again.majority_rate, again.source) == (first.label_names, first.majority_rate,
                                                                      first.source)

    (cached / "meta.json").write_text("{corrupt")  # a damaged entry is rebuilt, not trusted
    clear_memory_cache()
    assert prepare_data(cfg, "classification", bert_tok, seed=0).train == first.train
    assert json.loads((cached / "meta.json").read_text())["fingerprint"] == first.fingerprint


def test_fingerprint_follows_data_and_settings(tmp_path: Path, bert_tok: Any) -> None:
    path = tmp_path / "d.csv"
    cfg = DataConfig(files=write(path, labelled_rows(30)))
    base = prepare_data(cfg, "classification", bert_tok, seed=0)
    assert prepare_data(DataConfig(files=cfg.files, max_length=8), "classification", bert_tok).fingerprint \
        != base.fingerprint
    write(path, labelled_rows(30, prefix="edited"))
    edited = prepare_data(cfg, "classification", bert_tok, seed=0)
    assert edited.fingerprint != base.fingerprint
    assert edited.train[0]["input_ids"] != base.train[0]["input_ids"]
