"""Local CPU workers forked from a preloaded forkserver (sweeps.engine.forked) behave as fresh processes:
their own environment, output relayed line by line, exit code, pid and random states, and Ctrl-C.

The workers here run a small entry function of this module instead of ``lora-sweep worker`` (the real
workers run in test_workers.py, test_db_faults.py and test_sweep.py); the forkserver preloads nothing
heavy unless another test of this process started it first.
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Iterator

import pytest

from sweeps.engine import forked
from sweeps.engine.workers import worker_line


def _entry(argv: list[str]) -> int:
    """Print what a fresh process would differ in, then exit with argv[0] (or wait for Ctrl-C)."""
    import numpy

    print(f"x={os.environ.get('FORKED_TEST_X')} pid={os.getpid()} py={random.random():.12f} "
          f"np={numpy.random.random():.12f}")
    print("to stderr", file=sys.stderr)
    if argv[0] == "wait":
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            print("interrupted")
            return 130
    return int(argv[0])


@pytest.fixture
def light_forkserver(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(forked, "PRELOAD", ["numpy"])
    yield


def _wait(worker: forked.ForkedWorker, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while (code := worker.poll()) is None:
        assert time.monotonic() < deadline, "the forked worker did not end"
        time.sleep(0.05)
    return code


def test_forked_workers_have_their_own_env_output_exit_code_pid_and_random_state(light_forkserver: None) -> None:
    lines: list[str] = []
    env = {k: v for k, v in os.environ.items() if k != "FORKED_TEST_X"}
    workers = [forked.ForkedWorker([str(code)], {**env, "FORKED_TEST_X": str(i)}, f"{i}/2", lines.append,
                                   worker_line, entry=f"{__name__}:_entry") for i, code in ((1, 0), (2, 3))]
    assert [_wait(w) for w in workers] == [0, 3]
    assert "FORKED_TEST_X" not in os.environ  # the owner's environment is untouched
    by_worker = {label: [line for line in lines if line.startswith(f"[worker {label}] ")] for label in ("1/2", "2/2")}
    assert all(len(v) == 2 and v[1].endswith("to stderr") for v in by_worker.values()), lines
    fields = [dict(kv.split("=") for kv in v[0].split("] ", 1)[1].split()) for v in by_worker.values()]
    assert [f["x"] for f in fields] == ["1", "2"]
    assert [int(f["pid"]) for f in fields] == [w.pid for w in workers] and workers[0].pid != workers[1].pid
    assert os.getpid() not in {w.pid for w in workers}
    assert fields[0]["py"] != fields[1]["py"] and fields[0]["np"] != fields[1]["np"]  # reseeded, not inherited


def test_a_forked_worker_is_interrupted_like_a_process(light_forkserver: None) -> None:
    lines: list[str] = []
    worker = forked.ForkedWorker(["wait"], dict(os.environ), "1/1", lines.append, worker_line,
                                 entry=f"{__name__}:_entry")
    deadline = time.monotonic() + 60
    while not any("x=" in line for line in lines):  # the worker is in its command, not still starting
        assert time.monotonic() < deadline and worker.poll() is None, lines
        time.sleep(0.05)
    worker.interrupt()
    assert _wait(worker) == 130
    assert lines[-1] == "[worker 1/1] interrupted"
    killed = forked.ForkedWorker(["wait"], dict(os.environ), "1/1", lines.append, worker_line,
                                 entry=f"{__name__}:_entry")
    killed.kill()
    assert killed.poll() == -9
