"""``lora-sweep export``: a trial's adapter as a checked PEFT directory with a model card.

    $ lora-sweep export my-sweep.yaml --out best-adapter            # the best trial
    $ lora-sweep export my-sweep --home runs --trial 3 --out t3 --merged --register my-lora

The command names the sweep (a YAML or the name of a sweep already run, with ``--home``/``--storage``/
``--set``) and prints the export's progress on stdout, through the Python API's ``Sweep.export``; what
export checks and writes is :mod:`sweeps.export.exporter`. Any failure is a ``LoraError`` (exit 2) and
nothing is written to ``--out``.
"""

from __future__ import annotations

import argparse

from sweeps.cli.stored import resolve_args

__all__ = ["export"]


def export(args: argparse.Namespace) -> int:
    """``lora-sweep export SWEEP --out DIR [--trial N] [--merged] [--register NAME]``: 0, or LoraError (exit 2)."""
    from sweeps.api.sweep import Sweep

    config = resolve_args(args)  # a stored config checked here (--trust-stored-config)
    Sweep(config).export(args.out, trial=args.trial, merged=args.merged, register=args.register, echo=True)
    return 0
