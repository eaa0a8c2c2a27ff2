"""What every benchmark does with its result: print the JSON, and write it to ``--out`` when given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: Any, out: Path | None) -> int:
    """Print ``result`` as indented JSON; also write it to ``out`` (its folder created). Returns 0."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return 0


def hardware(device: str) -> str:
    """The machine a benchmark ran on, for its JSON: the GPU's name and CUDA's version, or the CPU."""
    import os
    import platform

    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"


def trial_memory(device_type: str, trial_peak_bytes: int | None, peak: int, kind: str,
                 before: int | None) -> dict[str, Any]:
    """A trial's peak memory for a benchmark's JSON, with what it measures (``memory_kind``). On CUDA the
    trial's own peak (``trial_peak_bytes``); on the CPU the process's peak RSS (``peak, kind`` from
    ``sweeps.training.runtime.peak_memory``) above the RSS ``before`` the trial where the peak was the
    trial's, else since the process started."""
    if device_type == "cuda":
        return {"peak_memory_bytes": trial_peak_bytes, "memory_kind": "cuda_max_allocated"}
    if kind == "trial_peak_rss" and before is not None:
        return {"peak_memory_bytes": peak - before, "memory_kind": "process_peak_rss_above_loaded",
                "rss_before_bytes": before, "peak_rss_bytes": peak}
    return {"peak_memory_bytes": peak, "memory_kind": "process_peak_rss_since_start"}


def lora_sweep(args: list[str], cwd: Path, python: str | None = None) -> tuple[Any, float]:
    """``lora-sweep ARGS`` run in ``cwd`` with ``python`` (this interpreter by default), offline and
    quiet: (the finished process, its wall seconds); exits with its output if it failed."""
    import os
    import subprocess
    import sys
    import time

    cmd = [python or sys.executable, "-m", "sweeps.cli", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "TRANSFORMERS_VERBOSITY": "error"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc, wall
