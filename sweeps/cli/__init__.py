"""The ``lora-sweep`` command line: every command's argument parsing, printing and exit code, built on the
Python API (`sweeps.api`); with it, the only part of ``sweeps`` that imports ``dashboards``."""

from sweeps.cli.main import main

__all__ = ["main"]
