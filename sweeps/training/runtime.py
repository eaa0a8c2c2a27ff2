"""Process-level helpers of a trial: seeding every RNG a trial draws from, and reading peak memory."""

from __future__ import annotations

import random
import re
import resource
from pathlib import Path

import numpy as np
import torch


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
    does not allow it, `peak_memory` reports the process's peak since it started and says so."""
    global _peak_was_reset
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        _CLEAR_REFS.write_text("5")
        _peak_was_reset = True
    except OSError:
        _peak_was_reset = False


def peak_memory(device: torch.device) -> tuple[int, str]:
    """The peak memory since `reset_peak_memory` and what it measures: CUDA's max allocated; on a CPU the
    process's peak RSS while the trial ran (``trial_peak_rss``: what the process held then, the trial's
    model and data included), or since the process started (``process_peak_rss``) where it cannot be
    reset."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    if _peak_was_reset:
        try:
            status = Path("/proc/self/status").read_text()
            found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
            if found:
                return int(found.group(1)) * 1024, "trial_peak_rss"
        except OSError:
            pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_peak_rss"
