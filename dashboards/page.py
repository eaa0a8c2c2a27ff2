"""The report page: one self-contained HTML file (plotly.js embedded once, no external request),
its sections in order.

Every number on the page is also in a JSON block ``<script type="application/json" id="report-data">``
at full precision (for scripts and tests); the rank table's cells carry theirs in ``data-*`` attrs.
The building blocks are :mod:`dashboards.markup`, the sections :mod:`dashboards.summary` and
:mod:`dashboards.sections`.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from dashboards.markup import Page
from dashboards.records import SweepData
from dashboards.sections import (
    compare_section,
    cost_section,
    curves_section,
    optuna_section,
    paper_section,
    rank_section,
    trials_section,
)
from dashboards.summary import data_label, summary_section

if TYPE_CHECKING:
    from dashboards.adapters import Amplification, Similarity
    from dashboards.figures import Curve

__all__ = ["render"]


def render(data: SweepData, compare: list[SweepData], curves: list[Curve], curve_notes: list[str],
           sim: Similarity, amp: Amplification) -> str:
    """The report of ``data`` (with a comparison section when ``compare`` names other sweeps) as HTML."""
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = Page(f"lora-sweep report: {data.name}",
                f"{data.config.model.name} on {data_label(data)} · {data.objective} ({data.direction}) · "
                f"written {when}")
    summary_section(page, data)
    rank_section(page, data)
    cost_section(page, data)
    curves_section(page, data, curves, curve_notes)
    optuna_section(page, data)
    paper_section(page, data, sim, amp)
    if compare:
        compare_section(page, [data, *compare])
    trials_section(page, data)
    return page.html()
