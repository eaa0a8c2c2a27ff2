"""The journal's lock (sweeps.journal): an interrupted wait takes nothing from the holder; it
excludes Optuna's own lock on the same journal; a lock left by a dead process is broken after the grace
period; many processes appending through it lose no trial."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages.journal import JournalFileSymlinkLock

from sweeps.journal import SafeJournalLock, journal_storage


class Interrupted(Exception):
    pass


def _raise(signum: int, frame: object) -> None:
    raise Interrupted


def test_an_interrupted_wait_leaves_the_holders_lock(tmp_path: Path) -> None:
    """Ctrl-C or SIGTERM (an exception raised in the main thread) while waiting for a lock another
    process holds: the lock stays the holder's, and the holder's release works."""
    journal = tmp_path / "s.journal"
    journal.touch()
    holder = SafeJournalLock(str(journal))
    assert holder.acquire()
    waiter = SafeJournalLock(str(journal))
    old = signal.signal(signal.SIGALRM, _raise)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(Interrupted):
            waiter.acquire()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert os.path.islink(holder.link)  # still held
    holder.release()                     # and still the holder's to give back
    assert not os.path.lexists(holder.link)
    with pytest.raises(RuntimeError, match="was not held"):
        holder.release()


def test_it_excludes_optunas_own_lock_on_the_same_journal(tmp_path: Path) -> None:
    journal = tmp_path / "s.journal"
    journal.touch()
    theirs = JournalFileSymlinkLock(str(journal))
    assert theirs.acquire()
    got = threading.Event()
    ours = SafeJournalLock(str(journal))

    def take() -> None:
        ours.acquire()
        got.set()

    waiter = threading.Thread(target=take)
    waiter.start()
    assert not got.wait(0.5), "took a lock Optuna's lock held"
    theirs.release()
    assert got.wait(5.0), "never got the lock once it was free"
    waiter.join()
    ours.release()


def test_a_lock_left_by_a_dead_process_is_broken_after_the_grace_period(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    journal = tmp_path / "s.journal"
    journal.touch()
    os.symlink(str(journal), str(journal) + ".lock")  # what a process killed while holding it leaves
    lock = SafeJournalLock(str(journal), grace_period=1)
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="sweeps.journal"):
        assert lock.acquire()
    waited = time.monotonic() - started
    assert 1.0 <= waited < 10.0, waited
    assert "breaking it" in caplog.text
    lock.release()


def interrupt_storm(lock: JournalFileSymlinkLock, seconds: float) -> dict[str, int]:
    """Take and give back ``lock`` through Optuna's own ``get_lock_file`` (as the journal does) while
    SIGALRM, at random moments 10-300 us apart, raises an exception at most once per round (as a Ctrl-C
    or SIGTERM would).
    Counts each round's outcome, and how often the link was left behind (and whether by this process)."""
    from optuna.storages.journal._file import get_lock_file

    armed = False
    counts = {"ok": 0, "interrupted": 0, "other error": 0, "left held (ours)": 0, "left held (not ours)": 0}

    rng = random.Random(0)

    def once(signum: int, frame: object) -> None:
        nonlocal armed
        signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-5, 3e-4))
        if armed:
            armed = False
            raise Interrupted

    old = signal.signal(signal.SIGALRM, once)
    signal.setitimer(signal.ITIMER_REAL, 1e-4)
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                armed = True
                with get_lock_file(lock):
                    pass
                armed = False
                counts["ok"] += 1
            except Interrupted:
                counts["interrupted"] += 1
            except BaseException:  # what Optuna's lock raises instead: counted
                armed = False
                counts["other error"] += 1
            if os.path.lexists(lock_link(lock)):
                ours = isinstance(lock, SafeJournalLock) and lock.held == os.getpid()
                counts["left held (ours)" if ours else "left held (not ours)"] += 1
                lock.release() if ours else os.unlink(lock_link(lock))  # only the storm's own lock
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return counts


def lock_link(lock: JournalFileSymlinkLock) -> str:
    return lock.link if isinstance(lock, SafeJournalLock) else lock._lock_file


def test_an_interrupt_anywhere_raises_itself_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """Two seconds of interrupts at every point of taking and giving back the lock: each round ends
    either done or with the interrupt itself (Optuna's lock raises FileNotFoundError instead when the
    interrupt lands in its release; bench/journal_lock.py); a link left behind (the interrupt landed
    between Optuna taking the lock and entering its ``try``) is always marked as this process's, so
    it is given back at exit; no renamed file is left in the directory."""
    path = tmp_path / "s.journal"
    path.touch()
    counts = interrupt_storm(SafeJournalLock(str(path)), seconds=2.0)
    assert counts["interrupted"] >= 50 and counts["ok"] >= 50, counts  # the storm did land
    assert counts["other error"] == 0 and counts["left held (not ours)"] == 0, counts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.journal"]


def test_a_lock_still_held_at_exit_is_given_back(tmp_path: Path) -> None:
    """A process that exits holding the lock (an interrupt between Optuna taking it and entering the block
    that gives it back) leaves no link behind for the other workers to wait out."""
    journal = tmp_path / "s.journal"
    journal.touch()
    code = "import sys; from sweeps.journal import SafeJournalLock; assert SafeJournalLock(sys.argv[1]).acquire()"
    subprocess.run([sys.executable, "-c", code, str(journal)], check=True, timeout=120)
    assert not os.path.lexists(str(journal) + ".lock")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.journal"]


WORKER = """
import sys, optuna
from sweeps.journal import journal_storage
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.load_study(study_name="s", storage=journal_storage(sys.argv[1]))
study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=int(sys.argv[2]))
"""


def test_processes_appending_through_it_lose_no_trial(tmp_path: Path) -> None:
    """Three processes add 15 trials each to one journal: 45 complete trials, numbered 0-44 once each."""
    journal = tmp_path / "s.journal"
    optuna.create_study(study_name="s", storage=journal_storage(journal))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(journal), "15"], stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    trials = optuna.load_study(study_name="s", storage=journal_storage(journal)).trials
    assert sorted(t.number for t in trials) == list(range(45))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert not os.path.lexists(str(journal) + ".lock")
