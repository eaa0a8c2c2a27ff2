"""``lora-sweep init``: write a commented ladder sweep for the user's model and data, and say what was found.

The model is built from its config on the meta device (`sweeps.models.inspect`: no weights read), the
data's columns are peeked (`sweeps.data.peek`), the YAML is rendered (`sweeps.config.starter`), loaded
back with the sweep loader, and only then renamed into place: a refusal writes nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any, cast

from lora_core import LoraError
from sweeps.config.starter import (
    LADDER_TARGETS,
    StarterSpec,
    ladder_trials,
    render_starter,
    starter_defaults,
    sweep_name,
)
from sweeps.config.sweep import SWEEP_NAME_RE, load_sweep_config
from sweeps.data.peek import DataPeek, peek_data, propose_columns, task_from_columns
from sweeps.models.inspect import ModelShape, infer_task, inspect_model
from sweeps.models.load import Task, load_config


def init(args: argparse.Namespace) -> int:
    """Check everything, write ``--out`` atomically, print the summary; a `LoraError` (exit 2) writes nothing."""
    out = Path(args.out).expanduser()
    if out.is_dir():
        raise LoraError(f"--out {out} is a directory", hint="name the YAML file to write, e.g. --out sweep.yaml")
    if out.exists() and not args.force:
        raise LoraError(f"{out} already exists", hint="pass --force to overwrite it, or choose another --out")
    if not out.parent.is_dir():
        raise LoraError(f"the folder of --out ({out.parent}) does not exist", hint="create it, or choose another --out")
    if args.name is not None and not SWEEP_NAME_RE.match(args.name):
        raise LoraError(f"sweep name {args.name!r} must be letters, digits, '.', '_' or '-'")
    given = _column_args(args.column or [])
    model_config = load_config(args.model)
    found = peek_data(args.data, args.data_config)
    task, why = _choose_task(args.task, found, model_config)
    columns = propose_columns(found, task, given)
    shape = inspect_model(args.model, cast(Task, task), config=model_config)
    targets = [t for t in LADDER_TARGETS if all(p in shape.presets for p in t.split(","))]
    if not targets:
        raise LoraError(f"model {args.model} ({shape.model_class}) has no linear layer LoRA can adapt")
    spec = _spec(args, shape, found, task, columns, targets)
    _write_checked(out, render_starter(spec))
    _summary(args, shape, found, task, why, columns, spec, out)
    return 0


# ----------------------------------------------------------------------------------------------
# internals


def _column_args(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        role, sep, column = item.partition("=")
        if not sep or not role.strip() or not column.strip():
            raise LoraError(f"--column {item!r} is not ROLE=COLUMN", hint="e.g. --column text=body --column label=topic")
        out[role.strip()] = column.strip()
    return out


def _choose_task(task: str | None, found: DataPeek, model_config: Any) -> tuple[str, str]:
    """The task and why: --task, the built-in data set's, the data's columns, else the model's architecture."""
    if task is not None:
        return task, "--task"
    if found.task is not None:
        return found.task, f"the built-in data set {found.source} is made for it"
    by_columns = task_from_columns(found.columns)
    if by_columns is not None:
        return by_columns, "from the data's columns"
    by_model = infer_task(model_config)
    architectures = ", ".join(getattr(model_config, "architectures", None) or ())
    if by_model is not None:
        return by_model, f"from the model's architecture {architectures}"
    return "classification", "the default (neither the data's columns nor the model's config decide; see --task)"


def _spec(args: argparse.Namespace, shape: ModelShape, found: DataPeek, task: str, columns: dict[str, str],
          targets: list[str]) -> StarterSpec:
    values = starter_defaults(task, shape.max_positions)
    if found.kind == "builtin" and found.source == "pydoc-names":
        from sweeps.data.builtin import NAMES_PROMPT_TEMPLATE

        values["prompt_template"] = NAMES_PROMPT_TEMPLATE
    data: dict[str, Any] = {"files": found.source} if found.kind == "file" else {"name": found.source}
    if found.config:
        data["config"] = found.config
    presets = ", ".join(shape.presets)
    header = [f"Written by lora-sweep init for {args.model} ({shape.model_class}, {_count(shape.params)} parameters)",
              f"on {found.where}, task {task}.", f"Target presets this model supports: {presets}.",
              "The ladder: calibrate the learning rate at r_start, double the rank while the gain is shown above",
              "search.margin, then try the wider target sets at the chosen rank; it recommends the cheapest",
              "configuration shown within the margin of the best (else the best itself)."]
    return StarterSpec(name=args.name or sweep_name(args.model, found.source), model=args.model, task=task,
                       data=data, columns=columns, targets=targets, header=header, **values)


def _write_checked(out: Path, text: str) -> None:
    """Write ``text`` beside ``out``, check that the sweep loader accepts it, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        load_sweep_config(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _summary(args: argparse.Namespace, shape: ModelShape, found: DataPeek, task: str, why: str,
             columns: dict[str, str], spec: StarterSpec, out: Path) -> None:
    total = sum(g.count for g in shape.layers)
    print(f"model    {args.model}: {shape.model_class} ({shape.model_type}), {_count(shape.params)} parameters "
          "(built from its config on the meta device; no weights read)")
    print(f"layers   {total} linear layers:")
    width = max(len(g.name) for g in shape.layers)
    for g in shape.layers:
        role = g.role or "all-linear only"
        print(f"  {g.name.ljust(width)}  x{g.count:<3d} {g.in_features:>6d} -> {g.out_features:<6d} {role}")
    print(f"presets  {', '.join(shape.presets)}")
    print(f"task     {task} ({why})")
    mapping = ", ".join(f"{role} <- {column}" for role, column in columns.items())
    print(f"data     {found.where}: {mapping}")
    print(f"wrote    {out}: ladder over r = {spec.r_start}..{spec.r_max} on {' | '.join(spec.targets)}, "
          f"at most {ladder_trials(spec)} trials of {spec.steps} steps")
    print(f"next     lora-sweep run {out}")
