"""The ``lora-sweep`` command line: every command, and the only part of ``sweeps`` that imports ``dashboards``."""

from sweeps.cli.main import main

__all__ = ["main"]
