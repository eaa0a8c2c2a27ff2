"""The data of one trial: prepare (load, split, tokenize) a data set once, cache it in memory and on
disk by its fingerprint, and hand out :class:`PreparedData`. Reading sources is :mod:`sweeps.data.sources`,
labels and splits :mod:`sweeps.data.splits`, tokenizing :mod:`sweeps.data.tokenize`; the result's
types are in :mod:`sweeps.data.examples` (all re-exported here).

    >>> data = prepare_data(cfg.data, "classification", tokenizer, seed=0)
    >>> batch = data.collate(data.train[:32])  # input_ids, attention_mask, labels (+ token_type_ids)

Sources, in this order (the first that applies wins):

1. ``files``: local ``.csv``, ``.tsv``, ``.json`` (an array of objects, an object of column lists, or
   JSON lines), ``.jsonl`` or ``.parquet`` files. One path is the whole data set; a mapping names the
   file of each split (``train``, ``validation``, ``test``; other names can be mapped with ``splits``).
   Relative paths are relative to the working directory. Read with ``datasets.load_dataset`` into a
   memory-mapped Arrow copy under ``<cache>/datasets`` (see :mod:`sweeps.data.sources`).
2. ``name`` is a built-in data set (:func:`sweeps.data.builtin.builtin_dataset_names`): built from
   ``seed`` with its own 80/10/10 split.
3. anything else is a Hugging Face Hub data set, ``datasets.load_dataset(name, config)``.

Splits: ``splits`` maps our split names to the source's (``{"test": "validation"}`` for GLUE, whose
test split has no labels). Without a mapping, ``train`` <- ``train``, ``validation`` <- ``validation``
(or ``valid``, ``dev``), ``test`` <- ``test``; a source split that the mapping names explicitly is not
also used by default. Splits the source lacks are **made from train**, deterministically from ``seed``:
``split_fractions`` gives the shares (renormalised over the splits involved: with only ``test``
missing and fractions [0.8, 0.1, 0.1], test gets 1/9 of train), each made split gets at least one row,
and classification splits are stratified by label. A single file is split the same way.
``max_train_samples`` / ``max_eval_samples`` then keep the first N rows of a seeded shuffle of train
and of validation and test (each split keeps its source order). So every data set has a test split with
rows of its own (a source split is never used for two of ours); a sweep reads it only after its last
decision (`sweeps.engine.holdout`), never while it trains or chooses.

Columns: ``columns`` maps roles to source columns. Classification: ``text`` (default ``text``, or
``sentence`` when there is no ``text``), optional ``text_pair``, ``label`` (default ``label``).
Causal LM: ``prompt`` and ``completion``. Labels are integers (ids 0..K-1, K = largest train id + 1)
or strings (sorted, then numbered); a ``ClassLabel`` feature gives the names; a csv/tsv label column
whose every value is an integer is read as ids. Every validation or test label must occur in train,
and train needs at least two labels. Missing values (None, NaN, an empty csv cell) are errors.

Classification examples are ``tokenizer(text, text_pair, truncation=True, max_length=max_length)``,
unpadded. Causal-LM examples are the prompt text (``prompt_template.format(prompt=...)``, or the
tokenizer's chat template around ``prompt_template.format(prompt=...).strip()`` as the user message
when ``chat_template`` is true), tokenized with the tokenizer's special tokens (none added on the chat
path: the template holds them), then the completion tokenized without special tokens, then eos.
Labels are -100 on the prompt tokens. A completion that would run straight on from the prompt (the
prompt text ends in neither whitespace nor the chat template's generation prompt, and the completion
does not start with whitespace) gets one leading space, so ``"...\\nName:"`` + ``"os.getcwd"`` is
trained as ``"...\\nName: os.getcwd"``. Too-long examples lose prompt tokens from the left first; a
completion that alone exceeds ``max_length`` is cut at its end (and then has no eos).

Caching: :func:`prepare_data` remembers its results per process (the last few data sets, looked up by
the request: config, task, seed, tokenizer identity and local files' size and mtime) and returns the
**same** :class:`PreparedData` object on a hit: treat it and its splits as read-only. Tokenized
examples are stored on disk as Arrow files, memory-mapped when used::

    <cache>/tokenized/<fingerprint>/{train,validation,test}.arrow  meta.json

(``<cache>`` as in :func:`sweeps.models.builtin.default_cache_dir`: ``$LORA_SWEEP_CACHE`` or
``~/.cache/lora-sweep``). An entry is built in a temporary folder beside it and renamed into place, so
it is complete or absent; one whose ``meta.json`` or files do not match is rebuilt. The fingerprint
covers the raw rows, the tokenizer's identity and every setting that changes tokenization, so a stale
entry is never read. A cache folder that cannot be written only logs a warning (the files then go to
a temporary folder removed at exit).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from lora_core import LoraError
from sweeps.config.trial import DataConfig
from sweeps.data.examples import Example, ExampleRows, PadCollator, PreparedData, TextPairs
from sweeps.data.sources import FILE_TYPES, ROLES, SPLITS, check_task
from sweeps.data.splits import RawSplits, load_raw, majority_rate
from sweeps.data.tokenize import EXAMPLE_COLUMNS, GENERATION_COLUMNS, tokenize_splits
from sweeps.models.builtin import default_cache_dir

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

__all__ = [
    "CACHE_FORMAT",
    "FILE_TYPES",
    "ROLES",
    "SPLITS",
    "Example",
    "ExampleRows",
    "PadCollator",
    "PreparedData",
    "TextPairs",
    "clear_memory_cache",
    "load_raw_dataset",
    "prepare_data",
    "tokenized_cache_dir",
]

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2
"""Bumped whenever a change here changes the examples produced from the same raw data (2: Arrow)."""

_MEMORY_SLOTS = 4  # prepared data sets kept per process
_REQUEST_SLOTS = 64
_HASH_BATCH = 8192  # rows per fingerprint update
_META = "meta.json"

_tokenize = tokenize_splits  # looked up at call time (tests replace it)


# ----------------------------------------------------------------------------------------------
# public API


def prepare_data(cfg: DataConfig, task: str, tokenizer: Any, seed: int = 0) -> PreparedData:
    """Load, split and tokenize the data set of ``cfg`` for ``task`` (see the module docstring).

    Returns the same object for the same request within a process (read-only). Raises
    :class:`lora_core.LoraError` for anything the user can fix: a missing file or column, an
    unreachable hub data set, bad labels, a tokenizer without eos or chat template.
    """
    check_task(task)
    request = _request_key(cfg, task, tokenizer, seed)
    with _LOCK:
        hit = _MEMORY.lookup(request)
    if hit is not None:
        return hit
    raw = load_raw(cfg, task, seed)
    fingerprint = _fingerprint(raw, cfg, task, tokenizer)
    with _LOCK:
        data = _MEMORY.by_fingerprint.get(fingerprint)
    if data is None:
        data = _build(raw, cfg, task, tokenizer, fingerprint)
    with _LOCK:
        _MEMORY.store(request, data)
    return data


def load_raw_dataset(cfg: DataConfig, task: str, seed: int = 0) -> DatasetDict:
    """The untokenized ``train``/``validation``/``test`` splits, with columns renamed to the roles.

    Classification: ``text`` (and ``text_pair``) strings and a ``label`` ClassLabel; causal LM:
    ``prompt`` and ``completion`` strings. Splitting and subsetting are applied.
    """
    from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, NamedSplit, Value
    from datasets.table import InMemoryTable

    check_task(task)
    raw = load_raw(cfg, task, seed)
    out = {}
    for split, part in raw.splits.items():
        table = pa.concat_tables(part.batches(_HASH_BATCH)) if part.indices is not None else part.table
        columns = {role: table.column(role).cast(pa.string()) for role in table.column_names}
        features: dict[str, Any] = {role: Value("string") for role in columns}
        if part.labels is not None:
            columns["label"] = pa.chunked_array([pa.array(part.labels, pa.int64())])
            features["label"] = ClassLabel(names=list(raw.label_names or []))
        out[split] = Dataset(InMemoryTable(pa.table(columns)), info=DatasetInfo(features=Features(features)),
                             split=NamedSplit(split), fingerprint=uuid.uuid4().hex)
    return DatasetDict(out)


def tokenized_cache_dir() -> Path:
    """Where tokenized data sets are stored: ``<cache>/tokenized``."""
    return default_cache_dir() / "tokenized"


def clear_memory_cache() -> None:
    """Forget the prepared data sets held in this process (the disk cache stays)."""
    with _LOCK:
        _MEMORY.clear()
# ----------------------------------------------------------------------------------------------
# in-memory cache


class _Memory:
    """request key -> fingerprint -> PreparedData, both least-recently-used."""

    def __init__(self) -> None:
        self.by_request: OrderedDict[str, str] = OrderedDict()
        self.by_fingerprint: OrderedDict[str, PreparedData] = OrderedDict()

    def lookup(self, request: str) -> PreparedData | None:
        fingerprint = self.by_request.get(request)
        data = self.by_fingerprint.get(fingerprint) if fingerprint else None
        if data is None:
            return None
        self.by_request.move_to_end(request)
        self.by_fingerprint.move_to_end(data.fingerprint)
        return data

    def store(self, request: str, data: PreparedData) -> None:
        self.by_request[request] = data.fingerprint
        self.by_request.move_to_end(request)
        self.by_fingerprint[data.fingerprint] = data
        self.by_fingerprint.move_to_end(data.fingerprint)
        while len(self.by_fingerprint) > _MEMORY_SLOTS:
            self.by_fingerprint.popitem(last=False)
        while len(self.by_request) > _REQUEST_SLOTS:
            self.by_request.popitem(last=False)

    def clear(self) -> None:
        self.by_request.clear()
        self.by_fingerprint.clear()


_LOCK = threading.Lock()
_MEMORY = _Memory()


def _tokenizer_identity(tokenizer: Any, cfg: DataConfig, task: str) -> dict[str, Any]:
    """What about the tokenizer changes the examples: name, size, special ids, truncation side,
    and the chat template when it is used."""
    ident: dict[str, Any] = {
        "class": type(tokenizer).__name__,
        "name": str(getattr(tokenizer, "name_or_path", "")),
        "size": len(tokenizer),
        "special": [getattr(tokenizer, f"{t}_token_id", None) for t in ("bos", "eos", "pad", "sep", "cls")],
        "truncation_side": getattr(tokenizer, "truncation_side", None),
    }
    if task == "causal-lm" and cfg.chat_template:
        template = getattr(tokenizer, "chat_template", None)
        ident["chat_template"] = hashlib.sha256(str(template).encode()).hexdigest()
    return ident


def _settings(cfg: DataConfig, task: str) -> dict[str, Any]:
    settings: dict[str, Any] = {"task": task, "max_length": cfg.max_length}
    if task == "causal-lm":
        settings.update(prompt_template=cfg.prompt_template, chat_template=cfg.chat_template)
    return settings


def _request_key(cfg: DataConfig, task: str, tokenizer: Any, seed: int) -> str:
    files = cfg.files if isinstance(cfg.files, dict) else {"": cfg.files} if cfg.files else {}
    stats: dict[str, list[Any] | None] = {}
    for split, path in sorted(files.items()):
        try:
            st = Path(path).expanduser().resolve().stat()
            stats[split] = [str(Path(path).expanduser().resolve()), st.st_size, st.st_mtime_ns]
        except OSError:
            stats[split] = None
    key = {"format": CACHE_FORMAT, "cfg": dataclasses.asdict(cfg), "task": task, "seed": seed,
           "tokenizer": _tokenizer_identity(tokenizer, cfg, task), "files": stats}
    return json.dumps(key, sort_keys=True, default=str)


def _fingerprint(raw: RawSplits, cfg: DataConfig, task: str, tokenizer: Any) -> str:
    """sha256 of the settings, the tokenizer's identity and every row of every split (role columns,
    labels as ids), read in batches."""
    h = hashlib.sha256()
    head = {"format": CACHE_FORMAT, "source": raw.source, "label_names": raw.label_names,
            "tokenizer": _tokenizer_identity(tokenizer, cfg, task), **_settings(cfg, task)}
    h.update(json.dumps(head, sort_keys=True).encode())
    for split in SPLITS:
        part = raw.splits[split]
        roles = sorted([*part.table.column_names, *(["label"] if part.labels is not None else [])])
        h.update(json.dumps([split, roles, len(part)]).encode())
        for start, batch in zip(range(0, len(part), _HASH_BATCH), part.batches(_HASH_BATCH), strict=True):
            for role in roles:
                values = (part.labels or [])[start:start + _HASH_BATCH] if role == "label" else \
                    batch.column(role).to_pylist()
                h.update(json.dumps(values, ensure_ascii=False).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# building PreparedData


def _build(raw: RawSplits, cfg: DataConfig, task: str, tokenizer: Any, fingerprint: str) -> PreparedData:
    sizes = raw.sizes()
    entry = tokenized_cache_dir() / fingerprint
    opened = _open_entry(entry, fingerprint, sizes)
    if opened is None:
        opened = _write_entry(entry, raw, cfg, task, tokenizer, fingerprint, sizes)
    pad_id = _pad_id(tokenizer)
    examples = {split: ExampleRows(ds, [c for c in EXAMPLE_COLUMNS if c in ds.column_names])
                for split, ds in opened.items()}
    generation = ({split: TextPairs(ds, GENERATION_COLUMNS) for split, ds in opened.items()}
                  if task == "causal-lm" else {})
    label_names = raw.label_names if task == "classification" else None
    majority = None
    if task == "classification":
        majority = majority_rate(raw.splits["train"].labels or [], raw.splits["validation"].labels or [])
    return PreparedData(
        task=task,
        train=examples["train"],
        validation=examples["validation"],
        test=examples["test"],
        collate=PadCollator(pad_id=pad_id, causal=task == "causal-lm"),
        label_names=list(label_names) if label_names is not None else None,
        num_labels=len(label_names) if label_names is not None else None,
        majority_rate=majority,
        generation=generation,
        source=raw.source,
        fingerprint=fingerprint,
    )


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise LoraError("the tokenizer has neither a pad nor an eos token", hint="use a tokenizer that defines one")


# ----------------------------------------------------------------------------------------------
# disk cache


def _open_entry(folder: Path, fingerprint: str, sizes: dict[str, int]) -> dict[str, Dataset] | None:
    """The memory-mapped splits of a cache entry, or None when absent, unreadable or not matching."""
    from datasets import Dataset

    try:
        meta = json.loads((folder / _META).read_text(encoding="utf-8"))
        if (meta["format"], meta["fingerprint"], meta["sizes"]) != (CACHE_FORMAT, fingerprint, sizes):
            return None
        opened = {split: Dataset.from_file(str(folder / f"{split}.arrow")) for split in SPLITS}
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
        return None
    for split, ds in opened.items():
        if ds.num_rows != sizes[split] or not {"input_ids", "labels"} <= set(ds.column_names):
            return None
    return opened


def _write_entry(entry: Path, raw: RawSplits, cfg: DataConfig, task: str, tokenizer: Any, fingerprint: str,
                 sizes: dict[str, int]) -> dict[str, Dataset]:
    """Tokenize into a new folder beside ``entry``, then rename it into place; the entry's splits."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{fingerprint[:16]}.", suffix=".tmp"))
    except OSError as exc:
        logger.warning("could not write the tokenized-data cache %s: %s", entry, exc)
        work = Path(tempfile.mkdtemp(prefix="lora-sweep-tokenized-"))
        atexit.register(shutil.rmtree, work, ignore_errors=True)
        entry = work
    try:
        _tokenize(raw, cfg, task, tokenizer, work, fingerprint)
        meta = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "sizes": sizes}
        (work / _META).write_text(json.dumps(meta), encoding="utf-8")
        if work != entry:
            _install(work, entry, fingerprint, sizes)
    finally:
        if work != entry:
            shutil.rmtree(work, ignore_errors=True)
    opened = _open_entry(entry, fingerprint, sizes)
    if opened is None:
        raise LoraError(f"the tokenized data in {entry} could not be read back",
                        hint="check the disk (space, permissions) and run again")
    return opened


def _install(work: Path, entry: Path, fingerprint: str, sizes: dict[str, int]) -> None:
    """Rename ``work`` to ``entry``; an entry already there is kept when it is valid (another process
    wrote the same data), else moved aside and removed (readers that map its files keep them)."""
    try:
        os.rename(work, entry)
        return
    except OSError:
        if _open_entry(entry, fingerprint, sizes) is not None:
            return
    stale = entry.with_name(f".{entry.name[:16]}.{uuid.uuid4().hex[:8]}.stale")
    with contextlib.suppress(FileNotFoundError):
        os.rename(entry, stale)
    try:
        os.rename(work, entry)
    except OSError:
        if _open_entry(entry, fingerprint, sizes) is None:
            raise
    finally:
        shutil.rmtree(stale, ignore_errors=True)
