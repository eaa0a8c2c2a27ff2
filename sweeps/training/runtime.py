"""Process-level helpers of a trial: seeding every RNG a trial draws from, and reading peak memory."""

from __future__ import annotations

import random
import resource

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global RNGs from ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """The peak memory so far and what it measures: CUDA's max allocated, or this process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_peak_rss"
