"""Built-in datasets that need no download: made from the standard library's own docstrings.

Two datasets, both deterministic for a given Python version (``sys.version_info[:2]``), whatever the
calling process imported before:

``pydoc-topics`` (classification)
    ``text`` is a cleaned docstring of a standard-library module, class, function, method or
    property; ``label`` (a :class:`datasets.ClassLabel`) is the area of the standard library it comes
    from. The areas are :data:`TOPIC_LABELS`; which module belongs to which area is the fixed table
    :data:`MODULE_AREAS`.

``pydoc-names`` (causal LM)
    ``prompt`` is a cleaned docstring (shorter cut), ``completion`` the qualified name of what it
    documents, e.g. ``collections.OrderedDict.move_to_end``. The caller chooses the prompt format;
    :data:`NAMES_PROMPT_TEMPLATE` is a reasonable one.

The raw docstrings come from :mod:`sweeps.data.docstrings` (collected in a clean interpreter and cached
on disk, once per machine and Python version); this module cleans them and builds the data sets.

Cleaning (:func:`clean_docstring`, done here on the raw entries): :func:`inspect.cleandoc`, leading
signature lines such as ``sin(x)`` or ``pow(x, y) -> float`` removed, whole paragraphs kept up to a
character budget (a first paragraph longer than the budget is cut at a word boundary), and texts
shorter than :data:`MIN_CHARS` dropped. Exact duplicate texts are kept once when they share a label and
dropped altogether when they carry two labels (topics) or document two names (names).

Splits are 80/10/10 train/validation/test from a seed; ``pydoc-topics`` is stratified by label.
"""

from __future__ import annotations

import inspect
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from lora_core import LoraError
from sweeps.data import stdlib_docs
from sweeps.data.docstrings import BUILDER_VERSION, cache_file, collect_docstrings
from sweeps.data.stdlib_docs import MODULE_AREAS, TOPIC_LABELS, DocEntry

if TYPE_CHECKING:
    from datasets import DatasetDict

__all__ = [
    "BUILDER_VERSION",
    "MODULE_AREAS",
    "NAMES_MAX_CHARS",
    "NAMES_PROMPT_TEMPLATE",
    "TOPICS_MAX_CHARS",
    "TOPIC_LABELS",
    "DatasetSummary",
    "DocEntry",
    "builtin_dataset_names",
    "cache_file",
    "clean_docstring",
    "collect_docstrings",
    "describe",
    "load_builtin_dataset",
    "name_examples",
    "topic_examples",
]

TOPICS_MAX_CHARS = 600
"""Character budget of a ``pydoc-topics`` text."""

NAMES_MAX_CHARS = 300
"""Character budget of a ``pydoc-names`` prompt."""

MIN_CHARS = 40
"""Cleaned docstrings shorter than this are dropped (too little to learn from)."""

NAMES_PROMPT_TEMPLATE = "{prompt}\nName:"
"""A reasonable way to format a ``pydoc-names`` example: the docstring, then ``Name:``; the model
should continue with ``" " + completion``."""

# Area -> modules, the table behind MODULE_AREAS (kept here under its old name for callers).
_AREA_MODULES = stdlib_docs._AREA_MODULES

_DATASET_NAMES: tuple[str, ...] = ("pydoc-topics", "pydoc-names")
_SPLITS: tuple[str, ...] = ("train", "validation", "test")
_SPLIT_FRACTIONS: tuple[float, float] = (0.8, 0.1)  # train, validation; test gets the rest

# A docstring line that is only a call signature: ``sin(x)``, ``D.get(k[,d]) -> D[k] if k in D``.
_SIGNATURE_LINE = re.compile(r"^[A-Za-z_][\w.]*\(.*\)\s*(->.*)?$")

@dataclass(frozen=True)
class DatasetSummary:
    """What :func:`describe` reports about one built-in dataset."""

    name: str
    task: str
    size: int
    split_sizes: dict[str, int]
    label_names: tuple[str, ...] | None
    label_counts: dict[str, int] | None
    majority_rate: float | None
    python_version: str
    builder_version: int


def builtin_dataset_names() -> tuple[str, ...]:
    """Names accepted by :func:`load_builtin_dataset`."""
    return _DATASET_NAMES


def clean_docstring(doc: str | None, max_chars: int) -> str | None:
    """Return ``doc`` cleaned and cut to at most ``max_chars`` characters, or None if too short.

    Steps: :func:`inspect.cleandoc`; leading lines that are only call signatures (and an Argument
    Clinic ``--`` separator) removed; whole paragraphs kept while they fit in ``max_chars`` (a first
    paragraph that alone is longer is cut at the last space before the budget); the result is
    stripped and must have at least :data:`MIN_CHARS` characters.
    """
    if not doc or not isinstance(doc, str):
        return None
    lines = inspect.cleandoc(doc).splitlines()
    while lines and (_SIGNATURE_LINE.match(lines[0].strip()) or lines[0].strip() in ("", "--")):
        lines.pop(0)
    paragraphs = [p.strip("\n").rstrip() for p in re.split(r"\n[ \t]*\n", "\n".join(lines)) if p.strip()]
    if not paragraphs:
        return None
    text = paragraphs[0]
    if len(text) > max_chars:
        cut = text.rfind(" ", 0, max_chars + 1)
        text = text[: cut if cut > 0 else max_chars].rstrip()
    else:
        for paragraph in paragraphs[1:]:
            candidate = f"{text}\n\n{paragraph}"
            if len(candidate) > max_chars:
                break
            text = candidate
    if len(text) < MIN_CHARS:
        return None
    return text


@lru_cache(maxsize=1)
def topic_examples() -> tuple[tuple[str, str, str], ...]:
    """``(qualname, text, area)`` for ``pydoc-topics``, sorted by qualified name, texts unique.

    A text seen under two areas is dropped everywhere; a text repeated within one area is kept once,
    under its first qualified name.
    """
    cleaned = [
        (entry.qualname, text, entry.area)
        for entry in collect_docstrings()
        if (text := clean_docstring(entry.raw_doc, TOPICS_MAX_CHARS)) is not None
    ]
    areas_per_text: dict[str, set[str]] = {}
    for _, text, area in cleaned:
        areas_per_text.setdefault(text, set()).add(area)
    kept: list[tuple[str, str, str]] = []
    emitted: set[str] = set()
    for qualname, text, area in cleaned:
        if len(areas_per_text[text]) == 1 and text not in emitted:
            emitted.add(text)
            kept.append((qualname, text, area))
    return tuple(kept)


@lru_cache(maxsize=1)
def name_examples() -> tuple[tuple[str, str], ...]:
    """``(prompt, completion)`` for ``pydoc-names``, sorted by completion; prompts that document
    more than one name are dropped."""
    cleaned = [
        (text, entry.qualname)
        for entry in collect_docstrings()
        if (text := clean_docstring(entry.raw_doc, NAMES_MAX_CHARS)) is not None
    ]
    uses = Counter(text for text, _ in cleaned)
    return tuple((text, qualname) for text, qualname in cleaned if uses[text] == 1)


def _split_indices(n: int, rng: random.Random) -> list[list[int]]:
    """Shuffle ``range(n)`` and cut it 80/10/10 (each part non-empty once ``n >= 3``)."""
    order = list(range(n))
    rng.shuffle(order)
    n_train = round(n * _SPLIT_FRACTIONS[0])
    n_val = round(n * _SPLIT_FRACTIONS[1])
    if n >= 3:
        n_val = max(n_val, 1)
        n_train = min(n_train, n - n_val - 1)
    return [order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]]


def _topics_split(seed: int) -> dict[str, list[int]]:
    """Indices into :func:`topic_examples` per split, stratified by area."""
    examples = topic_examples()
    parts: dict[str, list[int]] = {split: [] for split in _SPLITS}
    for label_id, area in enumerate(TOPIC_LABELS):
        members = [i for i, (_, _, a) in enumerate(examples) if a == area]
        rng = random.Random(f"pydoc-topics/{seed}/{label_id}")
        for split, local in zip(_SPLITS, _split_indices(len(members), rng), strict=True):
            parts[split].extend(members[i] for i in local)
    return {split: sorted(indices) for split, indices in parts.items()}


def _names_split(seed: int) -> dict[str, list[int]]:
    rng = random.Random(f"pydoc-names/{seed}")
    pieces = _split_indices(len(name_examples()), rng)
    return {split: sorted(local) for split, local in zip(_SPLITS, pieces, strict=True)}


def load_builtin_dataset(name: str, seed: int = 0) -> DatasetDict:
    """Build a built-in dataset with ``train``/``validation``/``test`` splits (80/10/10 from ``seed``).

    ``pydoc-topics`` has columns ``text`` (str) and ``label`` (ClassLabel named :data:`TOPIC_LABELS`);
    ``pydoc-names`` has ``prompt`` and ``completion`` (both str). Rows within a split are in
    qualified-name order. Raises :class:`lora_core.LoraError` for an unknown name.
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    _check_name(name)
    if name == "pydoc-topics":
        examples = topic_examples()
        features = Features({"text": Value("string"), "label": ClassLabel(names=list(TOPIC_LABELS))})
        label_id = {area: i for i, area in enumerate(TOPIC_LABELS)}
        return DatasetDict(
            {
                split: Dataset.from_dict(
                    {
                        "text": [examples[i][1] for i in indices],
                        "label": [label_id[examples[i][2]] for i in indices],
                    },
                    features=features,
                    split=split,
                )
                for split, indices in _topics_split(seed).items()
            }
        )
    pairs = name_examples()
    features = Features({"prompt": Value("string"), "completion": Value("string")})
    return DatasetDict(
        {
            split: Dataset.from_dict(
                {
                    "prompt": [pairs[i][0] for i in indices],
                    "completion": [pairs[i][1] for i in indices],
                },
                features=features,
                split=split,
            )
            for split, indices in _names_split(seed).items()
        }
    )


def describe(name: str, seed: int = 0) -> DatasetSummary:
    """Sizes, label names, counts per label and majority-class rate of a built-in dataset.

    Counts and the majority rate are over the whole dataset (all splits); ``split_sizes`` depends on
    ``seed`` only through rounding within each stratum.
    """
    _check_name(name)
    python_version = "{}.{}".format(*sys.version_info[:2])
    if name == "pydoc-topics":
        counts = Counter(area for _, _, area in topic_examples())
        total = sum(counts.values())
        return DatasetSummary(
            name=name,
            task="classification",
            size=total,
            split_sizes={split: len(ix) for split, ix in _topics_split(seed).items()},
            label_names=TOPIC_LABELS,
            label_counts={area: counts.get(area, 0) for area in TOPIC_LABELS},
            majority_rate=max(counts.values()) / total if total else 0.0,
            python_version=python_version,
            builder_version=BUILDER_VERSION,
        )
    return DatasetSummary(
        name=name,
        task="causal-lm",
        size=len(name_examples()),
        split_sizes={split: len(ix) for split, ix in _names_split(seed).items()},
        label_names=None,
        label_counts=None,
        majority_rate=None,
        python_version=python_version,
        builder_version=BUILDER_VERSION,
    )


def _check_name(name: str) -> None:
    if name not in _DATASET_NAMES:
        raise LoraError(
            f"unknown built-in dataset {name!r}",
            hint=f"choose one of: {', '.join(_DATASET_NAMES)}",
        )
