"""How a running sweep shows itself: a live status line, and the tables printed when it ends.

The same lines go to a terminal (``lora-sweep run``) and to a notebook (``sweeps.run``); only the live
line differs by where the output goes (`live_status`):

- a terminal: rich's ``Live`` line, redrawn in place (transient: gone when the sweep ends);
- Jupyter (rich's own detection: an IPython kernel): an output cell updated in place through IPython's
  display handle (rendered as HTML by rich, never as raw terminal escape codes; no ipywidgets needed),
  cleared when the sweep ends;
- anything else (a pipe, a file, a captured stream): no live line, only the event lines, as plain text
  (rich writes no escape codes where the output is not a terminal).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from sweeps.engine.progress import SweepProgress, SweepResult

__all__ = ["best_table", "fmt_params", "held_out_table", "jupyter_bundle", "ladder_table", "live_status",
           "make_console", "print_test", "status_line"]


def make_console(quiet: bool = False) -> Console:
    """A console for a command or an API call: rich's detection of a terminal or a notebook; ``quiet``
    prints nothing. In Jupyter each print is an output with an HTML form (the styles) and a plain-text
    form without terminal escape codes (rich would put them there for its colour system)."""
    console = Console(quiet=quiet)
    if console.is_jupyter:
        console = Console(quiet=quiet, color_system=None)
    return console


def jupyter_bundle(console: Console, text: Text) -> dict[str, str]:
    """``text`` as a Jupyter output: HTML with its styles, and plain text."""
    from html import escape

    from rich.segment import Segment
    from rich.terminal_theme import DEFAULT_TERMINAL_THEME

    parts = []
    for piece, style, control in Segment.simplify(console.render(text)):
        if control:
            continue
        rule = style.get_html_style(DEFAULT_TERMINAL_THEME) if style else ""
        parts.append(f'<span style="{rule}">{escape(piece, quote=False)}</span>' if rule else escape(piece, quote=False))
    html = '<pre style="white-space:pre-wrap;margin:0;font-family:monospace">' + "".join(parts).rstrip("\n") + "</pre>"
    return {"text/plain": text.plain, "text/html": html}


def _fmt(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def fmt_params(params: dict[str, Any]) -> str:
    """``r=4 alpha=8 targets=q,v lr=0.01``."""
    return " ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def status_line(p: SweepProgress) -> Text:
    done = p.complete + p.pruned
    text = Text()
    text.append(f"{done}/{p.budget} done" if not p.ladder else f"{done}/≤{p.budget} done", style="bold")
    text.append(f" · {p.complete} complete · {p.pruned} pruned · {p.failed} failed")
    if p.running is not None:
        text.append(f" · running #{p.running} step {p.step}/{p.steps} ({fmt_params(p.running_params)} "
                    f"seed {p.running_seed})")
    if p.workers > 1 or (p.running_total and p.running is None):
        text.append(f" · {p.running_total} running")
    if p.best_value is not None:
        text.append(f" · best {p.objective} {p.best_value:.4f} (#{p.best_number})", style="green")
    text.append(f" · {_duration(p.elapsed_s)} elapsed")
    if p.eta_s is not None:
        text.append(f" · ~{_duration(p.eta_s)} left")
    return text


@contextlib.contextmanager
def live_status(console: Console, first: Text) -> Iterator[Callable[[Text], None]]:
    """A line redrawn in place while the block runs (see the module docstring); yields its ``update``."""
    if console.quiet:
        yield lambda _: None
    elif console.is_jupyter:
        from IPython.display import display

        handle = display(jupyter_bundle(console, first), raw=True, display_id=True)

        def update(text: Text) -> None:
            if handle is not None:
                handle.update(jupyter_bundle(console, text), raw=True)

        try:
            yield update
        finally:
            update(Text(""))
    else:
        from rich.live import Live

        with Live(first, console=console, transient=True, auto_refresh=False) as live:
            yield lambda text: live.update(text, refresh=True)


def best_table(result: SweepResult) -> Table:
    table = Table(title=f"sweep {result.study_name}: best trial" + ("s (Pareto front)" if len(result.best) > 1 else ""))
    table.add_column("trial", justify="right")
    for name in result.objectives:
        table.add_column(name, justify="right")
    table.add_column("params")
    table.add_column("seed index", justify="right")
    table.add_column("MLflow run")
    for b in result.best:
        table.add_row(str(b.number), *[f"{v:.4g}" for v in b.values], fmt_params(b.params), str(b.seed_index),
                      b.run_id or "-")
    return table


def ladder_table(result: SweepResult) -> Table:
    """The ladder's recommendation and best-quality configuration, as seed means."""
    record = result.ladder or {}
    margin = record.get("margin")
    table = Table(title=f"sweep {result.study_name}: the ladder's recommendation"
                        + (f" (margin {margin:g})" if isinstance(margin, (int, float)) else ""))
    table.add_column("")
    table.add_column("params")
    table.add_column(f"{result.objectives[0]} mean ± std", justify="right")
    table.add_column("seeds", justify="right")
    table.add_column("trainable params", justify="right")
    table.add_column("trials")
    for label, key in (("recommended", "recommendation"), ("best quality", "best_quality")):
        rec = record.get(key)
        if not rec:
            continue
        std = f" ± {rec['std']:.4f}" if rec.get("std") is not None else ""
        params = rec.get("trainable_params")
        table.add_row(label, fmt_params(rec["params"]), f"{rec['mean']:.4f}{std}", str(rec.get("n", "")),
                      f"{params:,.0f}" if params is not None else "-", ",".join(map(str, rec.get("trials", []))))
    return table


def held_out_table(result: SweepResult) -> Table | None:
    """The chosen configurations' validation figure (what chose them) beside their test figure (held out)."""
    from sweeps.engine.holdout import ROLE_LABELS, figures_text

    record = result.test.record if result.test is not None else None
    if not record or not record.get("choices"):
        return None
    objective = record["objective"]
    table = Table(title=f"sweep {result.study_name}: the test split ({record['rows']} held-out rows, read once "
                        "after the last decision)")
    table.add_column("")
    table.add_column("params")
    table.add_column("trials")
    table.add_column(f"validation {objective} (chose it; biased up)", justify="right")
    table.add_column(f"test {objective} (unbiased)", justify="right")
    for role, choice in record["choices"].items():
        table.add_row(ROLE_LABELS.get(role, role), fmt_params(choice["params"]), ",".join(map(str, choice["trials"])),
                      figures_text(choice["validation"]), figures_text(choice["test"]))
    return table


def print_test(result: SweepResult, console: Console) -> None:
    """The test split's table and note, when the sweep's end evaluated it."""
    test = result.test
    if test is None:
        return
    table = held_out_table(result)
    if table is not None:
        console.print(table)
        console.print("validation: the split every decision was taken on (mean ± std over seeds); test: the held-out "
                      "split, read only after the last decision and never used to decide", highlight=False)
    if test.note:
        console.print(f"test split: {test.note}", highlight=False)
