"""Arrow plumbing shared by the data modules: a split as a zero-copy view of a source table
(:class:`RoleSplit`), and calling ``datasets`` quietly and without needless copies or hashing.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = ["RoleSplit", "arrow_table", "dataset_of", "quiet_datasets", "release_arrow_memory"]


@dataclass(frozen=True)
class RoleSplit:
    """The role columns of one split: text roles in an Arrow table over the source's (zero-copy),
    the split's rows of it (``indices``, sorted; None: all of them), and class labels as a list, one
    per row of the split."""

    table: pa.Table
    labels: list[Any] | None
    indices: np.ndarray | None = None

    def __len__(self) -> int:
        return self.table.num_rows if self.indices is None else len(self.indices)

    def take(self, positions: list[int]) -> RoleSplit:
        """The split's rows at ``positions`` (sorted: source order kept); nothing is copied."""
        labels = [self.labels[i] for i in positions] if self.labels is not None else None
        chosen = np.asarray(positions, dtype=np.int64)
        return RoleSplit(self.table, labels, chosen if self.indices is None else self.indices[chosen])

    def batches(self, size: int) -> Iterator[pa.Table]:
        """The split's rows as Arrow tables of up to ``size`` rows, in order (each gathered from a
        window of the source: cheap whatever its chunks)."""
        if self.indices is None:
            for start in range(0, self.table.num_rows, size):
                yield self.table.slice(start, size)
            return
        for start in range(0, len(self.indices), size):
            window = self.indices[start:start + size]
            low = int(window[0])
            yield self.table.slice(low, int(window[-1]) - low + 1).take(pa.array(window - low))


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """No ``datasets`` progress bars or log messages inside (its errors are raised to us, and handled
    or reworded); both restored afterwards."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from datasets.utils import logging as hf_logging

    was_disabled, verbosity = are_progress_bars_disabled(), hf_logging.get_verbosity()
    disable_progress_bars()
    hf_logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if not was_disabled:
            enable_progress_bars()


def release_arrow_memory() -> None:
    """Give memory Arrow's allocator kept after a big read or write back to the system."""
    pa.default_memory_pool().release_unused()


def arrow_table(rows: Dataset) -> pa.Table:
    """The rows as one Arrow table (zero-copy unless the data set has an indices mapping)."""
    table = rows.with_format("arrow")[:]
    assert isinstance(table, pa.Table)
    return table


def dataset_of(table: pa.Table) -> Dataset:
    """A :class:`datasets.Dataset` over an Arrow table whose buffers may be memory-mapped. Its
    fingerprint is random (``datasets`` would otherwise hash the whole table to make one; nothing
    relies on ``datasets``' own caching of these)."""
    from datasets import Dataset
    from datasets.table import InMemoryTable

    return Dataset(InMemoryTable(table), fingerprint=uuid.uuid4().hex)
