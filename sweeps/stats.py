"""The one rule for "is this difference real?": the pooled seed noise and the significance threshold.

The ladder's decisions (`sweeps.engine.ladder`) and the report's recommendation for any sweep
(`dashboards.choices`) both use it, so a sweep's report and its ladder never disagree about noise:

- the seed noise is the pooled sample standard deviation ``s = sqrt(sum (n_i - 1) s_i^2 / sum (n_i - 1))``
  over every configuration run with two or more seeds (``sum (n_i - 1)`` degrees of freedom);
- a difference of seed means counts when it exceeds ``max(min_delta, z * s / sqrt(seeds))``;
- the noise band of the best configuration is every configuration whose mean is within that threshold
  of the best mean.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

DEFAULT_Z = 2.0
DEFAULT_MIN_DELTA = 0.0


def pooled_std(groups: Iterable[Sequence[float]]) -> tuple[float | None, int]:
    """The pooled seed standard deviation over the groups (one per configuration) with two or more
    values, and its degrees of freedom; ``(None, 0)`` when no group has two values."""
    ss, dof = 0.0, 0
    for values in groups:
        if len(values) >= 2:
            ss += (len(values) - 1) * statistics.stdev(values) ** 2
            dof += len(values) - 1
    return (math.sqrt(ss / dof), dof) if dof else (None, 0)


def threshold(pooled: float | None, seeds: int, z: float = DEFAULT_Z,
              min_delta: float = DEFAULT_MIN_DELTA) -> float:
    """``max(min_delta, z * pooled / sqrt(seeds))``; just ``min_delta`` when the noise is unknown."""
    noise = z * pooled / math.sqrt(seeds) if pooled is not None and seeds > 0 else 0.0
    return max(min_delta, noise)


def rule_text(z: float = DEFAULT_Z, min_delta: float = DEFAULT_MIN_DELTA) -> str:
    """The rule in words, for reports and decisions."""
    floor = f"max({min_delta:g}, " if min_delta else ""
    return (f"a difference of seed means counts when it exceeds {floor}{z:g} x pooled seed std / sqrt(seeds)"
            f"{')' if min_delta else ''}")
