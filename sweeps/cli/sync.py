"""``lora-sweep sync [--home DIR]``: send MLflow writes left in a home's spool (a sweep that ended while
its tracking server was down, or a worker that died with writes unsent)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_core import LoraError


def sync(args: argparse.Namespace) -> int:
    from sweeps.tracking.sender import send_spools
    from sweeps.tracking.spool import orphan_spools, spool_dir

    if not 0 < args.timeout <= 7 * 24 * 3600:
        raise LoraError(f"--timeout must be in (0, 604800] seconds, got {args.timeout:g}",
                        hint="how long to keep sending before giving up (what is left stays on disk)")
    home = Path(args.home or "lora-sweeps").expanduser().resolve()
    if not home.is_dir():
        raise LoraError(f"no such folder: {home}", hint="pass the --home the sweep's workers used")
    found = orphan_spools(home)
    if not found:
        print(f"nothing to send: no spooled MLflow writes in {spool_dir(home)}")
        return 0
    spools, sent, left = send_spools(home, args.timeout)
    busy = len(found) - spools
    print(f"sent {sent} MLflow writes from {spools} spool(s) in {spool_dir(home)}"
          + (f"; {busy} spool(s) belong to running processes, which send them themselves" if busy else ""))
    if left:
        print(f"error: {left} writes are still unsent (is the tracking server up?); they stay in "
              f"{spool_dir(home)}; run lora-sweep sync again")
        return 1
    return 0
