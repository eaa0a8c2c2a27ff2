"""Sources: read local files, a built-in data set or a hub data set into source splits, choose which of
them become train/validation/test, and take each role's column out of them, checked.

Local files are read by :func:`datasets.load_dataset` (``csv`` for ``.csv``/``.tsv`` with every column
read as text, ``json`` for JSON lines, ``parquet``) into an Arrow copy under ``<cache>/datasets``, which
is memory-mapped, not held in Python lists; the copy is reused while the file's path, size and mtime stay
the same. A ``.json`` file that holds one document (an array of objects or an object of column lists)
is parsed by our own reader (an array of objects is first streamed into JSON lines, `sweeps.data.jsonfile`:
no file is read whole), and so is any file the Arrow readers reject (a column mixing integers and
strings, a malformed line): that reader gives the precise error messages, or the rows when the file is
valid after all. Text columns stay in Arrow; only the label column becomes a Python list. The copies are
pruned by age and total size (`sweeps.data.dscache`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from lora_core import LoraError
from sweeps.data.arrow import RoleSplit, arrow_table, quiet_datasets, release_arrow_memory
from sweeps.data.builtin import builtin_dataset_names, load_builtin_dataset
from sweeps.data.dscache import prune_datasets_cache
from sweeps.data.jsonfile import (
    MAX_DOCUMENT_BYTES,
    NotAnArray,
    array_to_lines,
    iter_json_lines,
    starts_with_array,
)
from sweeps.models.builtin import default_cache_dir
from sweeps.text import first_line

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "validation", "test")
ROLES: Mapping[str, tuple[str, ...]] = {
    "classification": ("text", "text_pair", "label"),
    "causal-lm": ("prompt", "completion"),
}
FILE_TYPES: tuple[str, ...] = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
_OPTIONAL_ROLES = frozenset({"text_pair"})
_DEFAULT_SOURCE_SPLITS: Mapping[str, tuple[str, ...]] = {
    "train": ("train",),
    "validation": ("validation", "valid", "dev"),
    "test": ("test",),
}
_INT_TEXT = re.compile(r"-?[0-9]+")

Table = dict[str, list[Any]]  # column -> values: a file read by our own reader


@dataclass(frozen=True)
class SourceSplit:
    """One split of a source, before the column mapping: Arrow rows or (our reader) a Python table.
    ``untyped``: every value is text (csv, tsv); ``from_file``: label names in the file's metadata are
    not used (a local file's labels are ids or names, as they are written)."""

    rows: Dataset | Table
    untyped: bool = False
    from_file: bool = False


def check_task(task: str) -> None:
    if task not in ROLES:
        raise LoraError(f"unknown task {task!r}", hint=f"use one of: {', '.join(ROLES)}")


# ----------------------------------------------------------------------------------------------
# built-in and hub data sets


def load_builtin(name: str, seed: int) -> dict[str, SourceSplit]:
    return {split: SourceSplit(ds) for split, ds in load_builtin_dataset(name, seed).items()}


def load_hub(name: str, config: str | None) -> dict[str, SourceSplit]:
    try:
        import datasets

        loaded = datasets.load_dataset(name, config)
    except Exception as exc:  # no network, unknown name, missing config, gated data set, ...
        close = difflib.get_close_matches(name, builtin_dataset_names(), n=1)
        suggestion = f"did you mean the built-in {close[0]!r}? " if close else ""
        raise LoraError(
            f"could not load data set {name!r} from the Hugging Face Hub: {first_line(exc, 200)}",
            hint=f"{suggestion}check the name and the network, or use local files (data.files) or a built-in "
            f"data set: {', '.join(builtin_dataset_names())}",
        ) from exc
    if not isinstance(loaded, Mapping):
        return {"train": SourceSplit(loaded)}
    return {str(split): SourceSplit(ds) for split, ds in loaded.items()}


# ----------------------------------------------------------------------------------------------
# local files


def read_files(files: str | dict[str, str]) -> tuple[dict[str, SourceSplit], str]:
    """The source splits of ``data.files`` (one path: all of train) and their description."""
    if isinstance(files, str):
        return {"train": read_file(files)}, f"file {files}"
    if not files:
        raise LoraError("data.files is an empty mapping", hint="e.g. data.files: {train: train.csv, test: test.csv}")
    splits = {split: read_file(path) for split, path in files.items()}
    return splits, "files " + ", ".join(f"{split}={path}" for split, path in files.items())


def read_file(name: str) -> SourceSplit:
    path = Path(name).expanduser()
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise LoraError(f"unsupported data file type {suffix or '(no extension)'!r}: {name}",
                        hint=f"use one of: {', '.join(FILE_TYPES)}")
    if not path.is_file():
        raise LoraError(f"data file {name} does not exist" if not path.exists() else f"data file {name} is not a file",
                        hint=f"check data.files (relative paths start at the working directory {Path.cwd()})")
    untyped = suffix in (".csv", ".tsv")
    if suffix == ".json" and not _holds_json_lines(path) and starts_with_array(path):
        path, suffix = _streamed_lines(path), ".jsonl"  # an array of objects, as JSON lines: never read whole
    if suffix != ".json" or _holds_json_lines(path):
        try:
            return SourceSplit(_load_with_datasets(path, suffix), untyped=untyped, from_file=True)
        except Exception as exc:  # rejected by the Arrow readers: our reader explains why, or reads it
            logger.info("reading %s with the fallback reader: %s", name, first_line(exc, 200))
    try:
        return SourceSplit(_read_python(path, suffix), untyped=untyped, from_file=True)
    except LoraError:
        raise
    except Exception as exc:  # a parser's own error: malformed file
        raise LoraError(f"could not read data file {name}: {first_line(exc, 200)}",
                        hint=f"check that it is valid {suffix[1:]}") from exc


def _holds_json_lines(path: Path) -> bool:
    """Whether a ``.json`` file is JSON lines: its first line is an object on its own and something
    follows (a whole-document parse would stop there with "Extra data")."""
    with path.open("rb") as f:
        line = f.readline()
        while line and not line.strip():
            line = f.readline()
        try:
            first = json.loads(line)
        except ValueError:
            return False
        if not isinstance(first, dict):
            return False
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return True
    return False


def _file_key(path: Path) -> str:
    """A file's cache key: its absolute path, size and modification time."""
    resolved = path.resolve()
    stat = resolved.stat()
    return hashlib.sha256(f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def _streamed_lines(path: Path) -> Path:
    """The JSON lines copy of a ``.json`` array under ``<cache>/datasets`` (made once per file version)."""
    out = default_cache_dir() / "datasets" / f"json-{_file_key(path)}.jsonl"
    if not out.is_file():
        try:
            array_to_lines(path, out)
        except NotAnArray:  # (checked before) the file changed meanwhile
            raise LoraError(f"data file {path} changed while it was read", hint="read it again") from None
    return out


def _load_with_datasets(path: Path, suffix: str) -> Dataset:
    import datasets

    resolved = path.resolve()
    key = _file_key(resolved)
    prune_datasets_cache(default_cache_dir() / "datasets", keep={key, f"json-{key}.jsonl"})
    options: dict[str, Any] = {}
    if suffix in (".csv", ".tsv"):
        import pandas as pd

        sep = "\t" if suffix == ".tsv" else ","
        header = pd.read_csv(resolved, sep=sep, nrows=0).columns
        options = {"sep": sep, "keep_default_na": False, "na_values": [""],
                   "features": datasets.Features({str(c): datasets.Value("string") for c in header})}
        builder = "csv"
    elif suffix == ".parquet":
        builder = "parquet"
    else:
        builder = "json"
        options = {"on_mixed_types": None, "parse_agent_traces": False}
    with quiet_datasets():
        loaded = datasets.load_dataset(builder, data_files=str(resolved), split="train",
                                       cache_dir=str(default_cache_dir() / "datasets" / key), **options)
    assert isinstance(loaded, datasets.Dataset)
    release_arrow_memory()
    return loaded


def _read_python(path: Path, suffix: str) -> Table:
    if suffix in (".csv", ".tsv"):
        import pandas as pd

        frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False,
                            na_values=[""])
        return {str(c): frame[c].tolist() for c in frame.columns}
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table: Table = pq.read_table(path).to_pydict()
        return table
    return _read_json(path, lines=suffix == ".jsonl")


def _read_json(path: Path, lines: bool) -> Table:
    if not lines:
        size = path.stat().st_size
        if size > MAX_DOCUMENT_BYTES:
            raise LoraError(f"data file {path} is one JSON document of {size / 2**20:,.0f} MiB (read whole up to "
                            f"{MAX_DOCUMENT_BYTES >> 20} MiB)",
                            hint="write it as JSON lines (.jsonl, one object per line) or an array of objects")
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":
                raise
            lines = True  # several JSON values: JSON lines in a .json file
        else:
            if isinstance(data, list):
                return _records_to_table(data, path)
            if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
                if len({len(v) for v in data.values()}) != 1:
                    raise LoraError(f"data file {path}: its column lists have different lengths")
                return {str(k): v for k, v in data.items()}
            raise LoraError(f"data file {path} must hold a list of objects, an object of column lists, or JSON lines")
    return _records_to_table([value for _, value in iter_json_lines(path)], path)


def _records_to_table(records: list[Any], path: Path) -> Table:
    columns: dict[str, None] = {}
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise LoraError(f"data file {path}: record {i + 1} is a {type(record).__name__}, not an object")
        columns.update(dict.fromkeys(record))
    return {str(c): [record.get(c) for record in records] for c in columns}


# ----------------------------------------------------------------------------------------------
# splits and columns


def choose_splits(available: Mapping[str, Any], mapping: dict[str, str], where: str) -> dict[str, str]:
    """Our split name -> the source's, for the splits the source has (train is required)."""
    listing = ", ".join(available) or "none"
    for ours in mapping:
        if ours not in SPLITS:
            raise LoraError(f"data.splits.{ours}: unknown split {ours!r}", hint="our splits are train, validation, test")
    claimed = Counter(mapping.values())
    twice = [theirs for theirs, n in claimed.items() if n > 1]
    if twice:
        raise LoraError(f"data.splits uses the source split {twice[0]!r} for two of our splits",
                        hint="each of train, validation and test needs its own rows (missing ones are made from train)")
    chosen: dict[str, str] = {}
    for ours in SPLITS:
        if ours in mapping:
            if mapping[ours] not in available:
                raise LoraError(f"data.splits.{ours}: {where} has no split {mapping[ours]!r}",
                                hint=f"its splits are: {listing}")
            chosen[ours] = mapping[ours]
            continue
        for candidate in _DEFAULT_SOURCE_SPLITS[ours]:
            if candidate in available and candidate not in claimed and candidate not in chosen.values():
                chosen[ours] = candidate
                break
    if "train" not in chosen:
        raise LoraError(f"{where} has no train split (its splits: {listing})",
                        hint="map one with data.splits.train: <split name>")
    return {ours: chosen[ours] for ours in SPLITS if ours in chosen}


def column_names(split: SourceSplit) -> list[str]:
    return list(split.rows) if isinstance(split.rows, dict) else list(split.rows.column_names)


def column_map(available: list[str], columns: dict[str, str], task: str) -> dict[str, str]:
    """Role -> source column, from ``data.columns`` and the defaults."""
    out: dict[str, str] = {}
    for role in ROLES[task]:
        if role in columns:
            out[role] = columns[role]
        elif role == "text" and "text" not in available and "sentence" in available:
            out[role] = "sentence"
        elif role not in _OPTIONAL_ROLES:
            out[role] = role
    return out


def _listing(names: list[str], limit: int = 15) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") if names else "(none)"


def role_split(split: SourceSplit, split_name: str, where: str, columns: dict[str, str]
               ) -> tuple[RoleSplit, list[str] | None]:
    """The role columns of one source split, checked (present, no missing values, text is text), and
    the label names its features give (hub and built-in data sets)."""
    available = column_names(split)
    for role, column in columns.items():
        if column not in available:
            raise LoraError(f"column {column!r} (role {role}) not found in {where}, split {split_name!r}; "
                            f"columns: {_listing(available)}",
                            hint=f"set data.columns.{role} to the column that holds the {role}")
    at = f"{where}, split {split_name!r}"
    table = split.rows if isinstance(split.rows, dict) else arrow_table(split.rows)
    if (len(next(iter(table.values()))) if isinstance(table, dict) else table.num_rows) == 0:
        raise LoraError(f"{at}, has no rows")
    labels: list[Any] | None = None
    texts: dict[str, pa.ChunkedArray | pa.Array] = {}
    for role, column in columns.items():
        if not isinstance(table, dict) and role != "label" and _is_text(table.column(column).type):
            values = table.column(column)
            if values.null_count:  # the first missing value, as the Python check finds it
                _check_values(values.slice(0, pc.index(values.is_null(), True).as_py() + 1).to_pylist(), role,
                              column, at)
            texts[role] = values
            continue
        # our reader's columns, and labels (a list anyway); an Arrow text role that is not text fails here
        python = table[column] if isinstance(table, dict) else table.column(column).to_pylist()
        _check_values(python, role, column, at)
        if role == "label":
            labels = python
        else:
            texts[role] = pa.array(python, pa.string())
    if labels is not None and split.untyped and all(_INT_TEXT.fullmatch(v) for v in labels):
        labels = [int(v) for v in labels]  # csv ids
    names = None
    if "label" in columns and not split.from_file and not isinstance(split.rows, dict):
        from datasets import ClassLabel

        feature = split.rows.features.get(columns["label"])
        names = list(feature.names) if isinstance(feature, ClassLabel) else None
    return RoleSplit(pa.table(texts), labels), names


def _is_text(kind: pa.DataType) -> bool:
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))


def _check_values(values: list[Any], role: str, column: str, at: str) -> None:
    """No missing value (None, NaN), and text roles hold text: the first bad row is named."""
    for i, value in enumerate(values):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise LoraError(f"{at}, row {i + 1}: column {column!r} ({role}) is empty",
                            hint="remove or fill the rows with missing values")
        if role != "label" and not isinstance(value, str):
            raise LoraError(f"{at}: column {column!r} ({role}) holds {type(value).__name__} values, not text",
                            hint=f"set data.columns.{role} to a text column")
