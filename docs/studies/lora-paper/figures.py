"""Figures of the LoRA-paper study (``analyze.py`` calls :func:`write_all`): plotly figures in one offline
page, ``figures.html`` (plotly.js embedded once), and a PNG of each plot div rendered by headless
Chromium (Debian's ``/usr/bin/chromium`` driven by Playwright, network blocked, no browser download).

- ``rank.png``: the objective against the rank (log2 axis) per target set, seed std error bars;
- ``table5.png``: Table 5's configurations as bars with seed std error bars;
- ``phi.png``: phi(A_low, A_high, i, j) of the query matrix, layers 0, 2 and 5, mean over same-seed pairs;
- ``amplification.png``: the amplification factor of dW_q and dW_v against the layer, per rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

CHROMIUM = Path("/usr/bin/chromium")
SIZE = {"width": 900, "height": 480}
HEATMAP_LAYERS = (0, 2, 5)


def rank_figure(configs: list[dict[str, Any]], objective: str) -> go.Figure:
    fig = go.Figure()
    for targets in dict.fromkeys(c["targets"] for c in configs):
        rows = sorted((c for c in configs if c["targets"] == targets), key=lambda c: c["r"])
        fig.add_scatter(x=[c["r"] for c in rows], y=[c["mean"] for c in rows], name=targets, mode="lines+markers",
                        error_y={"type": "data", "array": [c["std"] or 0 for c in rows]})
    ranks = sorted({c["r"] for c in configs})
    fig.update_layout(title=f"{objective} vs rank per target set (mean ± seed std)", yaxis_title=objective,
                      xaxis_title="rank r",
                      xaxis={"type": "log", "tickvals": ranks, "ticktext": [str(r) for r in ranks]}, **SIZE)
    return fig


def table5_figure(configs: list[dict[str, Any]], rows: list[dict[str, Any]], objective: str) -> go.Figure:
    by_key = {(c["targets"], c["r"]): c for c in configs}
    present = [by_key[(r["targets"], r["r"])] for r in rows if r["run"]]
    fig = go.Figure(go.Bar(x=[f"({c['targets']}) r={c['r']}" for c in present], y=[c["mean"] for c in present],
                           error_y={"type": "data", "array": [c["std"] or 0 for c in present]}))
    low = min((c["mean"] - (c["std"] or 0) for c in present), default=0)
    high = max((c["mean"] + (c["std"] or 0) for c in present), default=1)
    fig.update_layout(title="Table 5: one budget of rank x matrices (mean ± seed std; the y axis does not start at 0)", yaxis_title=objective,
                      yaxis_range=[low - 0.1 * (high - low) - 0.01, high + 0.05 * (high - low) + 0.01], **SIZE)
    return fig


def phi_figure(fig3: dict[str, Any]) -> go.Figure | None:
    grids = fig3.get("same_seed_grids", {})
    shown = [(n, grids[f"query.{n}"]) for n in HEATMAP_LAYERS if f"query.{n}" in grids]
    if not shown:
        return None
    fig = make_subplots(rows=1, cols=len(shown), subplot_titles=[f"query, layer {n}" for n, _ in shown])
    for k, (_, grid) in enumerate(shown, start=1):
        fig.add_heatmap(z=grid, x=list(range(1, len(grid[0]) + 1)), y=list(range(1, len(grid) + 1)), zmin=0,
                        zmax=1, colorscale="Viridis", showscale=k == len(shown), row=1, col=k)
        fig.update_xaxes(title_text="j", row=1, col=k)
        fig.update_yaxes(title_text="i", autorange="reversed", dtick=1 if len(grid) <= 16 else None, row=1, col=k)
    fig.update_layout(title=f"phi(A_r={fig3['r_low']}, A_r={fig3['r_high']}, i, j), same-seed pairs", **SIZE)
    return fig


def amplification_figure(t7: dict[str, Any], ranks: list[int]) -> go.Figure | None:
    fig = go.Figure()
    colors, dashes = {"query": "#1f77b4", "value": "#d62728"}, ["solid", "dash", "dot", "dashdot"]
    for n, r in enumerate(str(r) for r in ranks if str(r) in t7.get("ranks", {})):
        layers = t7["ranks"][r]["layers"]
        for typ, color in colors.items():
            keys = sorted((k for k in layers if k.split(".")[0] == typ), key=lambda k: int(k.split(".")[1]))
            fig.add_scatter(x=[int(k.split(".")[1]) for k in keys], y=[layers[k]["factor"] for k in keys],
                            error_y={"type": "data", "array": [layers[k]["factor_std"] or 0 for k in keys]},
                            name=f"W_{typ[0]} r={r}", mode="lines+markers",
                            line={"color": color, "dash": dashes[n % len(dashes)]})
    if not fig.data:
        return None
    fig.update_layout(title="amplification factor ‖ΔW‖/‖UᵀWVᵀ‖ (mean ± seed std)", xaxis_title="layer",
                      yaxis_title="amplification factor", **SIZE)
    return fig


def render_png(page: Path, ids: list[str], out: Path) -> list[Path]:
    """Screenshot each plot div of ``page`` into ``out/<id>.png`` with headless Chromium, offline."""
    from playwright.sync_api import sync_playwright

    written = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            context = browser.new_context(viewport={"width": 1000, "height": 800}, device_scale_factor=2)
            context.route("**/*", lambda r: r.continue_() if r.request.url.startswith(("file:", "data:", "blob:"))
                          else r.abort())
            tab = context.new_page()
            tab.goto(page.as_uri(), wait_until="load")
            tab.wait_for_function("ids => ids.every(id => document.querySelector(`#${id} svg.main-svg`))",
                                  arg=ids, timeout=120_000)
            for div in ids:
                path = out / f"{div}.png"
                tab.locator(f"#{div}").screenshot(path=str(path))
                written.append(path)
        finally:
            browser.close()
    return written


def write_all(results: dict[str, Any], amp: list[int], out: Path, png: bool = True) -> list[Path]:
    """Write ``figures.html`` and (``png``) one PNG per figure into ``out`` from ``analyze.py``'s results;
    returns the files written."""
    configs, objective = results["configurations"], results["objective"]
    figs = {"rank": rank_figure(configs, objective),
            "table5": table5_figure(configs, results["table5"]["rows"], objective),
            "phi": phi_figure(results["figure3"]),
            "amplification": amplification_figure(results["table7"], amp)}
    shown = {k: f for k, f in figs.items() if f is not None}
    divs = [pio.to_html(f, full_html=False, include_plotlyjs=n == 0, div_id=k, config={"displaylogo": False})
            for n, (k, f) in enumerate(shown.items())]
    page = out / "figures.html"
    page.write_text("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>LoRA-paper study: "
                    f"{results['sweep']}</title></head><body>\n" + "\n".join(divs) + "\n</body></html>\n", encoding="utf-8")
    return [page, *(render_png(page, list(shown), out) if png else [])]
