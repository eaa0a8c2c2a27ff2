"""The report's plotly figures. Each function returns a ``plotly.graph_objects.Figure`` (or a note
saying why the figure does not fit the sweep); nothing here reads a store."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dashboards.records import COST_METRICS, ConfigStats, SweepData, fmt_num
from dashboards.views import pareto_front, rank_table
from sweeps.text import first_line

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from dashboards.adapters import Amplification, Similarity

__all__ = ["Curve", "amplification_figure", "cost_figure", "curves_figure", "optuna_figures", "rank_figure",
           "similarity_figure"]

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
OPEN_MARKERS = ("circle-open", "square-open", "diamond-open", "triangle-up-open", "x-thin-open", "star-open")
LAYOUT = {"template": "plotly_white", "margin": {"l": 60, "r": 20, "t": 50, "b": 50}}
COST_TITLES = {"trainable_params": "trainable parameters", "train_s": "train time (s)",
               "peak_memory_bytes": "peak memory (MiB)"}
MIN_TRIALS_FOR_IMPORTANCE = 5


def _go() -> Any:
    import plotly.graph_objects as go

    return go


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _std(c: ConfigStats) -> float:
    return c.std if c.std is not None else 0.0


def _cell_text(c: ConfigStats) -> str:
    return f"{fmt_num(c.mean)} ± {fmt_num(c.std)} (n={c.n})" if c.std is not None else f"{fmt_num(c.mean)} (n=1)"


# --------------------------------------------------------------------------- metric vs rank

def _rates(data: SweepData, targets: str) -> dict[float, list[ConfigStats]]:
    """A target set's configurations by learning rate (only when it was trained at more than one)."""
    by_lr: dict[float, list[ConfigStats]] = {}
    for c in data.configs:
        if c.targets == targets and isinstance(c.params.get("lr"), (int, float)):
            by_lr.setdefault(float(c.params["lr"]), []).append(c)
    return by_lr if len(by_lr) > 1 else {}


def rank_figure(sweeps: list[SweepData]) -> go.Figure:
    """Seed mean ± std of the objective against the rank (log2 axis): one line per (sweep, target set)
    through the best configuration at each rank; where a target set was trained at several learning
    rates (a ladder's lr bracket, a grid over lr), every rate tried is also shown, as open markers, one
    trace per rate (the line then follows each rank's best rate)."""
    go = _go()
    fig = go.Figure()
    all_ranks: set[int] = set()
    several = len(sweeps) > 1
    i = 0
    for data in sweeps:
        targets, ranks, cells = rank_table(data)
        all_ranks.update(ranks)
        for t in targets:
            row = [cells[(t, r)] for r in ranks if (t, r) in cells]
            name = f"{data.name} · {t}" if several else t
            rates = _rates(data, t)
            if rates:
                name += " (best rate per rank)"
            fig.add_trace(go.Scatter(
                x=[c.r for c in row], y=[c.config.mean for c in row], mode="lines+markers", name=name,
                error_y={"type": "data", "array": [_std(c.config) for c in row], "visible": True},
                line={"color": colour(i), "dash": DASHES[sweeps.index(data) % len(DASHES)]},
                customdata=[[c.config.n, _cell_text(c.config), c.config.label] for c in row],
                hovertemplate=("r=%{x}<br>" + f"{data.objective}: " + "%{customdata[1]}<br>%{customdata[2]}"
                               "<extra>" + name + "</extra>"), legendgroup=f"{data.name}·{t}"))
            for j, (lr, configs) in enumerate(sorted(rates.items())):
                configs = sorted(configs, key=lambda c: c.r)
                at = f"{data.name} · {t} at lr {lr:.3g}" if several else f"{t} at lr {lr:.3g}"
                fig.add_trace(go.Scatter(
                    x=[c.r for c in configs], y=[c.mean for c in configs], mode="markers", name=at,
                    marker={"color": colour(i), "symbol": OPEN_MARKERS[j % len(OPEN_MARKERS)], "size": 9},
                    error_y={"type": "data", "array": [_std(c) for c in configs], "visible": True, "thickness": 1},
                    customdata=[[_cell_text(c), c.label] for c in configs], legendgroup=f"{data.name}·{t}",
                    hovertemplate=("r=%{x}<br>" + f"{data.objective}: " + "%{customdata[0]}<br>%{customdata[1]}"
                                   "<extra>" + at + "</extra>")))
            i += 1
    ticks = sorted(all_ranks)
    objectives = sorted({d.objective for d in sweeps})
    fig.update_layout(**LAYOUT, title={"text": f"{' / '.join(objectives)} vs rank (mean ± std over seeds)"},
                      xaxis={"title": {"text": "rank r (log2 scale)"}, "type": "log", "tickvals": ticks,
                             "ticktext": [str(r) for r in ticks]},
                      yaxis={"title": {"text": f"{' / '.join(objectives)} (seed mean)"}},
                      legend={"title": {"text": "sweep · target set" if several else "target set"}})
    return fig


# --------------------------------------------------------------------------- quality vs cost

def _cost_value(metric: str, value: float) -> float:
    return value / 2**20 if metric == "peak_memory_bytes" else value


def cost_figure(data: SweepData) -> tuple[go.Figure | None, dict[str, list[str]], list[str]]:
    """Objective against trainable parameters, train time and peak memory, one point per configuration,
    with each panel's Pareto front. Returns (figure or None, front configuration keys per cost, notes)."""
    from plotly.subplots import make_subplots

    go = _go()
    panels = [m for m in COST_METRICS if any(c.cost.get(m) is not None for c in data.configs)]
    notes = [f"no configuration has {COST_TITLES[m]} logged" for m in COST_METRICS if m not in panels]
    if not panels:
        return None, {}, notes
    fig = make_subplots(rows=1, cols=len(panels), shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=[f"vs {COST_TITLES[m]}" for m in panels])
    fronts: dict[str, list[str]] = {}
    for col, metric in enumerate(panels, start=1):
        configs = [c for c in data.configs if c.cost.get(metric) is not None]
        points = [(_cost_value(metric, float(c.cost[metric])), c.mean) for c in configs]  # type: ignore[arg-type]
        front = pareto_front(points, data.maximize)
        fronts[metric] = [configs[i].key for i in front]
        fig.add_trace(go.Scatter(
            x=[p[0] for p in points], y=[p[1] for p in points], mode="markers", name="configuration",
            legendgroup="configs", showlegend=col == 1, marker={"color": colour(0), "size": 9, "opacity": 0.75},
            error_y={"type": "data", "array": [_std(c) for c in configs], "visible": True, "thickness": 1},
            customdata=[[c.label, _cell_text(c)] for c in configs],
            hovertemplate="%{customdata[0]}<br>" + data.objective + ": %{customdata[1]}<br>"
                          + COST_TITLES[metric] + ": %{x:,.4g}<extra></extra>"), row=1, col=col)
        fig.add_trace(go.Scatter(
            x=[points[i][0] for i in front], y=[points[i][1] for i in front], mode="lines+markers",
            name="Pareto front", legendgroup="front", showlegend=col == 1, line={"shape": "hv", "color": colour(3)},
            marker={"symbol": "diamond-open", "size": 14, "color": colour(3), "line": {"width": 2}},
            customdata=[[configs[i].label] for i in front],
            hovertemplate="Pareto: %{customdata[0]}<extra></extra>"), row=1, col=col)
        fig.update_xaxes(title_text=COST_TITLES[metric], type="log" if metric == "trainable_params" else "linear",
                         row=1, col=col)
    fig.update_yaxes(title_text=f"{data.objective} (seed mean)", row=1, col=1)
    fig.update_layout(**LAYOUT, title={"text": f"{data.objective} vs cost ({data.direction}; Pareto front marked)"})
    return fig, fronts, notes


# --------------------------------------------------------------------------- learning curves

@dataclass
class Curve:
    number: int
    state: str
    config_key: str
    label: str
    seed_index: int
    val: list[tuple[int, float]]
    train: list[tuple[int, float]]


def curves_figure(data: SweepData, curves: list[Curve]) -> go.Figure:
    """Validation objective (top) and train loss (bottom) vs step, one line per trial, coloured by
    configuration, dashed by seed."""
    from plotly.subplots import make_subplots

    go = _go()
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[f"validation {data.objective}", "train loss"])
    order: dict[str, int] = {}
    for curve in curves:
        idx = order.setdefault(curve.config_key, len(order))
        first = sum(1 for c in curves[: curves.index(curve)] if c.config_key == curve.config_key) == 0
        style = {"color": colour(idx), "dash": DASHES[curve.seed_index % len(DASHES)], "width": 1.5}
        name = f"t{curve.number} s{curve.seed_index} {curve.state}"
        for row, points in ((1, curve.val), (2, curve.train)):
            if not points:
                continue
            fig.add_trace(go.Scatter(
                x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers" if row == 1 else "lines",
                name=curve.label, legendgroup=curve.config_key, showlegend=first and row == 1, line=style,
                marker={"size": 4}, hovertemplate=f"{name}<br>{curve.label}<br>step %{{x}}: %{{y:.4g}}<extra></extra>"),
                row=row, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    fig.update_yaxes(title_text=f"val_{data.objective}", row=1, col=1)
    fig.update_yaxes(title_text="train_loss", row=2, col=1)
    fig.update_layout(**LAYOUT, height=640, title={"text": "learning curves (colour: configuration, dash: seed)"},
                      legend={"title": {"text": "configuration"}})
    return fig


# --------------------------------------------------------------------------- Optuna's plots

def varying_params(data: SweepData) -> list[str]:
    """Params with more than one value among the COMPLETE trials."""
    values: dict[str, set[str]] = {}
    for t in data.trials:
        if t.state == "COMPLETE" and t.steps is None:
            for k, v in t.params.items():
                values.setdefault(k, set()).add(repr(v))
    return [k for k, v in values.items() if len(v) > 1]


def optuna_figures(data: SweepData) -> list[tuple[str, str, go.Figure | None, str]]:
    """(key, title, figure or None, note) for Optuna's importance, parallel-coordinate, contour and
    timeline plots; a plot that does not fit the sweep (or fails) comes back as a one-line note."""
    import optuna
    import optuna.visualization as vis

    study = data.study
    if data.shortened:  # a ladder's shorter calibration trials would skew every plot of the objective
        level = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "a new study created in memory" line
        try:
            full = optuna.create_study(directions=study.directions)
        finally:
            optuna.logging.set_verbosity(level)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            full.add_trials([t for t in study.get_trials(deepcopy=False) if t.number not in
                             {x.number for x in data.shortened}])
        study = full
    complete = sum(1 for t in data.trials if t.state == "COMPLETE")
    varying = varying_params(data)
    multi = len(study.directions) > 1
    target = {"target": (lambda t: t.values[0]), "target_name": data.objective} if multi else \
        {"target_name": data.objective}
    out: list[tuple[str, str, Any, str]] = []

    def attempt(key: str, title: str, make: Any) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fig = make()
            fig.update_layout(template="plotly_white")
            out.append((key, title, fig, ""))
        except Exception as exc:  # a plot Optuna cannot draw for this study is a note, never a crash
            out.append((key, title, None, f"not shown: Optuna could not draw it ({first_line(exc, 200)})"))

    title = "parameter importances"
    if len(varying) < 2:
        out.append(("importances", title, None, f"not shown: it needs at least two params that vary, "
                                                f"and {len(varying)} vary ({', '.join(varying) or 'none'})"))
    elif complete < MIN_TRIALS_FOR_IMPORTANCE:
        out.append(("importances", title, None, f"not shown: it needs at least {MIN_TRIALS_FOR_IMPORTANCE} "
                                                f"COMPLETE trials, and there are {complete}"))
    else:
        attempt("importances", title, lambda: vis.plot_param_importances(study, params=varying, **target))
    title = "parallel coordinates"
    if not varying:
        out.append(("parallel", title, None, "not shown: no param varies among the COMPLETE trials"))
    else:
        attempt("parallel", title, lambda: vis.plot_parallel_coordinate(study, params=varying, **target))
    title = "contour"
    if len(varying) < 2:
        out.append(("contour", title, None, f"not shown: a contour needs two params that vary, and {len(varying)} "
                                            f"vary ({', '.join(varying) or 'none'})"))
    else:
        attempt("contour", title, lambda: vis.plot_contour(study, params=varying[:4], **target))
    attempt("timeline", "timeline", lambda: vis.plot_timeline(data.study))  # every trial, as it ran
    return out


# --------------------------------------------------------------------------- the paper's analyses

def similarity_figure(sim: Similarity) -> go.Figure:
    """One heatmap per chosen layer: phi(A_low, A_high, i, j), i down, j across, on one 0..1 scale."""
    from plotly.subplots import make_subplots

    go = _go()
    assert sim.low and sim.high
    n = len(sim.grids)
    fig = make_subplots(rows=1, cols=n, horizontal_spacing=0.08, subplot_titles=[g.module for g in sim.grids])
    for col, g in enumerate(sim.grids, start=1):
        rows, cols = len(g.grid), len(g.grid[0]) if g.grid else 0
        fig.add_trace(go.Heatmap(
            z=g.grid, x=list(range(1, cols + 1)), y=list(range(1, rows + 1)), zmin=0.0, zmax=1.0,
            colorscale="Viridis", showscale=col == n, colorbar={"title": {"text": "φ"}},
            hovertemplate=f"{g.module}<br>i=%{{y}} (r={sim.low.r}), j=%{{x}} (r={sim.high.r})<br>"
                          "φ=%{z:.4f}<extra></extra>"), row=1, col=col)
        fig.update_xaxes(title_text=f"j (top-j of r={sim.high.r})", dtick=1 if cols <= 16 else None, row=1, col=col)
        fig.update_yaxes(title_text=f"i (top-i of r={sim.low.r})", dtick=1 if rows <= 16 else None,
                         autorange="reversed", row=1, col=col)
    fig.update_layout(**LAYOUT, height=max(300, 120 + 40 * min(len(sim.grids[0].grid), 16)),
                      title={"text": f"subspace similarity φ(A_r={sim.low.r}, A_r={sim.high.r}, i, j), "
                                     f"{sim.module_type}, target set {sim.targets}"})
    return fig


def amplification_figure(amp: Amplification) -> go.Figure:
    go = _go()
    fig = go.Figure(go.Bar(
        x=[r.module for r in amp.rows], y=[r.factor for r in amp.rows], marker={"color": colour(0)},
        customdata=[[r.r, r.delta_norm, r.projected_norm] for r in amp.rows],
        hovertemplate="%{x}<br>amplification %{y:.4g}<br>r=%{customdata[0]}, ‖ΔW‖=%{customdata[1]:.4g}, "
                      "‖UᵀWVᵀ‖=%{customdata[2]:.4g}<extra></extra>"))
    fig.update_layout(**LAYOUT, title={"text": "amplification factor ‖ΔW‖_F / ‖UᵀWVᵀ‖_F per adapted module"},
                      xaxis={"title": {"text": "module"}, "tickangle": -30},
                      yaxis={"title": {"text": "amplification factor"}, "type": "log"
                             if _spread(amp) else "linear"})
    return fig


def _spread(amp: Amplification) -> bool:
    values = [r.factor for r in amp.rows if r.factor > 0 and math.isfinite(r.factor)]
    return bool(values) and max(values) / min(values) > 100
