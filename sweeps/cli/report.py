"""``lora-sweep report SWEEP [--out FILE.html] [--compare OTHER ...]``: one self-contained HTML report.

The command names the sweeps (a YAML or the name of a sweep already run, with ``--home``/``--storage``/
``--set``; each at most once), and prints where the report was written and the MLflow run it was
logged to; a report that could not be logged is a warning on stderr, not an error. What the report
shows and how it is written is :mod:`dashboards.report`.
"""

from __future__ import annotations

import argparse
import sys

from lora_core import LoraError
from sweeps.cli.stored import resolve_ref
from sweeps.config.sweep import SweepConfig

__all__ = ["report"]


def _warn_not_logged(why: str) -> None:
    print(f"warning: the report is not logged to MLflow: {why}", file=sys.stderr)


def report(args: argparse.Namespace) -> int:
    """``lora-sweep report``: 0, or LoraError (exit 2)."""
    from dashboards.report import build

    def resolve(ref: str) -> SweepConfig:
        return resolve_ref(args, ref)

    config = resolve(args.sweep)
    compare = [resolve(ref) for ref in (args.compare or [])]
    names = [config.name, *(c.name for c in compare)]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LoraError(f"sweep {dupes[0]!r} is named more than once", hint="name each sweep once")
    build(config, args.out, compare, log_to_mlflow=True, echo=print, warn=_warn_not_logged,
          force=bool(getattr(args, "force", False)))
    return 0
