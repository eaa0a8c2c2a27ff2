"""A durable, ordered spool of MLflow writes: what a worker logs survives a tracking server that is down.

Every write a sweep worker makes to a remote tracking store (``tracking.uri`` of a server) is first
appended to a spool on local disk, ``<home>/spool/<host>-<pid>-<key>.sqlite`` (SQLite in WAL mode with
``synchronous=FULL``, so an appended write survives a crash of the process; artifact files are copied
beside it, under ``<name>.files/``), and a sender thread delivers the spool to the server in order.
While the server is unreachable training goes on, the spool grows, and the sender retries with a
backoff (one line when the server goes away, one when it is back); when it returns, the spool is
replayed in order with the writes' own times (a run that ended during the outage ends with its true
status and end time).

Run ids: the server names a run when it creates it. A run created while the spool is empty and the
server is up gets its real id at once. Otherwise the spool hands out a provisional id
(``spooled-<key>``) and tags the run ``lora_sweep.run_key=<key>``; the sender maps the provisional id
to the real one when it creates the run, in every later write (run ids and tag values such as
``mlflow.parentRunId``). Readers that meet a provisional id (in the Optuna study, where it was stored
when the trial started) resolve it with :func:`resolve_run_id`, by the tag.

Exactly once: a write whose reply was lost (the connection dropped mid-request, or the process died
after sending) may have been applied. Before sending such a write again the sender checks: a run is
looked up by its key before it is created again, and metric points already in the run's history are
left out. Params, tags, status and artifacts are idempotent.

Ownership: a spool file is locked (``flock``) by the process that writes it. A spool whose process
died (a worker killed with writes unsent) is adopted by the next process that opens a spool in the
same home, and replayed before its own writes; ``lora-sweep sync --home DIR`` sends what is left
without running anything. An empty spool is deleted when its process ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeps.secrets import private_file, strip_credentials, with_env_credentials
from sweeps.text import first_line, mask_text

log = logging.getLogger(__name__)

PROVISIONAL_PREFIX = "spooled-"
RUN_KEY_TAG = "lora_sweep.run_key"
PARENT_RUN_TAG = "mlflow.parentRunId"
SPOOL_DIR = "spool"

# MLflow error codes that no retry can fix: the write is set aside (kept in the spool's ``dead`` table)
PERMANENT_CODES = frozenset({"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "PERMISSION_DENIED",
                             "UNAUTHENTICATED", "RESOURCE_ALREADY_EXISTS", "MALFORMED_REQUEST"})
PERMANENT_TRIES = 3
BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 15.0)

_SCHEMA = """
create table if not exists ops (seq integer primary key autoincrement, op text not null, args text not null,
                                files text, tries integer not null default 0, maybe_sent integer not null default 0);
create table if not exists ids (key text primary key, run_id text not null);
create table if not exists meta (key text primary key, value text not null);
create table if not exists dead (seq integer primary key, op text not null, args text not null, files text,
                                 error text not null);
"""


def spool_dir(home: Path) -> Path:
    return home / SPOOL_DIR


def is_provisional(run_id: str | None) -> bool:
    return bool(run_id) and str(run_id).startswith(PROVISIONAL_PREFIX)


@dataclass
class Op:
    seq: int
    op: str
    args: dict[str, Any]
    files: str | None
    tries: int
    maybe_sent: bool


class Spool:
    """One process's spool file: append writes, read them back in order, mark them sent. Thread-safe."""

    def __init__(self, path: Path, uri: str | None = None) -> None:
        self.path = path
        self.files_root = path.with_suffix(".files")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        private_file(path)  # SQLite gives its -wal and -shm files the database file's mode
        self._lock_file = open(path.with_suffix(".lock"), "a+")  # noqa: SIM115 (held for the spool's life)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise
        self._mutex = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("pragma journal_mode=wal")
        self._db.execute("pragma synchronous=full")
        self._db.executescript(_SCHEMA)
        if uri is not None:  # stored without its credentials; this process keeps them in memory
            self.set_meta("uri", strip_credentials(uri) or uri)
        self.connect_uri = uri if uri is not None else (with_env_credentials(self.uri) or self.uri)
        self.closed = False

    @classmethod
    def create(cls, home: Path, uri: str) -> Spool:
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.sqlite"
        return cls(spool_dir(home) / name, uri)

    @classmethod
    def adopt(cls, path: Path) -> Spool | None:
        """A spool whose writer is gone (its lock is free), now owned by this process; None if it is alive."""
        try:
            spool = cls(path)
        except BlockingIOError:
            return None
        with spool._mutex:  # its first write may have reached the server before its writer died
            spool._db.execute("update ops set maybe_sent = 1 where seq = (select min(seq) from ops)")
        return spool

    # ------------------------------------------------------------------ meta and ids
    def meta(self, key: str) -> str | None:
        with self._mutex:
            row = self._db.execute("select value from meta where key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._mutex:
            self._db.execute("insert or replace into meta (key, value) values (?, ?)", (key, value))

    @property
    def uri(self) -> str:
        """The tracking server's URI as stored (no credentials); :attr:`connect_uri` is the one to send to."""
        return self.meta("uri") or ""

    def real_id(self, run_id: str) -> str | None:
        if not is_provisional(run_id):
            return run_id
        with self._mutex:
            row = self._db.execute("select run_id from ids where key = ?",
                                   (run_id[len(PROVISIONAL_PREFIX):],)).fetchone()
        return None if row is None else str(row[0])

    def map_id(self, key: str, run_id: str) -> None:
        with self._mutex:
            self._db.execute("insert or replace into ids (key, run_id) values (?, ?)", (key, run_id))

    # ------------------------------------------------------------------ the queue
    def append(self, op: str, args: dict[str, Any], files: Path | None = None) -> int:
        """Add a write (with ``files``: a folder to send, moved into the spool first). Durable on return."""
        stored = None
        if files is not None:
            stored = f"{uuid.uuid4().hex}"
            dest = self.files_root / stored
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(files), str(dest))
        with self._mutex:
            cur = self._db.execute("insert into ops (op, args, files) values (?, ?, ?)",
                                   (op, json.dumps(args), stored))
            return int(cur.lastrowid or 0)

    def head(self) -> Op | None:
        with self._mutex:
            row = self._db.execute("select seq, op, args, files, tries, maybe_sent from ops order by seq limit 1"
                                   ).fetchone()
        if row is None:
            return None
        return Op(int(row[0]), str(row[1]), json.loads(row[2]), row[3], int(row[4]), bool(row[5]))

    def ops(self, kind: str) -> list[Op]:
        """The writes of one kind still in the spool, in order."""
        with self._mutex:
            rows = self._db.execute("select seq, op, args, files, tries, maybe_sent from ops where op = ? "
                                    "order by seq", (kind,)).fetchall()
        return [Op(int(r[0]), str(r[1]), json.loads(r[2]), r[3], int(r[4]), bool(r[5])) for r in rows]

    def files_of(self, op: Op) -> Path | None:
        return None if op.files is None else self.files_root / op.files

    def done(self, op: Op) -> None:
        with self._mutex:
            self._db.execute("delete from ops where seq = ?", (op.seq,))
        if op.files:
            shutil.rmtree(self.files_root / op.files, ignore_errors=True)

    def failed(self, op: Op, maybe_sent: bool) -> int:
        """Count a failed attempt; returns the attempts so far."""
        with self._mutex:
            self._db.execute("update ops set tries = tries + 1, maybe_sent = max(maybe_sent, ?) where seq = ?",
                             (int(maybe_sent), op.seq))
        return op.tries + 1

    def bury(self, op: Op, error: str) -> None:
        """Set a write no retry can deliver aside (kept on disk in the ``dead`` table, files kept)."""
        with self._mutex:
            self._db.execute("insert or replace into dead (seq, op, args, files, error) values (?, ?, ?, ?, ?)",
                             (op.seq, op.op, json.dumps(op.args), op.files, mask_text(error)))
            self._db.execute("delete from ops where seq = ?", (op.seq,))

    def pending(self) -> int:
        with self._mutex:
            return int(self._db.execute("select count(*) from ops").fetchone()[0])

    def buried(self) -> int:
        with self._mutex:
            return int(self._db.execute("select count(*) from dead").fetchone()[0])

    def close(self, remove_if_empty: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        empty = self.pending() == 0 and self.buried() == 0
        with self._mutex:
            self._db.close()
        if empty and remove_if_empty:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{self.path}{suffix}")
            shutil.rmtree(self.files_root, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path.with_suffix(".lock"))
        self._lock_file.close()


def orphan_spools(home: Path) -> list[Path]:
    """Spool files in ``home`` (those of live processes included; :meth:`Spool.adopt` tells them apart)."""
    return sorted(spool_dir(home).glob("*.sqlite"), key=lambda p: p.stat().st_mtime)


# --------------------------------------------------------------------------- errors

def _chain(exc: BaseException) -> list[BaseException]:
    out, seen = [], set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def classify(exc: BaseException) -> tuple[bool, bool]:
    """``(permanent, maybe_applied)`` for a failed send. Connection refused: not applied; a lost reply
    or a timeout: maybe applied; an MLflow error code no retry can fix: permanent."""
    code = str(getattr(exc, "error_code", "") or "")
    if code in PERMANENT_CODES:
        return True, False
    text = " ".join(str(e) for e in _chain(exc))
    refused = any(isinstance(e, ConnectionRefusedError) for e in _chain(exc)) or "Connection refused" in text \
        or "Failed to establish a new connection" in text
    return False, not refused


# --------------------------------------------------------------------------- reading provisional ids

def resolve_run_id(client: Any, run_id: str | None, experiment_ids: list[str]) -> str | None:
    """A run id as the server knows it: a provisional id (``spooled-<key>``) is looked up by its
    ``lora_sweep.run_key`` tag; None while its run has not reached the server."""
    if not run_id or not is_provisional(run_id):
        return run_id
    key = run_id[len(PROVISIONAL_PREFIX):]
    runs = client.search_runs(experiment_ids, filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1)
    return runs[0].info.run_id if runs else None


def wait_for(predicate: Any, timeout_s: float, poll_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def describe(exc: BaseException) -> str:
    return first_line(exc, 200) or type(exc).__name__
