"""What a trial gets: :class:`PreparedData`, whose splits are read-only sequences over memory-mapped
Arrow files (:class:`ExampleRows`, :class:`TextPairs`), and :class:`PadCollator`, which pads a list of
examples into tensors.

An :class:`ExampleRows` is indexed like the list of example dicts it replaces: ``rows[i]`` is a fresh
``{"input_ids": [...], "labels": ..., ("token_type_ids": [...])}``, ``rows[a:b]`` a list of them, and
``len``, iteration and ``==`` (with another sequence of dicts) work; only the rows asked for are read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, overload

import torch

from sweeps.data.sources import SPLITS

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = ["Example", "ExampleRows", "PadCollator", "PreparedData", "TextPairs"]

_READ_BATCH = 1024  # rows per Arrow read when iterating

Example = dict[str, Any]
Row = TypeVar("Row")


class _ArrowRows(Sequence[Row]):
    """Rows of some columns of a data set (no indices mapping), one Python value per row."""

    def __init__(self, dataset: Dataset, columns: Sequence[str]) -> None:
        self._dataset = dataset
        self._names = tuple(columns)
        table = dataset.data.table
        self._columns = [table.column(name) for name in self._names]

    @property
    def dataset(self) -> Dataset:
        """The Arrow-backed :class:`datasets.Dataset` (with more columns, perhaps), for bulk reads."""
        return self._dataset

    @property
    def columns(self) -> tuple[str, ...]:
        return self._names

    def _row(self, values: list[Any]) -> Row:
        raise NotImplementedError

    def __len__(self) -> int:
        return self._dataset.num_rows

    @overload
    def __getitem__(self, index: int) -> Row: ...

    @overload
    def __getitem__(self, index: slice) -> list[Row]: ...

    def __getitem__(self, index: int | slice) -> Row | list[Row]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            return self._read(start, max(stop - start, 0))
        n = len(self)
        i = index + n if index < 0 else index
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} rows")
        return self._row([column[i].as_py() for column in self._columns])

    def _read(self, start: int, length: int) -> list[Row]:
        values = [column.slice(start, length).to_pylist() for column in self._columns]
        return [self._row(list(row)) for row in zip(*values, strict=True)]

    def __iter__(self) -> Iterator[Row]:
        for start in range(0, len(self), _READ_BATCH):
            yield from self._read(start, _READ_BATCH)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _ArrowRows) and type(other) is type(self):
            if self._names != other._names or len(self) != len(other):
                return False
            return all(a.equals(b) for a, b in zip(self._columns, other._columns, strict=True))
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} rows, columns {', '.join(self._names)})"

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self._dataset, self._names)


class ExampleRows(_ArrowRows[Example]):
    """Tokenized examples: ``{"input_ids": [...], "labels": ...}`` (+ ``token_type_ids``), each a new
    dict of new lists (changing one changes nothing else)."""

    def _row(self, values: list[Any]) -> Example:
        return dict(zip(self._names, values, strict=True))

    def lengths(self) -> list[int]:
        """``len(self[i]["input_ids"])`` for every ``i``, read from Arrow at once (no example built)."""
        import pyarrow.compute as pc

        lengths: list[int] = pc.list_value_length(self._columns[self._names.index("input_ids")]).to_pylist()
        return lengths


class TextPairs(_ArrowRows[tuple[str, str]]):
    """Causal LM: ``(prompt text, expected completion)`` per example, in split order."""

    def _row(self, values: list[Any]) -> tuple[str, str]:
        return values[0], values[1]


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
            Sequences over memory-mapped Arrow files (:class:`ExampleRows`): index them, slice them
            (a list), iterate them; ``.dataset`` is the Arrow-backed ``datasets.Dataset``.
        collate: Pads a list of examples into tensors (:class:`PadCollator`).
        label_names: Class names by id (classification), else None.
        num_labels: ``len(label_names)`` (classification), else None.
        majority_rate: Validation accuracy of always predicting the most frequent train label.
        generation: Causal LM: split -> ``(prompt text, expected completion)`` in split order
            (:class:`TextPairs`); else {}.
        source: Where the data came from, in words.
        fingerprint: sha256 of the raw rows, the tokenizer's identity and the tokenization settings.
    """

    task: str
    train: ExampleRows = field(repr=False)
    validation: ExampleRows = field(repr=False)
    test: ExampleRows = field(repr=False)
    collate: Callable[[list[Example]], dict[str, torch.Tensor]] = field(repr=False)
    label_names: list[str] | None
    num_labels: int | None
    majority_rate: float | None
    generation: dict[str, TextPairs] = field(repr=False)
    source: str
    fingerprint: str

    def sizes(self) -> dict[str, int]:
        return {split: len(getattr(self, split)) for split in SPLITS}
