"""Tokenized data for causal LMs: prompt and completion, labels masking the prompt, truncation that keeps
the completion, chat templates, and their configuration errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support import write_rows as write

from lora_core import LoraError
from sweeps.config.trial import DataConfig
from sweeps.data import prepare as sd
from sweeps.data.prepare import load_raw_dataset, prepare_data

pytestmark = pytest.mark.usefixtures("fresh_data_caches")


def qa_rows(n: int) -> list[dict[str, str]]:
    return [{"prompt": f"What is {i} plus {i}?", "completion": str(2 * i)} for i in range(n)]


def test_causal_labels_mask_the_prompt(tmp_path: Path, lm_tok: Any) -> None:
    cfg = DataConfig(files=write(tmp_path / "qa.jsonl", qa_rows(20)), prompt_template="Q: {prompt}\nA:")
    data = prepare_data(cfg, "causal-lm", lm_tok, seed=0)
    raw = load_raw_dataset(cfg, "causal-lm", seed=0)
    assert data.label_names is None and data.num_labels is None and data.majority_rate is None
    eos = lm_tok.eos_token_id
    for split in sd.SPLITS:
        rows = raw[split].to_dict()
        assert data.generation[split] == [(f"Q: {p}\nA:", c) for p, c in zip(rows["prompt"], rows["completion"],
                                                                               strict=True)]
        for example, prompt, completion in zip(getattr(data, split), rows["prompt"], rows["completion"], strict=True):
            p = lm_tok(f"Q: {prompt}\nA:")["input_ids"]
            c = lm_tok(" " + completion, add_special_tokens=False)["input_ids"]  # space added after "A:"
            assert example["input_ids"] == p + c + [eos]
            assert example["labels"] == [-100] * len(p) + c + [eos]
    batch = data.collate(data.train[:5])
    width = batch["input_ids"].shape[1]
    for row, e in enumerate(data.train[:5]):
        n = len(e["input_ids"])
        assert batch["labels"][row].tolist() == e["labels"] + [-100] * (width - n)
        assert batch["input_ids"][row, n:].eq(lm_tok.pad_token_id).all()
        assert batch["attention_mask"][row].sum() == n
    assert "token_type_ids" not in batch


def test_no_space_added_after_whitespace(tmp_path: Path, lm_tok: Any) -> None:
    cfg = DataConfig(files=write(tmp_path / "qa.jsonl", qa_rows(10)))  # default template "{prompt}\n"
    data = prepare_data(cfg, "causal-lm", lm_tok, seed=0)
    prompt, completion = data.generation["train"][0]
    assert prompt.endswith("?\n")
    p = lm_tok(prompt)["input_ids"]
    c = lm_tok(completion, add_special_tokens=False)["input_ids"]
    assert data.train[0]["input_ids"] == p + c + [lm_tok.eos_token_id]


def test_truncation_keeps_the_completion(tmp_path: Path, lm_tok: Any) -> None:
    long_prompt = " ".join(f"word{i}" for i in range(60))
    rows = [{"prompt": long_prompt, "completion": "the answer"}] * 10
    cfg = DataConfig(files=write(tmp_path / "long.jsonl", rows), max_length=16)
    data = prepare_data(cfg, "causal-lm", lm_tok, seed=0)
    p = lm_tok(long_prompt + "\n")["input_ids"]
    c = lm_tok("the answer", add_special_tokens=False)["input_ids"]
    kept = 16 - len(c) - 1
    assert data.train[0]["input_ids"] == p[-kept:] + c + [lm_tok.eos_token_id]
    assert data.train[0]["labels"] == [-100] * kept + c + [lm_tok.eos_token_id]

    huge = " ".join(f"token{i}" for i in range(40))
    cfg = DataConfig(files=write(tmp_path / "huge.jsonl", [{"prompt": "q", "completion": huge}] * 10), max_length=8)
    example = prepare_data(cfg, "causal-lm", lm_tok, seed=0).train[0]
    c = lm_tok(huge, add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == c[:8] and example["labels"] == c[:8]


def test_chat_template(tmp_path: Path, lm_tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    assert lm_tok.chat_template
    files = write(tmp_path / "qa.jsonl", qa_rows(10))
    data = prepare_data(DataConfig(files=files, chat_template=True), "causal-lm", lm_tok, seed=0)
    raw = load_raw_dataset(DataConfig(files=files), "causal-lm", seed=0)
    prompt, completion = raw["train"][0]["prompt"], raw["train"][0]["completion"]
    text = lm_tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=False)
    assert data.generation["train"][0] == (text, completion)
    p = lm_tok(text, add_special_tokens=False)["input_ids"]
    c = lm_tok(completion, add_special_tokens=False)["input_ids"]
    assert data.train[0]["input_ids"] == p + c + [lm_tok.eos_token_id]
    assert data.train[0]["labels"] == [-100] * len(p) + c + [lm_tok.eos_token_id]

    with monkeypatch.context() as patch, pytest.raises(LoraError, match="no chat template"):
        patch.setattr(lm_tok, "chat_template", None)
        prepare_data(DataConfig(files=files, chat_template=True), "causal-lm", lm_tok)
    assert lm_tok.chat_template


def test_causal_config_errors(tmp_path: Path, lm_tok: Any, bert_tok: Any) -> None:
    files = write(tmp_path / "qa.jsonl", qa_rows(10))
    with pytest.raises(LoraError, match="prompt_template"):
        prepare_data(DataConfig(files=files, prompt_template="{question}\n"), "causal-lm", lm_tok)
    if bert_tok.eos_token_id is None:
        with pytest.raises(LoraError, match="no eos token"):
            prepare_data(DataConfig(files=files), "causal-lm", bert_tok)
    with pytest.raises(LoraError, match="unknown task"):
        prepare_data(DataConfig(files=files), "regression", lm_tok)


