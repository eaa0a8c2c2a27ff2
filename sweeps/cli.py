"""The ``lora-sweep`` command line. Heavy imports happen inside the subcommands, so ``--help`` is quick."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

EXIT_USER_ERROR = 2


def _train(args: argparse.Namespace) -> int:
    from sweeps.train_cmd import train

    trial, _ = train(args.config, args.set or [])
    return 0 if trial.result.state == "COMPLETE" else 1


def _run(args: argparse.Namespace) -> int:
    from sweeps.sweep_cmd import run

    result = run(args.sweep, args.set or [])
    return 130 if result.stopped == "interrupted" else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-sweep",
        description="Find the LoRA rank, alpha and target matrices for a model and task.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser("train", help="run one tracked LoRA trial (default: minilm-l6 on pydoc-topics, r=8, q,v)",
                           description="Run one LoRA fine-tune, tracked as an MLflow run.")
    train.add_argument("config", nargs="?", help="trial YAML (default: the built-in default, examples/default.yaml)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config value, e.g. --set lora.r=16 --set train.lr=5e-4 (repeatable)")
    train.set_defaults(func=_train)
    run = sub.add_parser("run", help="run or resume a sweep (default: the built-in demo sweep, examples/demo-sweep.yaml)",
                         description="Run an Optuna sweep of LoRA trials, each tracked as an MLflow child run. "
                                     "Running the same sweep again resumes it.")
    run.add_argument("sweep", nargs="?", help="sweep YAML (default: the built-in demo sweep)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a value, e.g. --set search.n_trials=10 --set train.steps=100 (repeatable)")
    run.set_defaults(func=_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USER_ERROR
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from lora_core import LoraError

    try:
        return int(args.func(args))
    except LoraError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
