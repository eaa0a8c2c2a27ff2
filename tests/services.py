"""Real services that tests start and stop themselves: a private PostgreSQL cluster (``initdb`` and
``pg_ctl`` on a free port in a temporary folder, so that a test may stop and restart it) and an
``mlflow server`` process (on a fixed port across restarts, so that clients see an outage, not a move).

Both are plain classes (no pytest import) so that fixtures in several test modules share them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from support import free_port


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / name).exists():
            return str(root / name)
    raise RuntimeError(f"PostgreSQL's {name} not found (Debian: apt-get install postgresql)")


def _as_postgres(cmd: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: run them as the ``postgres`` user then."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


class PrivatePostgres:
    """A PostgreSQL cluster of its own, started on creation: ``start``, ``stop`` (fast shutdown: clients lose their
    connections) and ``restart`` keep the same port and data."""

    def __init__(self, max_connections: int = 100) -> None:
        # its own folder under the system temp dir: pytest's tmp_path is private to root, and the server
        # runs as ``postgres`` when the tests run as root
        self.root = root = Path(tempfile.mkdtemp(prefix="lora-sweep-pg-"))
        self.data = root / "pgdata"
        self.sock = root / "sock"
        self.log = root / "postgres.log"
        self.port = free_port()
        self.max_connections = max_connections
        self.sock.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(root, "postgres")
            shutil.chown(self.sock, "postgres")
            os.chmod(root, 0o755)
        subprocess.run(_as_postgres([_pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                                     "--no-sync", "-E", "UTF8"]),
                       check=True, capture_output=True, timeout=300)
        self.start()

    def url(self, db: str = "postgres", driver: str = "") -> str:
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://postgres@127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.sock} "
                f"-c max_connections={self.max_connections} -c fsync=off -c full_page_writes=off")
        subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts,
                                     "-w", "-t", "120", "start"]),
                       check=True, capture_output=True, timeout=180)

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "120",
                                     "stop"]),
                       check=False, capture_output=True, timeout=180)

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_database(self, name: str) -> str:
        subprocess.run([_pg_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d",
                        "postgres", "-v", "ON_ERROR_STOP=1", "-c", f'CREATE DATABASE "{name}"'],
                       check=True, capture_output=True, timeout=60)
        return self.url(name)

    def query(self, sql: str, db: str = "postgres") -> str:
        out = subprocess.run([_pg_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", db,
                              "-At", "-v", "ON_ERROR_STOP=1", "-c", sql],
                             check=True, capture_output=True, text=True, timeout=60)
        return out.stdout.strip()

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def server_env() -> dict[str, str]:
    """The environment of a test's ``mlflow server``: no GenAI job runners (MLflow 3 starts a huey
    consumer per job type by default: 10 processes instead of 2, and twice the start-up time here)."""
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}


class MlflowServer:
    """``mlflow server`` as users start it: a backend store URI and ``--artifacts-destination`` (so
    clients upload artifacts through the server). ``stop`` kills it (SIGKILL, its whole process group),
    ``start`` brings it back on the same port."""

    def __init__(self, root: Path, backend_store_uri: str, workers: int = 1) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.backend = backend_store_uri
        self.artifacts = root / "server-artifacts"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout_s: float = 600.0) -> None:
        self.starts += 1
        log = self.root / f"server-{self.starts}.log"
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", self.backend, "--artifacts-destination", str(self.artifacts),
               "--workers", str(self.workers)]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=self.root,
                                         start_new_session=True, env=server_env())
        deadline = time.monotonic() + timeout_s  # bounds a hang only: ready as soon as /health answers
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{log.read_text()[-4000:]}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError, OSError), \
                    urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer /health in {timeout_s:.0f} s:\n"
                                   f"{log.read_text()[-4000:]}")
            time.sleep(0.25)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.root.glob("server-*.log")))
