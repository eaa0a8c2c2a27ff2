"""The report's plotly figures as objects, by name (for ``Sweep.figures()`` in a notebook).

The same figure functions the report page embeds (:mod:`dashboards.figures`), on the same data
(:func:`dashboards.collect.collect`, the learning curves of :func:`dashboards.report.read_curves`, the
adapters' analyses of :mod:`dashboards.adapters`): ``rank`` (the objective against the rank per target
set, mean ± std over seeds), ``cost`` (quality against trainable parameters, train time and peak memory
with the Pareto front), ``curves`` (learning curves from MLflow), ``optuna-<plot>`` (Optuna's importance,
parallel-coordinate, contour and timeline plots), ``similarity`` and ``amplification`` (the LoRA paper's
Figure 3 and Table 7 on the sweep's own adapters). A figure the sweep cannot have (too few trials, no
adapters, an unreadable store) is left out, and :func:`figures` says why in its ``notes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dashboards.records import SweepData

__all__ = ["Gallery", "figures"]


@dataclass
class Gallery:
    """The figures by name, in the report's order, and a note for each one left out."""

    figures: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def figures(data: SweepData, *, analyses: bool = True) -> Gallery:
    """The report's figures of ``data`` (see the module docstring); ``analyses=False`` skips the two that
    read the sweep's adapter files."""
    from dashboards.figures import cost_figure, curves_figure, optuna_figures, rank_figure
    from dashboards.report import read_curves

    out = Gallery()
    if data.configs:
        out.figures["rank"] = rank_figure([data])
        fig, _, notes = cost_figure(data)
        if fig is not None:
            out.figures["cost"] = fig
        else:
            out.notes["cost"] = "; ".join(notes) or "no configuration has a cost logged"
    else:
        out.notes["rank"] = out.notes["cost"] = "no COMPLETE full-length trial yet"
    curves, curve_notes = read_curves(data)
    if curves:
        out.figures["curves"] = curves_figure(data, curves)
    else:
        out.notes["curves"] = "; ".join(curve_notes)
    for key, _title, fig, text in optuna_figures(data):
        if fig is not None:
            out.figures[f"optuna-{key}"] = fig
        else:
            out.notes[f"optuna-{key}"] = text
    if analyses and data.configs:
        from dashboards.adapters import analyses as adapter_analyses
        from dashboards.figures import amplification_figure, similarity_figure

        sim, amp = adapter_analyses(data)
        if sim.grids:
            out.figures["similarity"] = similarity_figure(sim)
        else:
            out.notes["similarity"] = sim.note
        if amp.rows:
            out.figures["amplification"] = amplification_figure(amp)
        else:
            out.notes["amplification"] = amp.note
    return out
