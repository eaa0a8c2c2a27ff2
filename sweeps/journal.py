"""The Optuna journal file, behind a lock that an interruption cannot take from another process.

Optuna's own lock for the journal file (``JournalFileSymlinkLock``) answers any exception raised while it
waits for the lock by releasing the lock: the lock that another process holds. Ctrl-C, or the SIGTERM that
``sweeps.api.interrupt`` turns into an exception, arriving while a sweep waits on a journal that another
worker (or ``lora-sweep status``) is reading or writing, so removes that process's lock: two processes then
write the journal at once, and the holder's own release fails ("did not possess lock") and ends it.

`SafeJournalLock` waits the same way but gives back only a lock it holds. It uses the same lock file (the
journal's path + ``.lock``, a symbolic link made atomically), so it and Optuna's lock still exclude each
other when a plain Optuna process shares the journal; a lock left behind by a process that died holding it
is broken, as Optuna's is, once the journal has not changed for ``grace_period`` seconds.
"""
from __future__ import annotations

import atexit
import logging
import os
import time
import uuid
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"    # the name Optuna's lock gives the same file: both exclude each other
MAX_WAIT_S = 0.1         # the longest sleep between tries (Optuna's lock backs off to 1 s)
# The locks this process took (held strongly: a storage dropped while its lock is held must not take the
# lock out of `_give_back_at_exit`'s reach); one leaves when it is given back.
_TAKEN: set[SafeJournalLock] = set()


class SafeJournalLock(JournalFileSymlinkLock):
    """A lock on one journal file across processes and threads: a symbolic link ``<journal>.lock``.
    (A subclass of Optuna's public lock only for its type: both of its methods are replaced.)"""

    def __init__(self, journal: str, grace_period: int | None = 30) -> None:  # (Optuna's __init__ is not called)
        self.target = journal
        self.link = journal + LOCK_SUFFIX
        self.grace_period = grace_period
        self.held = 0  # the pid of this process while it holds the lock (a forked child inherits the object)

    def acquire(self) -> bool:
        """Wait until the lock is ours. An exception raised while waiting (KeyboardInterrupt, Terminated)
        leaves the lock with whoever holds it; one raised just after the link was made gives it back."""
        wait = 0.001
        changed: tuple[float, float] | None = None  # (the journal's mtime, when it was first seen)
        while True:
            try:
                os.symlink(self.target, self.link)
                self.held = os.getpid()
                _TAKEN.add(self)
                return True
            except FileExistsError:
                pass  # held: an exception raised from here on leaves it with its holder
            except OSError:
                raise
            except BaseException:  # an interrupt handled just after the link was made: the lock is ours
                self._remove(mine=True)  # (held cleared first: the at-exit hook must not remove a later holder's)
                raise
            if self.grace_period is not None:
                try:
                    mtime = os.stat(self.link).st_mtime  # follows the link: the journal's last change
                except OSError:
                    continue  # released (or broken) meanwhile: try again at once
                now = time.monotonic()
                if changed is None or changed[0] != mtime:
                    changed = (mtime, now)
                elif now - changed[1] > self.grace_period:
                    log.warning("the lock %s was held for over %.0f s with no change to the journal: "
                                "breaking it (its holder is taken to have died)", self.link, self.grace_period)
                    self._remove()
                    changed = None
                    continue
            time.sleep(wait)
            wait = min(wait * 2, MAX_WAIT_S)

    def release(self) -> None:
        """Give the lock back. The link is renamed to a name of our own before it is removed, so two
        processes breaking one stale lock remove it once, never a lock taken again meanwhile."""
        if not self._remove(mine=True):
            raise RuntimeError(f"the journal lock {self.link} was not held")

    def _remove(self, mine: bool = False) -> bool:
        """Remove the link; False if there was none. Between ``held = 0`` and the rename, and between the
        rename and the unlink, there are only C calls, where CPython handles no signal: an interrupt cannot
        leave the link behind with ``held`` cleared, nor the renamed file."""
        aside = f"{self.link}.{uuid.uuid4().hex}.released"
        if mine:
            self.held = 0  # before the rename: `_give_back_at_exit` never removes a lock taken since
        try:
            os.rename(self.link, aside)
        except FileNotFoundError:
            return False
        finally:
            try:  # noqa: SIM105 (contextlib.suppress would run Python code, where a signal is handled, first)
                os.unlink(aside)
            except FileNotFoundError:
                pass
            if mine:
                _TAKEN.discard(self)  # (held is already 0: `_give_back_at_exit` skips it either way)
        return True


@atexit.register
def _give_back_at_exit() -> None:
    """A lock this process still holds as it exits: an interrupt was handled between Optuna taking the lock
    and entering the block that gives it back (``get_lock_file``). Given back here rather than left to
    stall other workers, and the sweep's next resume, for the grace period."""
    for lock in list(_TAKEN):
        if lock.held == os.getpid():
            lock.held = 0
            lock._remove()


def journal_storage(path: Path | str) -> optuna.storages.JournalStorage:
    """Optuna's storage on the journal file ``path``, behind `SafeJournalLock`."""
    return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=SafeJournalLock(str(path))))
