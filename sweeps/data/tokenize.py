"""Tokenising: prompt texts from the templates, and each split tokenised by a batched
:meth:`datasets.Dataset.map` straight into an Arrow file (one per split), never into Python lists.

Columns written: ``input_ids`` (uint16 when the vocabulary fits, else int32), ``labels`` (a class id,
int64; or token ids with -100 on the prompt, int32), ``token_type_ids`` (int8, when the tokenizer
gives them) and, for causal LM, ``prompt_text`` and ``completion_text`` (the generation pairs).
"""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lora_core import LoraError
from sweeps.config.trial import DataConfig
from sweeps.data.arrow import RoleSplit, dataset_of, quiet_datasets, release_arrow_memory
from sweeps.data.sources import SPLITS
from sweeps.data.splits import RawSplits

__all__ = ["EXAMPLE_COLUMNS", "GENERATION_COLUMNS", "check_template", "prompt_text", "tokenize_splits"]

EXAMPLE_COLUMNS: tuple[str, ...] = ("input_ids", "labels", "token_type_ids")
GENERATION_COLUMNS: tuple[str, str] = ("prompt_text", "completion_text")
_BATCH = 1000  # rows per tokenizer call and per Arrow record batch

Batch = dict[str, list[Any]]
Encode = Callable[[dict[str, list[str]]], Batch]  # role columns of some rows -> their output columns


def tokenize_splits(raw: RawSplits, cfg: DataConfig, task: str, tokenizer: Any, folder: Path,
                    fingerprint: str) -> None:
    """Write ``<folder>/<split>.arrow`` for the three splits of ``raw`` (``fingerprint`` names the
    result for ``datasets``).

    Raises :class:`lora_core.LoraError` for a bad prompt template, or a tokenizer without eos (or
    without the chat template that ``data.chat_template`` asks for).
    """
    from datasets import Features, List, Value

    ids = Value("uint16") if len(tokenizer) <= 1 << 16 else Value("int32")
    encode: Encode
    if task == "classification":
        columns: dict[str, Any] = {"input_ids": List(ids), "labels": Value("int64")}
        pairs = "text_pair" in raw.splits["train"].table.column_names
        if "token_type_ids" in tokenizer(["a"], ["b"] if pairs else None):
            columns["token_type_ids"] = List(Value("int8"))
        encode = _classification_fn(tokenizer, cfg.max_length, "token_type_ids" in columns)
    else:
        eos = _check_causal(cfg, tokenizer)
        columns = {"input_ids": List(ids), "labels": List(Value("int32")),
                   GENERATION_COLUMNS[0]: Value("string"), GENERATION_COLUMNS[1]: Value("string")}
        encode = _causal_fn(tokenizer, eos, cfg)
    features = Features(columns)
    for split in SPLITS:
        part = raw.splits[split]
        source = dataset_of(part.table).with_format("arrow")
        # Each call gets a window of the source holding about _BATCH rows of this split.
        window = max(_BATCH, -(-_BATCH * part.table.num_rows // max(len(part), 1)))
        with quiet_datasets():
            source.map(_select_then(encode, part, list(columns)), batched=True, batch_size=window, with_indices=True,
                       remove_columns=part.table.column_names, features=features,
                       cache_file_name=str(folder / f"{split}.arrow"), load_from_cache_file=False,
                       writer_batch_size=_BATCH, new_fingerprint=f"{fingerprint[:40]}-{split}")
        release_arrow_memory()


def _select_then(encode: Encode, part: RoleSplit,
                 names: list[str]) -> Callable[[pa.Table, list[int]], Batch]:
    """A map function over a window of the source table (rows ``source_rows``): this split's rows of
    it, as Python text columns, passed to ``encode``; class labels added by position in the split.
    A window without any of them gives empty ``names`` columns."""
    chosen = part.indices

    def fn(window: pa.Table, source_rows: list[int]) -> Batch:
        if chosen is None:
            positions = source_rows
        else:
            first, end = (int(i) for i in np.searchsorted(chosen, [source_rows[0], source_rows[-1] + 1]))
            window = window.take(pa.array(chosen[first:end] - source_rows[0]))
            positions = list(range(first, end))
        if not positions:
            return {name: [] for name in names}
        texts = {name: window.column(name).to_pylist() for name in window.column_names}
        out = encode(texts)
        if part.labels is not None:
            out["labels"] = [part.labels[i] for i in positions]
        return out

    return fn


def _classification_fn(tokenizer: Any, max_length: int,
                       types: bool) -> Encode:
    def fn(batch: dict[str, list[str]]) -> Batch:
        enc = tokenizer(batch["text"], batch.get("text_pair"), truncation=True, max_length=max_length)
        out: Batch = {"input_ids": enc["input_ids"]}
        if types:
            out["token_type_ids"] = enc["token_type_ids"]
        return out

    return fn


def _causal_fn(tokenizer: Any, eos: int, cfg: DataConfig) -> Encode:
    """Prompt tokens (special tokens added unless the chat template holds them), then the completion's
    and eos; labels -100 on the prompt. Too long: prompt tokens go from the left first, then the
    completion's end."""
    limit = cfg.max_length

    def fn(batch: dict[str, list[str]]) -> Batch:
        texts = [prompt_text(p, cfg, tokenizer) for p in batch["prompt"]]
        completions = batch["completion"]
        targets = [c if cfg.chat_template or not c or c[0].isspace() or not t or t[-1].isspace() else " " + c
                   for t, c in zip(texts, completions, strict=True)]
        prompt_ids = tokenizer(texts, add_special_tokens=not cfg.chat_template, verbose=False)["input_ids"]
        target_ids = tokenizer(targets, add_special_tokens=False, verbose=False)["input_ids"]
        input_ids, labels = [], []
        for p, c in zip(prompt_ids, target_ids, strict=True):
            tail = ([*c, eos])[:limit]
            room = limit - len(tail)
            head = list(p[max(0, len(p) - room):]) if room > 0 else []
            input_ids.append(head + tail)
            labels.append([-100] * len(head) + tail)
        return {"input_ids": input_ids, "labels": labels, GENERATION_COLUMNS[0]: texts,
                GENERATION_COLUMNS[1]: [c.strip() for c in completions]}

    return fn


def prompt_text(prompt: str, cfg: DataConfig, tokenizer: Any) -> str:
    """The prompt as the model sees it: ``prompt_template`` filled in, inside the chat template when
    ``chat_template`` is true."""
    text = cfg.prompt_template.format(prompt=prompt)
    if not cfg.chat_template:
        return text
    chat: str = tokenizer.apply_chat_template([{"role": "user", "content": text.strip()}],
                                              add_generation_prompt=True, tokenize=False)
    return chat


def _check_causal(cfg: DataConfig, tokenizer: Any) -> int:
    """The eos id, after checking the template and that the tokenizer can serve ``cfg``."""
    check_template(cfg.prompt_template)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise LoraError(f"the tokenizer {_tokenizer_name(tokenizer)} has no eos token, which causal-lm "
                        "examples end with", hint="use a causal language model's tokenizer")
    if cfg.chat_template and not getattr(tokenizer, "chat_template", None):
        raise LoraError(f"data.chat_template is true but the tokenizer {_tokenizer_name(tokenizer)} has no chat "
                        "template", hint="set data.chat_template: false (data.prompt_template formats the "
                        "prompt), or use an instruction-tuned model")
    return int(eos)


def check_template(template: str) -> None:
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        fields = {f"<{exc}>"}
    if fields != {"prompt"}:
        raise LoraError(f"data.prompt_template {template!r} must use the field {{prompt}} and no other",
                        hint="e.g. '{prompt}\\nAnswer:'; write literal braces as {{ and }}")


def _tokenizer_name(tokenizer: Any) -> str:
    return repr(getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__)
