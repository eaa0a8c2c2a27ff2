"""The data of one trial: load a data set, split it, map its columns, tokenize it, pad batches.

    >>> data = prepare_data(cfg.data, "classification", tokenizer, seed=0)
    >>> batch = data.collate(data.train[:32])  # input_ids, attention_mask, labels (+ token_type_ids)

Sources, in this order (the first that applies wins):

1. ``files``: local ``.csv``, ``.tsv``, ``.json`` (an array of objects, an object of column lists, or
   JSON lines), ``.jsonl`` or ``.parquet`` files. One path is the whole data set; a mapping names the
   file of each split (``train``, ``validation``, ``test``; other names can be mapped with ``splits``).
   Relative paths are relative to the working directory.
2. ``name`` is a built-in data set (:func:`sweeps.builtin_data.builtin_dataset_names`): built from
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
and of validation and test (each split keeps its source order).

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
**same** :class:`PreparedData` object on a hit: treat it and its lists as read-only. Tokenized
examples are also stored on disk, ``<cache>/tokenized/<fingerprint>.json`` (``<cache>`` as in
:func:`sweeps.builtin_models.default_cache_dir`: ``$LORA_SWEEP_CACHE`` or ``~/.cache/lora-sweep``),
written atomically; the fingerprint covers the raw rows, the tokenizer's identity and every setting
that changes tokenization, so a stale file is never read.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import math
import random
import re
import string
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lora_core import LoraError
from sweeps.config.trial import DataConfig
from sweeps.data.builtin import builtin_dataset_names, load_builtin_dataset
from sweeps.data.cachefiles import write_json_atomic
from sweeps.models.builtin import default_cache_dir

if TYPE_CHECKING:
    from datasets import DatasetDict

__all__ = [
    "CACHE_FORMAT",
    "FILE_TYPES",
    "ROLES",
    "SPLITS",
    "PadCollator",
    "PreparedData",
    "clear_memory_cache",
    "load_raw_dataset",
    "prepare_data",
    "tokenized_cache_dir",
]

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Bumped whenever a change here changes the examples produced from the same raw data."""

SPLITS: tuple[str, ...] = ("train", "validation", "test")
ROLES: Mapping[str, tuple[str, ...]] = {
    "classification": ("text", "text_pair", "label"),
    "causal-lm": ("prompt", "completion"),
}
_OPTIONAL_ROLES = frozenset({"text_pair"})
FILE_TYPES: tuple[str, ...] = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
_DEFAULT_SOURCE_SPLITS: Mapping[str, tuple[str, ...]] = {
    "train": ("train",),
    "validation": ("validation", "valid", "dev"),
    "test": ("test",),
}
_MEMORY_SLOTS = 4  # prepared data sets kept per process
_REQUEST_SLOTS = 64
_TOKENIZE_CHUNK = 1024
_INT_TEXT = re.compile(r"-?[0-9]+")

Example = dict[str, Any]
Table = dict[str, list[Any]]  # role -> values, one split


@dataclass(frozen=True)
class PadCollator:
    """Pads a list of examples to the longest one: ``input_ids`` with ``pad_id``, ``attention_mask``
    1 on real tokens, ``token_type_ids`` with 0 (when the examples have them), and ``labels``
    (a class id per example, or token labels padded with -100 when ``causal``). A plain object, so
    DataLoader workers can pickle it."""

    pad_id: int
    causal: bool

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        width = max(len(e["input_ids"]) for e in examples)
        ids, mask = [], []
        for e in examples:
            n = len(e["input_ids"])
            ids.append(e["input_ids"] + [self.pad_id] * (width - n))
            mask.append([1] * n + [0] * (width - n))
        batch = {"input_ids": torch.tensor(ids, dtype=torch.long),
                 "attention_mask": torch.tensor(mask, dtype=torch.long)}
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"] = torch.tensor(
                [e["token_type_ids"] + [0] * (width - len(e["token_type_ids"])) for e in examples], dtype=torch.long)
        if self.causal:
            labels = [e["labels"] + [-100] * (width - len(e["labels"])) for e in examples]
        else:
            labels = [e["labels"] for e in examples]
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch


@dataclass(frozen=True)
class PreparedData:
    """Tokenized splits of one data set, ready for the trainer. Shared between trials: read-only.

    Attributes:
        task: ``"classification"`` or ``"causal-lm"``.
        train, validation, test: Examples ``{"input_ids": [...], "labels": ...}`` (+ ``token_type_ids``);
            ``labels`` is a class id (classification) or token ids with -100 on the prompt (causal LM).
        collate: Pads a list of examples into tensors (:class:`PadCollator`).
        label_names: Class names by id (classification), else None.
        num_labels: ``len(label_names)`` (classification), else None.
        majority_rate: Validation accuracy of always predicting the most frequent train label.
        generation: Causal LM: split -> ``(prompt text, expected completion)`` in split order; else {}.
        source: Where the data came from, in words.
        fingerprint: sha256 of the raw rows, the tokenizer's identity and the tokenization settings.
    """

    task: str
    train: list[Example] = field(repr=False)
    validation: list[Example] = field(repr=False)
    test: list[Example] = field(repr=False)
    collate: Callable[[list[Example]], dict[str, torch.Tensor]] = field(repr=False)
    label_names: list[str] | None
    num_labels: int | None
    majority_rate: float | None
    generation: dict[str, list[tuple[str, str]]] = field(repr=False)
    source: str
    fingerprint: str

    def sizes(self) -> dict[str, int]:
        return {split: len(getattr(self, split)) for split in SPLITS}


@dataclass(frozen=True)
class _Raw:
    """Role columns of the three splits (labels already ids), with the label names and a description."""

    splits: dict[str, Table]
    label_names: list[str] | None
    source: str


# ----------------------------------------------------------------------------------------------
# public API


def prepare_data(cfg: DataConfig, task: str, tokenizer: Any, seed: int = 0) -> PreparedData:
    """Load, split and tokenize the data set of ``cfg`` for ``task`` (see the module docstring).

    Returns the same object for the same request within a process (read-only). Raises
    :class:`lora_core.LoraError` for anything the user can fix: a missing file or column, an
    unreachable hub data set, bad labels, a tokenizer without eos or chat template.
    """
    _check_task(task)
    request = _request_key(cfg, task, tokenizer, seed)
    with _LOCK:
        hit = _MEMORY.lookup(request)
    if hit is not None:
        return hit
    raw = _load_raw(cfg, task, seed)
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
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    _check_task(task)
    raw = _load_raw(cfg, task, seed)
    features = {role: Value("string") for role in raw.splits["train"] if role != "label"}
    if "label" in raw.splits["train"]:
        features["label"] = ClassLabel(names=list(raw.label_names or []))
    return DatasetDict({split: Dataset.from_dict(table, features=Features(features), split=split)
                        for split, table in raw.splits.items()})


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
    stats = {}
    for key, path in sorted(files.items()):
        try:
            st = Path(path).expanduser().resolve().stat()
            stats[key] = [str(Path(path).expanduser().resolve()), st.st_size, st.st_mtime_ns]
        except OSError:
            stats[key] = None
    key = {"format": CACHE_FORMAT, "cfg": dataclasses.asdict(cfg), "task": task, "seed": seed,
           "tokenizer": _tokenizer_identity(tokenizer, cfg, task), "files": stats}
    return json.dumps(key, sort_keys=True, default=str)


def _fingerprint(raw: _Raw, cfg: DataConfig, task: str, tokenizer: Any) -> str:
    h = hashlib.sha256()
    head = {"format": CACHE_FORMAT, "source": raw.source, "label_names": raw.label_names,
            "tokenizer": _tokenizer_identity(tokenizer, cfg, task), **_settings(cfg, task)}
    h.update(json.dumps(head, sort_keys=True).encode())
    for split in SPLITS:
        for role in sorted(raw.splits[split]):
            h.update(json.dumps([split, role, raw.splits[split][role]], ensure_ascii=False).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# building PreparedData


def _build(raw: _Raw, cfg: DataConfig, task: str, tokenizer: Any, fingerprint: str) -> PreparedData:
    sizes = {split: len(_rows(raw.splits[split])) for split in SPLITS}
    path = tokenized_cache_dir() / f"{fingerprint}.json"
    cached = _read_disk_cache(path, fingerprint, sizes)
    if cached is not None:
        examples, generation = cached
    else:
        examples, generation = _tokenize(raw, cfg, task, tokenizer)
        write_json_atomic(path, {"format": CACHE_FORMAT, "fingerprint": fingerprint, "examples": examples,
                                 "generation": generation}, "tokenized-data cache")
    pad_id = _pad_id(tokenizer)
    label_names = raw.label_names if task == "classification" else None
    majority = None
    if task == "classification":
        counts = Counter(raw.splits["train"]["label"])
        top = min(counts, key=lambda label: (-counts[label], label))
        validation = raw.splits["validation"]["label"]
        majority = sum(1 for y in validation if y == top) / len(validation)
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


def _tokenize(raw: _Raw, cfg: DataConfig, task: str, tokenizer: Any
              ) -> tuple[dict[str, list[Example]], dict[str, list[tuple[str, str]]]]:
    if task == "classification":
        return {split: _tokenize_classification(raw.splits[split], tokenizer, cfg.max_length)
                for split in SPLITS}, {}
    _check_template(cfg.prompt_template)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise LoraError(f"the tokenizer {_tokenizer_name(tokenizer)} has no eos token, which causal-lm "
                        "examples end with", hint="use a causal language model's tokenizer")
    if cfg.chat_template and not getattr(tokenizer, "chat_template", None):
        raise LoraError(f"data.chat_template is true but the tokenizer {_tokenizer_name(tokenizer)} has no chat "
                        "template", hint="set data.chat_template: false (data.prompt_template formats the "
                        "prompt), or use an instruction-tuned model")
    examples, generation = {}, {}
    for split in SPLITS:
        table = raw.splits[split]
        texts = [_prompt_text(p, cfg, tokenizer) for p in table["prompt"]]
        examples[split] = _tokenize_causal(texts, table["completion"], tokenizer, int(eos), cfg)
        generation[split] = [(text, completion.strip()) for text, completion in zip(texts, table["completion"],
                                                                                   strict=True)]
    return examples, generation


def _tokenize_classification(table: Table, tokenizer: Any, max_length: int) -> list[Example]:
    texts, pairs, labels = table["text"], table.get("text_pair"), table["label"]
    out: list[Example] = []
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        end = start + _TOKENIZE_CHUNK
        enc = tokenizer(texts[start:end], pairs[start:end] if pairs is not None else None,
                        truncation=True, max_length=max_length)
        types = enc.get("token_type_ids")
        for i, ids in enumerate(enc["input_ids"]):
            example: Example = {"input_ids": list(ids), "labels": int(labels[start + i])}
            if types is not None:
                example["token_type_ids"] = list(types[i])
            out.append(example)
    return out


def _prompt_text(prompt: str, cfg: DataConfig, tokenizer: Any) -> str:
    text = cfg.prompt_template.format(prompt=prompt)
    if not cfg.chat_template:
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text.strip()}],
                                         add_generation_prompt=True, tokenize=False)


def _tokenize_causal(texts: list[str], completions: list[str], tokenizer: Any, eos: int,
                     cfg: DataConfig) -> list[Example]:
    targets = [c if cfg.chat_template or not c or c[0].isspace() or not t or t[-1].isspace() else " " + c
               for t, c in zip(texts, completions, strict=True)]
    limit = cfg.max_length
    out: list[Example] = []
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        end = start + _TOKENIZE_CHUNK
        prompt_ids = tokenizer(texts[start:end], add_special_tokens=not cfg.chat_template, verbose=False)["input_ids"]
        target_ids = tokenizer(targets[start:end], add_special_tokens=False, verbose=False)["input_ids"]
        for p, c in zip(prompt_ids, target_ids, strict=True):
            tail = ([*c, eos])[:limit]
            room = limit - len(tail)
            head = list(p[max(0, len(p) - room):]) if room > 0 else []
            out.append({"input_ids": head + tail, "labels": [-100] * len(head) + tail})
    return out


def _check_template(template: str) -> None:
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        fields = {f"<{exc}>"}
    if fields != {"prompt"}:
        raise LoraError(f"data.prompt_template {template!r} must use the field {{prompt}} and no other",
                        hint="e.g. '{prompt}\\nAnswer:'; write literal braces as {{ and }}")


def _tokenizer_name(tokenizer: Any) -> str:
    return repr(getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__)


# ----------------------------------------------------------------------------------------------
# disk cache


def _read_disk_cache(path: Path, fingerprint: str, sizes: dict[str, int]
                     ) -> tuple[dict[str, list[Example]], dict[str, list[tuple[str, str]]]] | None:
    """The cached examples, or None when absent, unreadable or not matching (then it is rebuilt)."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        if payload["format"] != CACHE_FORMAT or payload["fingerprint"] != fingerprint:
            return None
        examples = {split: payload["examples"][split] for split in SPLITS}
        generation = {split: [(p, c) for p, c in pairs] for split, pairs in payload["generation"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if any(len(examples[split]) != sizes[split] for split in SPLITS):
        return None
    return examples, generation




# ----------------------------------------------------------------------------------------------
# loading raw data


def _check_task(task: str) -> None:
    if task not in ROLES:
        raise LoraError(f"unknown task {task!r}", hint=f"use one of: {', '.join(ROLES)}")


def _load_raw(cfg: DataConfig, task: str, seed: int) -> _Raw:
    for role in cfg.columns:
        if role not in ROLES[task]:
            raise LoraError(f"data.columns.{role}: {role!r} is not a {task} role",
                            hint=f"{task} roles are: {', '.join(ROLES[task])}")
    for limit, key in ((cfg.max_train_samples, "max_train_samples"), (cfg.max_eval_samples, "max_eval_samples")):
        if limit is not None and limit < 1:
            raise LoraError(f"data.{key} must be >= 1 or null, got {limit}")

    described: list[str] = []
    class_names: list[str] | None = None
    if cfg.files is not None:
        available, where = _read_files(cfg.files)
        must_use = set(available) if isinstance(cfg.files, dict) else set()
    elif cfg.name in builtin_dataset_names():
        available, where, must_use = dict(load_builtin_dataset(cfg.name, seed)), f"built-in data set {cfg.name}", set()
        described.append(f"seed {seed}")
    elif cfg.name:
        available, where, must_use = _load_hub(cfg.name, cfg.config), f"hub data set {_hub_label(cfg)}", set()
    else:
        raise LoraError("data needs a name (built-in or hub data set) or files", hint="e.g. data.name: pydoc-topics")

    chosen = _choose_splits(available, cfg.splits, where)
    unused = sorted(must_use - set(chosen.values()))
    if unused:
        raise LoraError(f"data.files names split(s) {', '.join(unused)}, which are not used",
                        hint="name the files train, validation and test, or map them with data.splits")
    columns = _column_map(_column_names(available[chosen["train"]]), cfg.columns, task)
    tables: dict[str, Table] = {}
    for ours, theirs in chosen.items():
        tables[ours], names = _role_table(available[theirs], theirs, where, columns)
        if ours == "train":
            class_names = names
    mapped = [f"{ours} <- {theirs}" for ours, theirs in chosen.items() if ours != theirs]
    if mapped:
        described.append(", ".join(mapped))
    label_names = _encode_labels(tables, class_names, where) if task == "classification" else None

    missing = [split for split in SPLITS if split not in tables]
    if missing:
        made = _carve(tables["train"], missing, cfg.split_fractions, seed, stratify=task == "classification")
        tables.update(made)
        shares = ", ".join(f"{split} {len(_rows(made[split]))}" for split in missing)
        described.append(f"{shares} rows made from train (seed {seed})")

    for split, limit in (("train", cfg.max_train_samples), ("validation", cfg.max_eval_samples),
                         ("test", cfg.max_eval_samples)):
        n = len(_rows(tables[split]))
        if limit is not None and limit < n:
            tables[split] = _subset(tables[split], limit, f"lora-sweep/subset/{seed}/{split}")
            described.append(f"{split}: {limit} of {n} rows")
    sizes = "/".join(str(len(_rows(tables[split]))) for split in SPLITS)
    source = f"{where} ({'; '.join([*described, f'train/validation/test {sizes}'])})"
    return _Raw(splits={split: tables[split] for split in SPLITS}, label_names=label_names, source=source)


def _hub_label(cfg: DataConfig) -> str:
    return f"{cfg.name}/{cfg.config}" if cfg.config else str(cfg.name)


def _load_hub(name: str, config: str | None) -> dict[str, Any]:
    try:
        import datasets

        loaded = datasets.load_dataset(name, config)
    except Exception as exc:  # no network, unknown name, missing config, gated data set, ...
        close = difflib.get_close_matches(name, builtin_dataset_names(), n=1)
        suggestion = f"did you mean the built-in {close[0]!r}? " if close else ""
        raise LoraError(
            f"could not load data set {name!r} from the Hugging Face Hub: {_first_line(exc)}",
            hint=f"{suggestion}check the name and the network, or use local files (data.files) or a built-in "
            f"data set: {', '.join(builtin_dataset_names())}",
        ) from exc
    if not isinstance(loaded, Mapping):
        return {"train": loaded}
    return dict(loaded)


def _read_files(files: str | dict[str, str]) -> tuple[dict[str, Table], str]:
    if isinstance(files, str):
        return {"train": _read_file(files)}, f"file {files}"
    if not files:
        raise LoraError("data.files is an empty mapping", hint="e.g. data.files: {train: train.csv, test: test.csv}")
    tables = {split: _read_file(path) for split, path in files.items()}
    return tables, "files " + ", ".join(f"{split}={path}" for split, path in files.items())


def _read_file(name: str) -> Table:
    path = Path(name).expanduser()
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise LoraError(f"unsupported data file type {suffix or '(no extension)'!r}: {name}",
                        hint=f"use one of: {', '.join(FILE_TYPES)}")
    if not path.is_file():
        raise LoraError(f"data file {name} does not exist" if not path.exists() else f"data file {name} is not a file",
                        hint=f"check data.files (relative paths start at the working directory {Path.cwd()})")
    try:
        if suffix in (".csv", ".tsv"):
            import pandas as pd

            frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False,
                                na_values=[""])
            return _UntypedTable({str(c): frame[c].tolist() for c in frame.columns})
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pydict()
        return _read_json(path, lines=suffix == ".jsonl")
    except LoraError:
        raise
    except Exception as exc:  # a parser's own error: malformed file
        raise LoraError(f"could not read data file {name}: {_first_line(exc)}",
                        hint=f"check that it is valid {suffix[1:]}") from exc


class _UntypedTable(dict):
    """Columns read from a format without types (csv, tsv): every value is a string."""


def _read_json(path: Path, lines: bool) -> Table:
    text = path.read_text(encoding="utf-8")
    if not lines:
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
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise LoraError(f"data file {path}, line {number}: not valid JSON ({exc.msg})") from None
    return _records_to_table(records, path)


def _records_to_table(records: list[Any], path: Path) -> Table:
    columns: dict[str, None] = {}
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise LoraError(f"data file {path}: record {i + 1} is a {type(record).__name__}, not an object")
        columns.update(dict.fromkeys(record))
    return {str(c): [record.get(c) for record in records] for c in columns}


def _choose_splits(available: Mapping[str, Any], mapping: dict[str, str], where: str) -> dict[str, str]:
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


def _column_names(split: Any) -> list[str]:
    return list(split) if isinstance(split, dict) else list(split.column_names)


def _column_values(split: Any, column: str) -> list[Any]:
    return list(split[column]) if isinstance(split, dict) else split.select_columns([column]).to_dict()[column]


def _class_names(split: Any, column: str) -> list[str] | None:
    if isinstance(split, dict):
        return None
    from datasets import ClassLabel

    feature = split.features.get(column)
    return list(feature.names) if isinstance(feature, ClassLabel) else None


def _column_map(available: list[str], columns: dict[str, str], task: str) -> dict[str, str]:
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


def _role_table(split: Any, split_name: str, where: str, columns: dict[str, str]) -> tuple[Table, list[str] | None]:
    """The role columns of one source split, checked: present, no missing values, text is text."""
    available = _column_names(split)
    for role, column in columns.items():
        if column not in available:
            raise LoraError(f"column {column!r} (role {role}) not found in {where}, split {split_name!r}; "
                            f"columns: {_listing(available)}",
                            hint=f"set data.columns.{role} to the column that holds the {role}")
    table = {role: _column_values(split, column) for role, column in columns.items()}
    if not _rows(table):
        raise LoraError(f"{where}, split {split_name!r}, has no rows")
    for role, values in table.items():
        for i, value in enumerate(values):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                raise LoraError(f"{where}, split {split_name!r}, row {i + 1}: column {columns[role]!r} ({role}) "
                                "is empty", hint="remove or fill the rows with missing values")
            if role != "label" and not isinstance(value, str):
                raise LoraError(f"{where}, split {split_name!r}: column {columns[role]!r} ({role}) holds "
                                f"{type(value).__name__} values, not text",
                                hint=f"set data.columns.{role} to a text column")
    if "label" in table and isinstance(split, _UntypedTable) and all(_INT_TEXT.fullmatch(v) for v in table["label"]):
        table["label"] = [int(v) for v in table["label"]]  # csv ids
    names = _class_names(split, columns["label"]) if "label" in columns else None
    return table, names


def _normalise_label(value: Any) -> int | str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, str)):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(value)


def _encode_labels(tables: dict[str, Table], class_names: list[str] | None, where: str) -> list[str]:
    """Replace every split's labels by ids in place; return the label names."""
    try:
        normalised = {split: [_normalise_label(v) for v in t["label"]] for split, t in tables.items()}
    except ValueError as exc:
        raise LoraError(f"{where}: label {exc.args[0]!r} is neither an integer nor a string",
                        hint="classification needs class labels; map data.columns.label to a class column") from None
    train = normalised["train"]
    if len(set(train)) < 2:
        raise LoraError(f"{where}: the train split has only one label ({train[0]!r})",
                        hint="classification needs at least two classes")
    kinds = {type(v) for values in normalised.values() for v in values}
    if len(kinds) > 1:
        raise LoraError(f"{where}: the labels mix integers and strings",
                        hint="use one kind: ids 0..K-1 or class names")
    if class_names is not None or kinds == {int}:
        bad = [v for v in train if v < 0 or (class_names is not None and v >= len(class_names))]
        if bad:
            raise LoraError(f"{where}: train label {bad[0]} is not a class id 0..K-1",
                            hint="negative labels usually mark unlabelled rows; use a labelled split")
        names = list(class_names) if class_names is not None else [str(i) for i in range(max(train) + 1)]
        ids = {v: v for v in set(train)}
    else:
        names = sorted(set(train))
        ids = {name: i for i, name in enumerate(names)}
    for split, values in normalised.items():
        for i, value in enumerate(values):
            if value not in ids:
                hint = ("negative labels usually mark an unlabelled split (GLUE test): map data.splits.test to a "
                        "labelled split" if isinstance(value, int) and value < 0 else
                        "every validation/test label must also occur in train")
                raise LoraError(f"{where}, split {split!r}, row {i + 1}: label {value!r} does not occur in train",
                                hint=hint)
        tables[split]["label"] = [ids[v] for v in values]
    return names


# ----------------------------------------------------------------------------------------------
# splitting and subsetting


def _rows(table: Table) -> list[Any]:
    return next(iter(table.values()))


def _take(table: Table, indices: list[int]) -> Table:
    return {role: [values[i] for i in indices] for role, values in table.items()}


def _shuffled(n: int, labels: list[Any] | None, rng: random.Random) -> list[int]:
    """A random order of ``range(n)``; with labels, every prefix holds each label about in proportion
    (each label's rows spread evenly over [0, 1), then sorted)."""
    if labels is None:
        order = list(range(n))
        rng.shuffle(order)
        return order
    groups: dict[Any, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    keyed: list[tuple[float, int]] = []
    for members in groups.values():  # first-appearance order: deterministic
        rng.shuffle(members)
        keyed.extend(((j + rng.random()) / len(members), i) for j, i in enumerate(members))
    keyed.sort()
    return [i for _, i in keyed]


def _carve(train: Table, missing: list[str], fractions: list[float], seed: int, stratify: bool) -> dict[str, Table]:
    """Make the ``missing`` splits from ``train``; returns them and the new train."""
    n = len(_rows(train))
    share = dict(zip(SPLITS, fractions, strict=True))
    total = share["train"] + sum(share[split] for split in missing)
    sizes = {}
    for split in missing:
        if share[split] <= 0:
            raise LoraError(f"the {split} split must be made from train, but data.split_fractions gives it 0",
                            hint=f"give it a share, e.g. [0.8, 0.1, 0.1], or provide a {split} split")
        sizes[split] = max(1, round(n * share[split] / total))
    if n - sum(sizes.values()) < 1:
        raise LoraError(f"the train split has {n} rows, too few to make {' and '.join(missing)} from",
                        hint="provide more rows, or the missing splits themselves")
    order = _shuffled(n, train["label"] if stratify else None, random.Random(f"lora-sweep/split/{seed}"))
    parts, start = {}, 0
    for split in missing:
        parts[split] = _take(train, sorted(order[start:start + sizes[split]]))
        start += sizes[split]
    parts["train"] = _take(train, sorted(order[start:]))
    return parts


def _subset(table: Table, limit: int, seed_text: str) -> Table:
    order = list(range(len(_rows(table))))
    random.Random(seed_text).shuffle(order)
    return _take(table, sorted(order[:limit]))


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
