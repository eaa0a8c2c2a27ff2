"""A data set's columns before it is read in full, and the column mapping proposed for a task
(for ``lora-sweep init``).

    >>> found = peek_data("train.jsonl")                  # DataPeek(kind='file', columns=('prompt', 'completion'), ...)
    >>> propose_columns(found, "causal-lm")               # {'prompt': 'prompt', 'completion': 'completion'}

Nothing is written: local files are read with the plain parsers (a csv/tsv header, the first JSON
records, a parquet schema), not copied into the Arrow cache as `sweeps.data.sources` does for training;
the built-in data sets' columns are known; a hub data set's come from its metadata (network).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lora_core import LoraError
from sweeps.data.builtin import builtin_dataset_names
from sweeps.data.sources import FILE_TYPES, ROLES
from sweeps.text import first_line

__all__ = ["DataPeek", "peek_data", "propose_columns", "task_from_columns"]

BUILTIN_COLUMNS: Mapping[str, tuple[tuple[str, ...], str]] = {  # name -> (columns, task); see sweeps.data.builtin
    "pydoc-topics": (("text", "label"), "classification"),
    "pydoc-names": (("prompt", "completion"), "causal-lm"),
}
_PEEK_RECORDS = 200  # JSON records whose keys make the column list

# Column names that usually hold a role, most likely first (``text``/``label``, ``prompt``/``completion``
# are the trial config's defaults). Pairs of text columns become text + text_pair.
_CANDIDATES: Mapping[str, tuple[str, ...]] = {
    "text": ("text", "sentence", "content", "document", "review", "body", "input", "question", "utterance",
             "sentence1", "premise"),
    "label": ("label", "labels", "class", "category", "target", "topic", "intent", "sentiment", "y"),
    "prompt": ("prompt", "instruction", "question", "input", "query", "source", "context"),
    "completion": ("completion", "response", "output", "answer", "target", "reply"),
}
_TEXT_PAIRS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question1", "question2"),
               ("question", "sentence"), ("text", "text_pair"))


@dataclass(frozen=True)
class DataPeek:
    """A data source as ``lora-sweep init`` writes it into ``data``: a built-in name, a file or a hub id."""

    kind: Literal["builtin", "file", "hub"]
    source: str
    columns: tuple[str, ...]
    where: str                       # "built-in data set pydoc-topics", "file data.jsonl", "hub data set imdb"
    task: str | None = None          # the task a built-in data set is made for
    config: str | None = None        # a hub data set's configuration


def peek_data(source: str, config: str | None = None) -> DataPeek:
    """The columns of ``source``: a built-in data set, a local csv/tsv/json/jsonl/parquet file, or a hub id.

    Raises:
        LoraError: a file that does not exist, is not a supported type, or has no columns; a hub data
            set that cannot be reached.
    """
    if source in BUILTIN_COLUMNS and not Path(source).exists():
        columns, task = BUILTIN_COLUMNS[source]
        return DataPeek("builtin", source, columns, f"built-in data set {source}", task)
    path = Path(source).expanduser()
    if path.exists() or path.suffix.lower() in FILE_TYPES or _looks_like_path(source):
        return DataPeek("file", source, _file_columns(path, source), f"file {source}")
    return DataPeek("hub", source, _hub_columns(source, config), f"hub data set {source}"
                    + (f"/{config}" if config else ""), config=config)


def task_from_columns(columns: tuple[str, ...] | list[str]) -> str | None:
    """classification when there is a label-like column and no completion-like one; causal-lm for a
    prompt-like and a completion-like column and no label; else None (ambiguous or unknown)."""
    label = _first(columns, "label") is not None
    pair = _first(columns, "prompt") is not None and _first(columns, "completion", exclude=("target",)) is not None
    if label and not pair:
        return "classification"
    if pair and not label:
        return "causal-lm"
    return None


def propose_columns(found: DataPeek, task: str, given: Mapping[str, str] | None = None) -> dict[str, str]:
    """Role -> column for ``task``: the columns ``given`` (checked), then the likely names.

    Raises:
        LoraError: a given role that the task does not have or a column the data lacks; a role no
            column could be found for (one line, listing the columns).
    """
    given = dict(given or {})
    available = list(found.columns)
    for role, column in given.items():
        if role not in ROLES[task]:
            raise LoraError(f"--column {role}={column}: {role!r} is not a {task} role",
                            hint=f"{task} roles are: {', '.join(ROLES[task])}")
        if column not in available:
            raise LoraError(f"--column {role}={column}: {found.where} has no column {column!r}; "
                            f"columns: {', '.join(available)}")
    out: dict[str, str] = {}
    if task == "classification":
        if "text" not in given and "text_pair" not in given:
            for first, second in _TEXT_PAIRS:
                if first in available and second in available:
                    out.update(text=first, text_pair=second)
                    break
        out.update(given)
        needed: tuple[str, ...] = ("text", "label")
    else:
        out.update(given)
        needed = ("prompt", "completion")
    for role in needed:
        if role not in out:
            guess = _first(available, role, taken=set(out.values()))
            if guess is not None:
                out[role] = guess
    missing = [role for role in needed if role not in out]
    if missing:
        role = missing[0]
        extra = (" (causal-lm trains on prompt/completion pairs; plain text is not supported)"
                 if task == "causal-lm" and set(available) & {"text", "content"} else "")
        raise LoraError(f"{found.where} has no {role} column for {task}{extra}; columns: {', '.join(available) or 'none'}",
                        hint=f"name it with --column {role}=COLUMN, or pass --task if the task is wrong")
    return {role: out[role] for role in ROLES[task] if role in out}


# ----------------------------------------------------------------------------------------------
# internals


def _first(columns: tuple[str, ...] | list[str], role: str, taken: set[str] | None = None,
           exclude: tuple[str, ...] = ()) -> str | None:
    lowered = {c.lower(): c for c in reversed(columns)}
    for name in _CANDIDATES[role]:
        if name in lowered and name not in exclude and lowered[name] not in (taken or set()):
            return lowered[name]
    return None


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..") or name.count("/") > 1 or (
        os.sep != "/" and os.sep in name)


def _file_columns(path: Path, source: str) -> tuple[str, ...]:
    suffix = path.suffix.lower()
    if not path.exists():
        raise LoraError(f"data file {source} does not exist",
                        hint=f"check the path (relative paths start at {Path.cwd()}), or use a built-in data "
                             f"set: {', '.join(builtin_dataset_names())}")
    if not path.is_file():
        raise LoraError(f"data path {source} is not a file", hint=f"pass one {', '.join(FILE_TYPES)} file")
    if suffix not in FILE_TYPES:
        raise LoraError(f"unsupported data file type {suffix or '(no extension)'!r}: {source}",
                        hint=f"use one of: {', '.join(FILE_TYPES)}")
    try:
        columns = _read_columns(path, suffix)
    except LoraError:
        raise
    except Exception as exc:  # the parser's own error: a malformed file
        raise LoraError(f"could not read data file {source}: {first_line(exc, 200)}",
                        hint=f"check that it is valid {suffix[1:]}") from None
    if not columns:
        raise LoraError(f"data file {source} has no columns (is it empty?)",
                        hint="it needs a header (csv) or records with named fields (json)")
    return columns


def _read_columns(path: Path, suffix: str) -> tuple[str, ...]:
    if suffix in (".csv", ".tsv"):
        import pandas as pd

        header = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", nrows=0)
        return tuple(str(c) for c in header.columns)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return tuple(pq.read_schema(path).names)
    keys: dict[str, None] = {}
    if suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":
                raise
        else:
            if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
                return tuple(str(k) for k in data)
            if not isinstance(data, list):
                raise LoraError(f"data file {path} must hold a list of objects, an object of column lists, "
                                "or JSON lines")
            for record in data[:_PEEK_RECORDS]:
                keys.update(dict.fromkeys(str(k) for k in record) if isinstance(record, dict) else {})
            return tuple(keys)
    with path.open(encoding="utf-8") as f:
        seen = 0
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LoraError(f"data file {path}, line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise LoraError(f"data file {path}, line {number}: a {type(record).__name__}, not an object")
            keys.update(dict.fromkeys(str(k) for k in record))
            seen += 1
            if seen >= _PEEK_RECORDS:
                break
    return tuple(keys)


def _hub_columns(name: str, config: str | None) -> tuple[str, ...]:
    """The columns of a hub data set from its metadata, else from its first streamed row (network)."""
    try:
        import datasets

        builder = datasets.load_dataset_builder(name, config)
        features = builder.info.features
        if features is not None:
            return tuple(features)
        stream = datasets.load_dataset(name, config, split="train", streaming=True)
        return tuple(next(iter(stream)))
    except Exception as exc:  # no network, unknown name, a config needed, gated data set, ...
        raise LoraError(f"could not read data set {name!r} from the Hugging Face Hub: {first_line(exc, 200)}",
                        hint="check the id (and --data-config) and the network, or pass a local csv/jsonl/"
                             f"json/parquet file or a built-in data set: {', '.join(builtin_dataset_names())}"
                        ) from None
