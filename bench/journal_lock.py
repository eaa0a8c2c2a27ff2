"""Optuna's journal lock against ours (`sweeps.journal.SafeJournalLock`) under an interrupt storm, side by
side in one run: each lock is taken and given back through Optuna's own ``get_lock_file`` for
``--seconds`` while SIGALRM raises an exception at random moments 10-300 us apart, at most once per round
(the storm of tests/test_journal_lock.py). Counted per lock: rounds done, rounds ended by the interrupt,
rounds ended by another error (Optuna's ``FileNotFoundError`` from its release's second unlink), and the
link left behind (marked as this process's, so given back at exit, or not).

    python bench/journal_lock.py --out bench/results/journal-lock-cpu-2core.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from optuna.storages.journal import JournalFileSymlinkLock
from test_journal_lock import interrupt_storm

from bench.common import emit, hardware
from sweeps.journal import SafeJournalLock


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    out: dict[str, object] = {"bench": "journal_lock", "hardware": hardware("cpu"), "seconds": args.seconds}
    for name, cls in (("optuna", JournalFileSymlinkLock), ("ours", SafeJournalLock)):
        with tempfile.TemporaryDirectory() as tmp:
            journal = os.path.join(tmp, "s.journal")
            Path(journal).touch()
            out[name] = interrupt_storm(cls(journal), args.seconds)
            out[name]["files left in the folder"] = len(os.listdir(tmp)) - 1  # type: ignore[index]
    return emit(out, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
