"""The report's sections after the summary, one function each: the objective against the rank,
quality against cost, learning curves, Optuna's plots, the LoRA paper's analyses, the comparison of
several sweeps, and the table of every trial. Each adds its HTML to the page and its numbers to the
page's JSON data block."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dashboards.markup import Page, attr_num, esc, how, note, table
from dashboards.records import SweepData, effective_alpha, fmt_num, mean_std, params_label
from dashboards.summary import choice_json
from dashboards.views import rank_table

if TYPE_CHECKING:
    from dashboards.adapters import Amplification, Similarity
    from dashboards.figures import Curve

__all__ = ["compare_section", "cost_section", "curves_section", "optuna_section", "paper_section", "rank_json",
           "rank_section", "rank_table_html", "trials_section"]


def rank_table_html(data: SweepData) -> str:
    targets, ranks, cells = rank_table(data)
    rows = []
    for t in targets:
        row = [f"<th>{esc(t)}</th>"]
        for r in ranks:
            cell = cells.get((t, r))
            if cell is None:
                row.append('<td class="num">–</td>')
                continue
            c = cell.config
            row.append(f'<td class="num" data-targets="{esc(t)}" data-r="{r}" data-mean="{attr_num(c.mean)}" '
                       f'data-std="{attr_num(c.std)}" data-n="{c.n}" title="{esc(c.label)}">'
                       f"{esc(mean_std(c.mean, c.std, c.n))}</td>")
        rows.append(row)
    return table(["target set"] + [f"r={r}" for r in ranks], rows, cls="rank-table", raw=True).replace(
        '<table class="rank-table">', f'<table class="rank-table" data-sweep="{esc(data.name)}">')


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
            rows.append([metric, c.label, mean_std(c.mean, c.std, c.n), fmt_num(c.cost.get(metric))])
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
        body += f"<h3>{esc(title)}</h3>"
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
        body += f'<p class="how">{esc(describe_pair(sim))}.</p>'
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
        body += (f'<p class="how">The {esc(amp.which)} configuration: {esc(amp.config.label)}, trial '
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
                     f"{len(d.trials)} ({done} COMPLETE)", f"{best.label}: {mean_std(best.mean, best.std, best.n)}",
                     (f"{params_label(rec.params)}: {mean_std(rec.mean, rec.std, rec.n)}"
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
