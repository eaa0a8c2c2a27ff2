"""The ``lora-sweep`` command line. Heavy imports happen inside the subcommands, so ``--help`` is quick."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Callable, Sequence

EXIT_USER_ERROR = 2


def _train(args: argparse.Namespace) -> int:
    from sweeps.cli.train import train

    trial, _ = train(args.config, args.set or [])
    return 0 if trial.result.state == "COMPLETE" else 1


def _command(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand whose module is imported only when it runs (so ``--help`` stays quick)."""
    def run(args: argparse.Namespace) -> int:
        func: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module), name)
        return func(args)

    return run


def _sweep_args(parser: argparse.ArgumentParser, *, sweep_help: str, optional: bool = False) -> None:
    parser.add_argument("sweep", nargs="?" if optional else None, metavar="SWEEP", help=sweep_help)
    parser.add_argument("--home", metavar="DIR",
                        help="the sweeps' folder (tracking.home; default lora-sweeps): where a sweep named "
                             "by name is looked up (<home>/optuna/<name>.journal)")
    parser.add_argument("--storage", metavar="URL",
                        help="the Optuna storage of a sweep named by name (postgresql://..., or a journal file); "
                             "default $LORA_SWEEP_STORAGE (keeps a password off the command line)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a value, e.g. --set tracking.uri=http://host:5000 (repeatable)")
    parser.add_argument("--trust-stored-config", action="store_true",
                        help="let the config read back from a named sweep's study turn on model.trust_remote_code "
                             "or load a model that is not on this machine (refused without it: whoever can write "
                             "the storage could run code here)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-sweep",
        description="Find the LoRA rank, alpha and target matrices for a model and task.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    init = sub.add_parser("init", help="write a commented ladder sweep YAML for your model and data",
                          description="Inspect a model (built from its config on the meta device: no weights read) "
                                      "and a data set's columns, and write a ladder sweep for them: the ranks, the "
                                      "target sets this model supports, a learning-rate range, seeds and steps, "
                                      "each with a comment. Nothing is written when something is missing.")
    init.add_argument("--model", required=True, metavar="NAME_OR_DIR",
                      help="a built-in alias (minilm-l6, smollm2-135m), a local model directory or a hub id")
    init.add_argument("--data", required=True, metavar="FILE_OR_NAME",
                      help="a local csv/tsv/json/jsonl/parquet file, a built-in data set (pydoc-topics, "
                           "pydoc-names) or a hub data set id")
    init.add_argument("--data-config", metavar="NAME", help="the hub data set's configuration (e.g. sst2 of glue)")
    init.add_argument("--task", choices=("classification", "causal-lm"),
                      help="default: the built-in data set's task, else from the data's columns (label: "
                           "classification; prompt and completion: causal-lm), else from the model's architecture")
    init.add_argument("--column", action="append", metavar="ROLE=COLUMN",
                      help="map a role to a column, e.g. --column text=body --column label=topic (repeatable; "
                           "default: the usual names)")
    init.add_argument("--name", help="the sweep's name (default: from the model's and the data's names)")
    init.add_argument("--out", default="sweep.yaml", metavar="FILE", help="the YAML to write (default sweep.yaml)")
    init.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    init.set_defaults(func=_command("sweeps.cli.init", "init"))
    train = sub.add_parser("train", help="run one tracked LoRA trial (default: minilm-l6 on pydoc-topics, r=8, q,v)",
                           description="Run one LoRA fine-tune, tracked as an MLflow run.")
    train.add_argument("config", nargs="?", help="trial YAML (default: the built-in default, examples/default.yaml)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config value, e.g. --set lora.r=16 --set train.lr=5e-4 (repeatable)")
    train.set_defaults(func=_train)
    sweep_help = "a sweep YAML, or the name of a sweep already started (looked up under --home or --storage)"
    run = sub.add_parser("run", help="run or resume a sweep (default: the built-in ladder demo, examples/ladder-demo.yaml)",
                         description="Run an Optuna sweep of LoRA trials, each tracked as an MLflow child run. "
                                     "Running the same sweep again resumes it.")
    _sweep_args(run, sweep_help="sweep YAML or name (default: the built-in demo sweep)", optional=True)
    run.add_argument("--workers", type=int, default=None, metavar="N",
                     help="worker processes on this machine (one GPU each when there are GPUs; on CPU they "
                          "share the cores); default 1. 0: none here, this process only opens the sweep and "
                          "follows it until workers started elsewhere (lora-sweep worker NAME) have run its "
                          "trials. With --ray: Ray workers, default one per GPU of the cluster (CPU-only: one "
                          "per --ray-cpus CPUs)")
    run.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="start the workers as Ray actors on a Ray cluster (pip install 'lora-sweep[ray]'): "
                          "ADDRESS is the head node (host:6379, ray://host:10001, 'auto'), or 'local' for a new "
                          "instance on this machine; without it Ray's default (RAY_ADDRESS, a cluster started "
                          "on this machine, else a new local one)")
    run.add_argument("--ray-cpus", type=int, default=1, metavar="K",
                     help="with --ray: CPUs reserved for each worker (its torch threads on a CPU); default 1")
    run.add_argument("--register", metavar="NAME",
                     help="register the best adapter in the MLflow model registry as NAME, alias 'best'")
    run.set_defaults(func=_command("sweeps.cli.sweep", "run"))
    worker = sub.add_parser("worker", help="join a running sweep as one more worker (this or another machine)",
                            description="Claim and run trials of an existing sweep until its budget is spent. "
                                        "For several machines the sweep needs a shared storage "
                                        "(search.storage: postgresql://...) and tracking server.")
    _sweep_args(worker, sweep_help=sweep_help)
    worker.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to SECONDS for the sweep to be opened (by lora-sweep run SWEEP.yaml "
                             "--workers 0, say) and its storage to answer; default 0: fail at once")
    worker.set_defaults(func=_command("sweeps.cli.sweep", "worker"))
    status = sub.add_parser("status", help="print a sweep's trial table",
                            description="Print every trial of a sweep: state, parameters, metric, MLflow run.")
    _sweep_args(status, sweep_help=sweep_help)
    status.add_argument("--json", action="store_true", help="print the table as JSON (one object per trial)")
    status.set_defaults(func=_command("sweeps.cli.status", "status"))
    export = sub.add_parser("export", help="export the best (or a named) trial's adapter as a PEFT directory",
                            description="Fetch a trial's adapter from the tracking store, check that it loads "
                                        "strictly and reproduces the logged metric, and write a PEFT-compatible "
                                        "directory with a model card.")
    _sweep_args(export, sweep_help=sweep_help)
    export.add_argument("--out", required=True, metavar="DIR", help="the directory to write (must not exist, "
                                                                     "or be empty)")
    export.add_argument("--trial", type=int, metavar="N", help="the Optuna trial number (default: the best trial)")
    export.add_argument("--merged", action="store_true",
                        help="also write the merged full model (DIR/merged, loads with from_pretrained)")
    export.add_argument("--register", metavar="NAME",
                        help="also register the adapter in the MLflow model registry as NAME")
    export.set_defaults(func=_command("sweeps.cli.export", "export"))
    ui = sub.add_parser("ui", help="start the MLflow UI for the sweeps' tracking store on 127.0.0.1",
                        description="Start the MLflow UI on 127.0.0.1 for the tracking store of a sweep "
                                    "(or of --home) and print its URL. Ctrl-C stops it.")
    _sweep_args(ui, sweep_help="a sweep YAML or name (default: the store under --home)", optional=True)
    ui.add_argument("--port", type=int, default=5000, help="port (default 5000; 0 picks a free one)")
    ui.set_defaults(func=_command("sweeps.cli.ui", "ui"))
    report = sub.add_parser("report", help="write a sweep's HTML report (works offline) and log it to MLflow",
                            description="Write one self-contained HTML report of a sweep: the recommendation and "
                                        "the ladder's decisions, metric vs rank with seed error bars, quality vs "
                                        "cost, learning curves, Optuna's plots and the LoRA paper's analyses of "
                                        "the sweep's adapters. It is also logged to the sweep's MLflow parent run.")
    _sweep_args(report, sweep_help=sweep_help)
    report.add_argument("--out", metavar="FILE.html", help="where to write it (default: <home>/reports/<sweep>.html); "
                                                           "an existing file is replaced only with --force")
    report.add_argument("--force", action="store_true", help="replace the --out file if it exists")
    report.add_argument("--compare", nargs="+", metavar="OTHER", default=[],
                        help="other sweeps (YAML or name, same --home/--storage) to put side by side")
    report.set_defaults(func=_command("sweeps.cli.report", "report"))
    plan = sub.add_parser("plan", help="probe each configuration of a sweep: memory, step time, predicted wall time",
                          description="Before anything is trained: for each configuration the sweep can run, its "
                                      "trainable parameters and adapter size, and its peak memory and step time "
                                      "from a short probe on the real device and data (nothing is tracked); then "
                                      "the predicted wall time of the sweep and a warning for any configuration "
                                      "that will not fit in memory.")
    _sweep_args(plan, sweep_help="a sweep YAML or name (default: the built-in demo sweep)", optional=True)
    plan.set_defaults(func=_command("sweeps.cli.plan", "plan"))
    sync = sub.add_parser("sync", help="send MLflow writes a sweep left spooled on disk (tracking server was down)",
                          description="Send the MLflow writes spooled under --home that no running process owns "
                                      "(a sweep ended, or a worker died, while its tracking server was down).")
    sync.add_argument("--home", metavar="DIR", help="the workers' folder (tracking.home; default lora-sweeps)")
    sync.add_argument("--timeout", type=float, default=600.0, metavar="S",
                      help="give up after S seconds (default 600); what is left stays on disk")
    sync.set_defaults(func=_command("sweeps.cli.sync", "sync"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USER_ERROR
    from lora_core import LoraError
    from sweeps.api.interrupt import Terminated, terminate_as_interrupt
    from sweeps.api.state import command_defaults
    from sweeps.secrets import mask_text, mask_tracebacks

    command_defaults()  # quiet transformers/MLflow; every log line of this process: passwords masked
    mask_tracebacks()   # and the traceback of a crash

    try:
        with terminate_as_interrupt() as received:  # SIGTERM (a scheduler's stop) and SIGHUP end a command as Ctrl-C does
            code = int(args.func(args))
        if received.signum is not None and code == 130:  # the command ended as after Ctrl-C
            print(f"terminated by {signal.Signals(received.signum).name}: stopped as after Ctrl-C", file=sys.stderr)
            return 128 + received.signum
        return code
    except LoraError as exc:
        print(f"error: {mask_text(exc.message)}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {mask_text(exc.hint)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Terminated as exc:
        print(f"terminated by {exc}: stopped as after Ctrl-C", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
