"""Process-level helpers of a trial: seeding every RNG a trial draws from, and reading peak memory."""

from __future__ import annotations

import gc
import random
import re
import resource
from pathlib import Path

import numpy as np
import torch

from sweeps.training.memory import trim_host_memory


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global RNGs from ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


_CLEAR_REFS = Path("/proc/self/clear_refs")
_peak_was_reset = False


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak-memory counter again from what is held now (before a trial trains).

    CUDA: the allocator's peak. CPU: the kernel's peak resident set size of this process (Linux
    ``/proc/self/clear_refs`` 5), so that a trial run after others in the same process (a sweep worker,
    ``plan``'s probes) reports its own peak, not the largest of any trial before it. Where the kernel
    does not allow it, `peak_memory` reports the process's peak since it started and says so.

    On a CPU the counter starts from what is *live*: unreachable objects are collected and the heap's free
    memory is given back to the kernel first (`trim_host_memory`). Otherwise the trial's allocations could
    be served from pages the process still held (its peak would not grow with them), and the garbage of
    earlier work, collected while the trial ran, would shrink the resident set under it (a test that
    allocated 64 MiB after a reset saw no growth at all, in a process that had run 400 tests first)."""
    global _peak_was_reset
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    gc.collect()
    trim_host_memory()
    try:
        _CLEAR_REFS.write_text("5")
        _peak_was_reset = True
    except OSError:
        _peak_was_reset = False


def _status_kib(field: str) -> int | None:
    try:
        found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(found.group(1)) if found else None


def resident_memory() -> int | None:
    """This process's resident set size now, in bytes (Linux ``VmRSS``; None elsewhere)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_memory(device: torch.device) -> tuple[int, str]:
    """The peak memory since `reset_peak_memory` and what it measures: CUDA's max allocated; on a CPU the
    process's peak RSS while the trial ran (``trial_peak_rss``: what the process held then, the trial's
    model and data included), or since the process started (``process_peak_rss``) where it cannot be
    reset."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    if _peak_was_reset:
        kib = _status_kib("VmHWM")
        if kib is not None:
            return kib * 1024, "trial_peak_rss"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_peak_rss"
