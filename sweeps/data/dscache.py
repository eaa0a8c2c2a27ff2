"""Bounds on ``<cache>/datasets``: the Arrow copies of local data files (one per file path, size and mtime).

Every change to a data file adds an entry, so the folder is pruned each time a file is read: an entry
unused for :data:`MAX_AGE_DAYS` days goes, and then the least recently used go until the folder holds at
most :data:`MAX_BYTES`. An entry used in the last :data:`GRACE_S` seconds is never removed (another process
may be writing or reading it), nor the ones the caller is about to use. Using an entry touches it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ["GRACE_S", "MAX_AGE_DAYS", "MAX_BYTES", "prune_datasets_cache"]

MAX_AGE_DAYS = 30
MAX_BYTES = 2 << 30      # 2 GiB
GRACE_S = 3600.0

logger = logging.getLogger(__name__)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / name).stat().st_size
    return total


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def prune_datasets_cache(folder: Path, keep: Iterable[str] = (), *, max_bytes: int = MAX_BYTES,
                         max_age_days: float = MAX_AGE_DAYS, now: float | None = None) -> list[str]:
    """Prune ``folder`` (see the module docstring); ``keep``: entry names in use now (touched, never
    removed). Returns the names removed."""
    if not folder.is_dir():
        return []
    now = time.time() if now is None else now
    keep = set(keep)
    entries = []
    for entry in folder.iterdir():
        if entry.name in keep:
            with contextlib.suppress(OSError):
                os.utime(entry)
            continue
        with contextlib.suppress(OSError):
            entries.append((entry.stat().st_mtime, entry))
    entries.sort()
    removed: list[str] = []
    left = []
    for mtime, entry in entries:
        if now - mtime > max_age_days * 86400 and now - mtime > GRACE_S:
            _remove(entry)
            removed.append(entry.name)
        else:
            left.append((mtime, entry, _size(entry)))
    total = sum(size for *_, size in left) + sum(_size(folder / name) for name in keep if (folder / name).exists())
    for mtime, entry, size in left:  # least recently used first
        if total <= max_bytes:
            break
        if now - mtime <= GRACE_S:
            continue
        _remove(entry)
        removed.append(entry.name)
        total -= size
    if removed:
        logger.info("pruned %d old entries from the data cache %s", len(removed), folder)
    return removed
