"""What runs on a Ray node for ``lora-sweep run --ray``: a small actor that starts one ``lora-sweep worker``
process there, keeps its output lines until the driver asks for them, and passes signals on to it.

Standard library only (the actor process imports nothing heavy); `sweeps.engine.ray_launch` wraps the
class with ``ray.remote`` on the driver.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading

__all__ = ["WorkerAgent"]


def _node_env() -> dict[str, str]:
    """The node's environment less a storage URL of its own (the driver hands the sweep's over in ``env``)."""
    return {k: v for k, v in os.environ.items() if k not in ("LORA_SWEEP_STORAGE", "LORA_SWEEP_STORAGE_FILE")}


class WorkerAgent:
    """One ``python -m sweeps.cli ARGS`` process on this node, with ``env`` on top of the node's
    environment (Ray has already set ``CUDA_VISIBLE_DEVICES`` for an actor given a GPU)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "sweeps.cli", *args], env={**_node_env(), **env},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.lines: collections.deque[str] = collections.deque(
            [f"started on {socket.gethostname()} as process {self.proc.pid}"
             + (f", GPU {gpus}" if gpus else ", CPU")])
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.lines.append(line)

    def poll(self) -> tuple[list[str], int | None]:
        """The output lines since the last call, and the exit code once the process has ended (then
        the lines are all of them)."""
        code = self.proc.poll()
        if code is not None:
            self.reader.join(timeout=5)
        out = []
        while self.lines:
            out.append(self.lines.popleft())
        return out, code

    def node(self) -> str:
        """The Ray node this actor runs on (a restarted worker is placed there if it can be)."""
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the worker process (SIGINT: end the running trial and stop; SIGKILL)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.Signals(signum))
            if signum == signal.SIGKILL:
                self.proc.wait()
