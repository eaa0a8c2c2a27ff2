"""``lora-sweep run``: run or resume a sweep with a one-line live status; at the end the best trial, and the
chosen configurations' validation figure beside their held-out test figure (`sweeps.engine.holdout`).

What runs and what is printed is the Python API's (`sweeps.api.running.start_sweep`, which ``sweeps.run``
calls too); this module parses the command's options, prints the shell commands that go on from here, and
gives the exit code. ``lora-sweep worker`` joins a sweep."""

from __future__ import annotations

import argparse
import os
import time

import optuna
from rich.console import Console

from lora_core import LoraError
from sweeps.api.running import check_workers, run_config, start_sweep, sweep_locator
from sweeps.cli.stored import resolve_args
from sweeps.config.sweep import SweepConfig
from sweeps.engine.loop import run_sweep
from sweeps.engine.progress import SweepProgress, SweepResult
from sweeps.engine.workers import THREADS_ENV, WORKER_ENV
from sweeps.models.inspect import check_targets
from sweeps.names import PARENT_ATTR

_WAIT_POLL_S = 2.0     # worker --wait: how often the storage is asked whether the sweep is open
MAX_RAY_CPUS = 1024
MAX_WAIT_S = 7 * 24 * 3600.0


def run(args: argparse.Namespace) -> int:
    """``lora-sweep run``: exit 0 when the sweep stopped by budget or timeout, 130 on Ctrl-C."""
    ray = None
    if args.ray is not None:
        from sweeps.engine.ray_launch import RayOptions, require_ray

        require_ray()
        if args.sweep is None and args.ray.endswith((".yaml", ".yml")):  # `run --ray SWEEP.yaml`: not an address
            args.sweep, args.ray = args.ray, ""
        ray = RayOptions(address=args.ray or None, workers=args.workers, cpus=args.ray_cpus)
        if args.ray_cpus < 1:
            raise LoraError(f"--ray-cpus must be >= 1, got {args.ray_cpus}")
    config = resolve_args(args)
    workers = 1 if args.workers is None else args.workers
    check_workers(workers, ray is not None)
    if args.ray_cpus > MAX_RAY_CPUS:
        raise LoraError(f"--ray-cpus must be <= {MAX_RAY_CPUS}, got {args.ray_cpus}")
    result = start_sweep(config, Console(), workers=workers, ray=ray, register=args.register,
                         epilogue=print_commands)
    return 130 if result.stopped == "interrupted" else 0


def print_commands(config: SweepConfig, result: SweepResult, console: Console) -> None:
    """The shell commands that go on from here: export, the trial table, the MLflow UI."""
    from sweeps.cli.ui import sweep_runs_url

    where = sweep_locator(config)
    if result.recommended_trial is not None:
        console.print("export the recommended adapter:  "
                      + f"lora-sweep export {where} --out {config.name}-best   (trial {result.recommended_trial})",
                      highlight=False, soft_wrap=True)
    elif result.best:
        trial = "" if len(result.best) == 1 else f" --trial {result.best[0].number}"
        console.print("export the best adapter:  " + f"lora-sweep export {where}{trial} --out {config.name}-best",
                      highlight=False, soft_wrap=True)
    console.print(f"trial table:  lora-sweep status {where}", highlight=False, soft_wrap=True)
    url = sweep_runs_url(config)  # the runs table that lora-sweep ui opens on
    console.print(f"browse in MLflow:  lora-sweep ui {where}" + (f"   (runs: {url})" if url else ""),
                  highlight=False, soft_wrap=True)


def worker(args: argparse.Namespace) -> int:
    """``lora-sweep worker SWEEP``: join the sweep and run trials until its budget is spent."""
    config = _opened_sweep(args)
    check_targets(config)
    threads = os.environ.get(THREADS_ENV)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    label = os.environ.get(WORKER_ENV)
    if label:  # started by `run --workers N`: plain event lines, the owner draws the status
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        pid = os.getpid()

        def on_event(p: SweepProgress) -> None:
            if p.event:
                print(f"[worker {label} pid {pid}] {p.event}", flush=True)

        result = run_sweep(config, progress=on_event, owner=False)
        return 130 if result.stopped == "interrupted" else 0
    console = Console()
    result = run_config(config, console, owner=False)
    print_commands(config, result, console)
    return 130 if result.stopped == "interrupted" else 0


def _opened_sweep(args: argparse.Namespace) -> SweepConfig:
    """The sweep ``worker`` names; with ``--wait``, once ``run`` has opened it (its study holds the config
    and the MLflow parent run's id, so a worker never opens a second parent run), polling until then."""
    if not 0 <= (args.wait or 0.0) <= MAX_WAIT_S:
        raise LoraError(f"--wait must be in 0 .. {MAX_WAIT_S:.0f} seconds, got {args.wait:g}",
                        hint="how long to wait for the sweep to be opened; 0: fail at once")
    deadline = time.monotonic() + max(0.0, args.wait or 0.0)
    while True:
        try:
            config = resolve_args(args)
            if not args.wait:
                return config
            from sweeps.engine.readonly import load_study_readonly

            if PARENT_ATTR in load_study_readonly(config).user_attrs:
                return config
            error = LoraError(f"sweep {config.name!r} has not been opened: its study has no MLflow parent run yet",
                              hint="open it with: lora-sweep run SWEEP.yaml --workers 0 --storage URL")
        except LoraError as exc:
            error = exc
        if time.monotonic() >= deadline:
            raise error
        time.sleep(_WAIT_POLL_S)
