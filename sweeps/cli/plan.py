"""``lora-sweep plan SWEEP``: each configuration's parameters, adapter size, peak memory and step time from
a short probe on the real device and data, and the sweep's predicted wall time (nothing is tracked)."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from sweeps.cli.stored import resolve_args
from sweeps.models.inspect import check_targets


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min" if hours else f"{m} min {s:02d} s" if m else f"{s} s"


def plan(args: argparse.Namespace) -> int:
    from sweeps.engine.plan import fit_warnings, plan_sweep, save_plan

    config = resolve_args(args)
    check_targets(config)
    console = Console()
    console.print(f"planning sweep [bold]{config.name}[/]: probing each configuration "
                  f"({config.model.name}, batch {config.train.batch_size}, nothing is tracked)")
    result = plan_sweep(config, say=console.print)
    table = Table(title=f"{config.name} on {result.device}", title_justify="left")
    for col in ("configuration", "trainable params", "adapter", "peak memory", "step time"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for c in result.configs:
        table.add_row(c.label, f"{c.trainable_params:,}", f"{c.adapter_bytes / 2**10:,.0f} KiB",
                      f"{c.peak_memory_bytes / 2**20:,.0f} MiB", f"{c.step_time_s * 1000:,.0f} ms")
    console.print(table)
    kind = result.configs[0].memory_kind if result.configs else ""
    console.print(f"peak memory: {kind}" + {
        "trial_peak_rss": " (the process's peak resident memory while the trial runs, as trials log it on a CPU)",
        "process_peak_rss": " (the process's peak since it started, as trials log it on this CPU)"}.get(kind, ""))
    console.print(f"evaluation: {result.eval_s:.1f} s per pass over the validation split"
                  + (f", {result.eval_last_s:.1f} s for the last (with generation)"
                     if result.eval_last_s > result.eval_s * 1.05 else ""))
    console.print(f"predicted wall time: {_duration(result.predicted_wall_s)} for {result.max_trials} trials "
                  f"(the sweep's maximum), this plan took {_duration(result.probe_s)}")
    for note in result.notes:
        console.print(f"note: {note}")
    warnings = fit_warnings(result)
    for line in warnings:
        console.print(f"[yellow]{line}[/]", highlight=False)
    path = save_plan(config, result)
    console.print(f"saved: {path}  (lora-sweep run repeats its warnings before it starts)")
    return 0
