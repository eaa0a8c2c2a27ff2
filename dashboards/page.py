"""The report page: one self-contained HTML file (plotly.js embedded once, no external request).

Every number on the page is also in a JSON block ``<script type="application/json" id="report-data">``
at full precision (for scripts and tests); the rank table's cells carry theirs in ``data-*`` attrs.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
from typing import TYPE_CHECKING, Any

from dashboards.collect import Choice, SweepData, effective_alpha, fmt_num, params_label, rank_table

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from dashboards.adapters import Amplification, Similarity
    from dashboards.figures import Curve

__all__ = ["Page", "render"]

PLOT_CONFIG = {"displaylogo": False, "responsive": True}
STAGES = {0: "lr calibration", 1: "rank ladder", 2: "wider target sets", 3: "recommendation"}
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#243447;color:#fff;padding:14px 28px}header h1{margin:0;font-size:1.4em}
header p{margin:4px 0 0;opacity:.8;font-size:.9em}
nav{padding:8px 28px;background:#e8edf2;font-size:.9em}nav a{margin-right:14px;color:#243447}
main{padding:8px 28px 40px;max-width:1400px}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 20px 16px;margin:16px 0}
h2{font-size:1.2em;border-bottom:1px solid #eee;padding-bottom:4px}h3{font-size:1.05em}
p.how{color:#444;font-size:.93em;max-width:1000px}p.note{color:#8a5300;font-size:.9em}
table{border-collapse:collapse;font-size:.88em;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f1f4f7}
td.num{text-align:right;font-variant-numeric:tabular-nums}
table.decisions td:nth-child(4){min-width:320px}table.decisions td:nth-child(5){font-size:.92em}
.cards{display:flex;gap:16px;flex-wrap:wrap}.card{border:1px solid #cfd8e3;border-radius:6px;padding:6px 14px;
min-width:300px;background:#f7f9fb}.card h3{margin:6px 0}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:.92em}dl.facts dt{color:#555}
dl.facts dd{margin:0}code{font-size:.9em}details summary{cursor:pointer;margin:6px 0}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _attr_num(value: float | None) -> str:
    return "" if value is None else repr(float(value))


class Page:
    """Collects sections and figures; ``html()`` assembles the file."""

    def __init__(self, title: str, subtitle: str) -> None:
        self.title, self.subtitle = title, subtitle
        self.sections: list[tuple[str, str, str]] = []   # (id, heading, body)
        self.figures: list[str] = []
        self.data: dict[str, Any] = {"figures": self.figures}

    def figure(self, fig: go.Figure, div_id: str) -> str:
        self.figures.append(div_id)
        return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=PLOT_CONFIG)

    def section(self, sid: str, heading: str, body: str) -> None:
        self.sections.append((sid, heading, body))

    def html(self) -> str:
        from plotly.offline import get_plotlyjs

        nav = "".join(f'<a href="#{_e(sid)}">{_e(h)}</a>' for sid, h, _ in self.sections)
        body = "".join(f'<section id="{_e(sid)}"><h2>{_e(h)}</h2>{b}</section>' for sid, h, b in self.sections)
        data = json.dumps(_json_safe(self.data), allow_nan=False, default=str).replace("</", "<\\/")
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>{_e(self.title)}</title><style>{CSS}</style>"
                f'<script type="text/javascript">{get_plotlyjs()}</script></head>'
                f"<body><header><h1>{_e(self.title)}</h1><p>{_e(self.subtitle)}</p></header>"
                f"<nav>{nav}</nav><main>{body}</main>"
                f'<script type="application/json" id="report-data">{data}</script></body></html>\n')


def how(text: str) -> str:
    return f'<p class="how">{_e(text)}</p>'


def note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def table(headers: list[str], rows: list[list[str]], cls: str = "", raw: bool = False) -> str:
    """An HTML table; cells are escaped unless ``raw`` (then they are HTML already)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    cell = (lambda c: c) if raw else (lambda c: f"<td>{_e(c)}</td>")
    body = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in rows)
    return f'<table class="{_e(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# --------------------------------------------------------------------------- pieces

def _data_label(data: SweepData) -> str:
    d = data.config.data
    if d.name:
        return d.name + (f" ({d.config})" if d.config else "")
    files = d.files
    if isinstance(files, dict):
        return ", ".join(f"{k}: {v}" for k, v in files.items())
    return str(files)


def _mean_std(mean: float | None, std: float | None, n: int | None) -> str:
    if mean is None:
        return "–"
    text = fmt_num(mean) + (f" ± {fmt_num(std)}" if std is not None else "")
    return text + (f" ({n})" if n is not None else "")


def choice_json(choice: Choice | None) -> dict[str, Any] | None:
    if choice is None:
        return None
    return {"params": choice.params, "mean": choice.mean, "std": choice.std, "n": choice.n,
            "trainable_params": choice.trainable_params, "trials": choice.trials, "source": choice.source,
            "how": choice.how}


def choice_card(data: SweepData, choice: Choice | None, cid: str, heading: str) -> str:
    if choice is None:
        return f'<div class="card" id="{cid}"><h3>{_e(heading)}</h3>{note("none yet")}</div>'
    p = choice.params
    alpha = p.get("alpha", effective_alpha(p) if "alpha_per_r" in p else None)
    facts = [("r", p.get("r")), ("alpha", alpha), ("targets", p.get("targets")), ("lr", p.get("lr")),
             ("dropout", p.get("dropout"))]
    items = [(k, fmt_num(v)) for k, v in facts if v is not None]
    items.append((f"{data.objective} (mean ± std (n))", _mean_std(choice.mean, choice.std, choice.n)))
    if choice.trainable_params is not None:
        items.append(("trainable parameters", fmt_num(float(choice.trainable_params))))
    if choice.trials:
        items.append(("trials", ", ".join(str(n) for n in choice.trials)))
    dl = "".join(f'<dt>{_e(k)}</dt><dd data-key="{_e(k.split(" ")[0])}">{_e(v)}</dd>' for k, v in items)
    source = "from the rank ladder" if choice.source == "ladder" else "derived by this report"
    return (f'<div class="card" id="{cid}" data-source="{_e(choice.source)}"><h3>{_e(heading)} '
            f'<small>({source})</small></h3><dl class="facts">{dl}</dl>{how(choice.how) if choice.how else ""}</div>')


def _compact(value: Any, depth: int = 0) -> str:
    """One piece of evidence in a few words: a configuration as ``r=4 α=4 q,v lr=0.01: mean ± std (n)``,
    lists of up to 8 items, numbers with 4 significant digits."""
    if isinstance(value, dict):
        if isinstance(value.get("params"), dict):
            n = value.get("n")
            return f"{params_label(value['params'])}: {_mean_std(value.get('mean'), value.get('std'), n)}"
        if depth >= 2:
            return "{…}"
        return "{" + ", ".join(f"{k}: {_compact(v, depth + 1)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        items = [_compact(v, depth + 1) for v in list(value)[:8]]
        more = f", … ({len(value)} in all)" if len(value) > 8 else ""
        sep = "; " if any(isinstance(v, dict) for v in value) else ", "
        return "[" + sep.join(items) + more + "]"
    return fmt_num(value)


def _evidence(evidence: Any) -> str:
    if not isinstance(evidence, dict):
        return _compact(evidence)
    return "; ".join(f"{k}={_compact(v)}" for k, v in evidence.items())


def decisions_html(ladder: dict[str, Any]) -> str:
    decisions = ladder.get("decisions") or []
    if not isinstance(decisions, list) or not decisions:
        return note("the ladder has recorded no decision yet")
    rows = []
    for d in decisions:
        if not isinstance(d, dict):
            continue
        stage = d.get("stage")
        stage_text = f"{stage} ({STAGES[stage]})" if isinstance(stage, int) and stage in STAGES else fmt_num(stage)
        rows.append([stage_text, fmt_num(d.get("rung")), str(d.get("kind", "")), str(d.get("text", "")),
                     _evidence(d.get("evidence"))])
    facts = []
    if ladder.get("threshold") is not None:
        facts.append(f"threshold {fmt_num(ladder.get('threshold'))}")
    facts.append("done" if ladder.get("done") else "not done yet")
    return (how("The rank ladder's decisions in the order it took them: each says what it compared and "
                "with which numbers (the evidence column lists them as recorded).")
            + table(["stage", "rung", "kind", "decision", "evidence"], rows, cls="decisions")
            + f'<p class="how">Ladder: {_e(", ".join(facts))}.</p>')


def summary_section(page: Page, data: SweepData) -> None:
    cfg = data.config
    counts = ", ".join(f"{n} {s}" for s, n in sorted(data.counts.items(), key=lambda kv: -kv[1]))
    facts = [("sweep", data.name), ("model", f"{cfg.model.name} ({cfg.model.task})"), ("data", _data_label(data)),
             ("strategy", cfg.search.strategy + (" (with a ladder record)" if data.ladder is not None
                                                  and not data.ladder_sweep else "")),
             ("objective", f"{data.objective} ({data.direction})"), ("seeds per configuration", data.seeds),
             ("trials", f"{len(data.trials)}: {counts}"), ("configurations with a COMPLETE trial", len(data.configs)),
             ("MLflow parent run", data.parent_run_id or "–")]
    stages = sorted({t.stage for t in data.trials if t.stage is not None})
    if stages:
        by_stage = ", ".join(f"stage {s} ({STAGES.get(s, s)}): {sum(1 for t in data.trials if t.stage == s)}"
                             for s in stages)
        facts.append(("trials by ladder stage", by_stage))
    dl = "".join(f'<dt>{_e(k)}</dt><dd data-key="{_e(k)}">{_e(v)}</dd>' for k, v in facts)
    body = how("What was swept and what it found. The recommendation is the configuration to use; the "
               "best-quality configuration is the one with the best seed mean, whatever it costs.")
    body += f'<dl class="facts" id="facts">{dl}</dl>'
    body += "".join(note(n) for n in data.notes)
    if data.ladder is not None and not isinstance(data.ladder.get("recommendation"), dict):
        body += note(f"The rank ladder has not recommended a configuration yet (done: "
                     f"{fmt_num(bool(data.ladder.get('done')))}); the recommendation below is derived by this report.")
    body += ('<div class="cards">' + choice_card(data, data.recommendation, "recommendation", "Recommendation")
             + choice_card(data, data.best_quality, "best-quality", "Best quality") + "</div>")
    if data.ladder is not None:
        body += "<h3>The ladder's decisions</h3>" + decisions_html(data.ladder)
    page.section("summary", "Summary", body)
    page.data.update({"sweep": data.name, "objective": data.objective, "direction": data.direction,
                      "counts": data.counts, "recommendation": choice_json(data.recommendation),
                      "best_quality": choice_json(data.best_quality), "noise": data.noise,
                      "decisions": (data.ladder or {}).get("decisions"), "notes": data.notes})


def rank_table_html(data: SweepData) -> str:
    targets, ranks, cells = rank_table(data)
    rows = []
    for t in targets:
        row = [f"<th>{_e(t)}</th>"]
        for r in ranks:
            cell = cells.get((t, r))
            if cell is None:
                row.append('<td class="num">–</td>')
                continue
            c = cell.config
            row.append(f'<td class="num" data-targets="{_e(t)}" data-r="{r}" data-mean="{_attr_num(c.mean)}" '
                       f'data-std="{_attr_num(c.std)}" data-n="{c.n}" title="{_e(c.label)}">'
                       f"{_e(_mean_std(c.mean, c.std, c.n))}</td>")
        rows.append(row)
    return table(["target set"] + [f"r={r}" for r in ranks], rows, cls="rank-table", raw=True).replace(
        '<table class="rank-table">', f'<table class="rank-table" data-sweep="{_e(data.name)}">')


def rank_json(data: SweepData) -> list[dict[str, Any]]:
    targets, ranks, cells = rank_table(data)
    return [{"targets": t, "r": r, "mean": cells[(t, r)].config.mean, "std": cells[(t, r)].config.std,
             "n": cells[(t, r)].config.n, "values": cells[(t, r)].config.values,
             "trials": [x.number for x in cells[(t, r)].config.trials], "params": cells[(t, r)].config.params,
             "alternatives": cells[(t, r)].alternatives}
            for t in targets for r in ranks if (t, r) in cells]


def rank_section(page: Page, data: SweepData) -> None:
    from dashboards.figures import rank_figure

    _, ranks, cells = rank_table(data)
    several = any(c.alternatives > 1 for c in cells.values())
    body = how(f"The objective {data.objective} against the LoRA rank (log2 axis), one line per target set: "
               "each point is the mean over seeds, the bar one standard deviation (n - 1), n the number of "
               "seeds. Flat lines mean a higher rank buys nothing; the table below holds the same numbers.")
    if several:
        body += note("Other params vary between configurations at the same rank and target set: each point "
                     "shows the configuration with the best seed mean there (hover for its params).")
    if len(ranks) == 1:
        body += note(f"The sweep has one rank (r={ranks[0]}) among its COMPLETE trials.")
    if data.shortened:
        steps = sorted({t.steps for t in data.shortened if t.steps is not None})
        body += note(f"{len(data.shortened)} learning-rate calibration trial(s) trained for fewer steps "
                     f"({', '.join(str(x) for x in steps)}) are left out here and in every comparison of "
                     "quality: their numbers are not comparable with full-length trials (the ladder's "
                     "decisions list them).")
    body += page.figure(rank_figure([data]), "fig-rank")
    body += how("Rows: target sets; columns: ranks; cells: mean ± std (n) of the objective over seeds.")
    body += rank_table_html(data)
    page.section("rank", f"{data.objective} vs rank", body)
    page.data["rank_table"] = rank_json(data)


def cost_section(page: Page, data: SweepData) -> None:
    from dashboards.figures import cost_figure

    fig, fronts, notes = cost_figure(data)
    better = "higher" if data.maximize else "lower"
    body = how(f"Each point is one configuration (mean {data.objective} over its seeds, {better} is better) "
               "against what it cost: trainable parameters, training time and peak memory (means over seeds). "
               "The connected diamonds are the Pareto front: no other configuration is at least as good for "
               "no more cost.")
    body += "".join(note(n) for n in notes)
    if fig is not None:
        body += page.figure(fig, "fig-cost")
    by_key = {c.key: c for c in data.configs}
    rows = []
    for metric, keys in fronts.items():
        for key in keys:
            c = by_key[key]
            rows.append([metric, c.label, _mean_std(c.mean, c.std, c.n), fmt_num(c.cost.get(metric))])
    if rows:
        body += "<details><summary>Pareto fronts as a table</summary>" + table(
            ["cost", "configuration", f"{data.objective} mean ± std (n)", "cost value"], rows, cls="pareto") + \
            "</details>"
    page.section("cost", "Quality vs cost", body)
    page.data["pareto"] = {m: [by_key[k].params for k in keys] for m, keys in fronts.items()}
    page.data["configs"] = [{"params": c.params, "mean": c.mean, "std": c.std, "n": c.n, "values": c.values,
                             "cost": c.cost, "trials": [t.number for t in c.trials]} for c in data.configs]


def curves_section(page: Page, data: SweepData, curves: list[Curve], notes: list[str]) -> None:
    from dashboards.figures import curves_figure

    body = how(f"Validation {data.objective} (top) and training loss (bottom) against the training step "
               "for every COMPLETE and PRUNED trial, from MLflow's metric histories: one colour per "
               "configuration, one dash style per seed. Curves that still climb at the end were stopped early.")
    body += "".join(note(n) for n in notes)
    if curves:
        body += page.figure(curves_figure(data, curves), "fig-curves")
    page.section("curves", "Learning curves", body)


def optuna_section(page: Page, data: SweepData) -> None:
    from dashboards.figures import optuna_figures

    body = how("Optuna's own plots of the study: which params mattered (importances, fANOVA), how params "
               "combine into the objective (parallel coordinates, contour), and when each trial ran (timeline).")
    if data.shortened:
        body += note(f"The {len(data.shortened)} shorter learning-rate calibration trial(s) are left out of these "
                     "plots (the timeline shows every trial).")
    shown = {}
    for key, title, fig, text in optuna_figures(data):
        body += f"<h3>{_e(title)}</h3>"
        if fig is None:
            body += note(text)
        else:
            body += page.figure(fig, f"fig-optuna-{key}")
        shown[key] = fig is not None
    page.section("optuna", "Optuna's plots", body)
    page.data["optuna_plots"] = shown


def paper_section(page: Page, data: SweepData, sim: Similarity, amp: Amplification) -> None:
    from dashboards.adapters import describe_pair
    from dashboards.figures import amplification_figure, similarity_figure

    body = "<h3>Subspace similarity (the LoRA paper's Figure 3)</h3>"
    body += how("φ(A_low, A_high, i, j) = ‖U_lowᵢᵀ U_highⱼ‖²_F / min(i, j), with U the right-singular vectors "
                "of each adapter's A matrix: how much of the top-i directions learnt at the low rank lie in "
                "the top-j directions learnt at the high rank. Values near 1 mean the low-rank directions are "
                "contained in the high-rank adapter's top directions (a higher rank mostly adds directions "
                "that matter less); values near 0 mean they are unrelated.")
    if sim.grids:
        body += f'<p class="how">{_e(describe_pair(sim))}.</p>'
        body += page.figure(similarity_figure(sim), "fig-similarity")
        rows = [[g.module, fmt_num(g.grid[0][0]), fmt_num(g.grid[-1][-1]),
                 fmt_num(max(max(row) for row in g.grid))] for g in sim.grids]
        body += table(["module", "φ(1, 1)", f"φ({sim.low.r if sim.low else ''}, {sim.high.r if sim.high else ''})",
                       "max φ"], rows, cls="similarity")
    else:
        body += note(sim.note)
    body += "<h3>Amplification factor (the LoRA paper's Table 7)</h3>"
    body += how("‖ΔW‖_F / ‖UᵀWVᵀ‖_F, with U, V the top-r singular directions of the update ΔW = BA·α/r and W "
                "the base weight: how strongly the update amplifies directions that W itself barely uses. "
                "Large values mean ΔW amplifies directions that are weak in W (task-specific features the "
                "pre-trained weight does not emphasise); values near 1 or below mean it mostly repeats what W "
                "already does.")
    if amp.rows:
        assert amp.config and amp.trial
        body += (f'<p class="how">The {_e(amp.which)} configuration: {_e(amp.config.label)}, trial '
                 f"{amp.trial.number} (seed {amp.trial.seed_index}).</p>")
        body += page.figure(amplification_figure(amp), "fig-amplification")
        body += table(["module", "r", "‖ΔW‖_F", "‖UᵀWVᵀ‖_F", "amplification"],
                      [[r.module, str(r.r), fmt_num(r.delta_norm), fmt_num(r.projected_norm), fmt_num(r.factor)]
                       for r in amp.rows], cls="amplification")
        if amp.skipped:
            body += note("not analysed: " + "; ".join(amp.skipped))
    else:
        body += note(amp.note)
    page.section("paper", "The LoRA paper's analyses on this sweep's adapters", body)
    page.data["similarity"] = sim.as_json()
    page.data["amplification"] = amp.as_json()


def compare_section(page: Page, sweeps: list[SweepData]) -> None:
    from dashboards.figures import rank_figure

    body = how("Several sweeps side by side: the objective against the rank, one line per sweep and target "
               "set (mean ± std over seeds), and one summary row per sweep.")
    objectives = {d.objective for d in sweeps}
    if len(objectives) > 1:
        body += note(f"The sweeps optimise different objectives ({', '.join(sorted(objectives))}): "
                     "their lines share one axis but are not comparable.")
    body += page.figure(rank_figure(sweeps), "fig-compare-rank")
    rows = []
    for d in sweeps:
        best = d.best_config()
        rec = d.recommendation
        done = d.counts.get("COMPLETE", 0)
        rows.append([d.name, d.config.model.name, f"{d.objective} ({d.direction})",
                     f"{len(d.trials)} ({done} COMPLETE)", f"{best.label}: {_mean_std(best.mean, best.std, best.n)}",
                     (f"{params_label(rec.params)}: {_mean_std(rec.mean, rec.std, rec.n)}"
                      + (" (ladder)" if rec.source == "ladder" else "")) if rec else "–"])
    body += table(["sweep", "model", "objective", "trials", "best (mean ± std (n))", "recommendation"], rows,
                  cls="compare")
    page.section("compare", "Comparison", body)
    page.data["compare"] = [{"sweep": d.name, "objective": d.objective, "trials": len(d.trials),
                             "counts": d.counts, "best": {"params": d.best_config().params,
                                                          "mean": d.best_config().mean},
                             "recommendation": choice_json(d.recommendation), "rank_table": rank_json(d)}
                            for d in sweeps]


def trials_section(page: Page, data: SweepData) -> None:
    rows = []
    for t in data.trials:
        p = t.params
        rows.append([str(t.number), t.state, fmt_num(t.stage), fmt_num(t.rung), fmt_num(p.get("r")),
                     fmt_num(effective_alpha(p)) if "r" in p else "–", str(p.get("targets", "–")),
                     fmt_num(p.get("lr"), 3), fmt_num(p.get("dropout")), str(t.seed_index), fmt_num(t.value),
                     fmt_num(t.metrics.get("trainable_params")), fmt_num(t.metrics.get("train_s")), t.run_id or "–"])
    body = how("Every trial of the study in number order, with its MLflow run.")
    body += "<details><summary>Show the trial table</summary>" + table(
        ["trial", "state", "stage", "rung", "r", "alpha", "targets", "lr", "dropout", "seed", data.objective,
         "trainable params", "train s", "MLflow run"], rows, cls="trials") + "</details>"
    page.section("trials", f"All {len(data.trials)} trials", body)


def render(data: SweepData, compare: list[SweepData], curves: list[Curve], curve_notes: list[str],
           sim: Similarity, amp: Amplification) -> str:
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = Page(f"lora-sweep report: {data.name}",
                f"{data.config.model.name} on {_data_label(data)} · {data.objective} ({data.direction}) · "
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
