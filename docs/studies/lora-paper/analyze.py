"""The LoRA-paper study's analysis: Tables 5-7 and Figure 3 of Hu et al. (2021) from a lora-sweep sweep.

    python docs/studies/lora-paper/analyze.py docs/studies/lora-paper/study.yaml --home ~/lora-study \\
        --out docs/studies/lora-paper/results
    python docs/studies/lora-paper/analyze.py docs/studies/lora-paper/pilot.yaml --home ~/lora-study \\
        --out /tmp/pilot --pilot

Reads the sweep's Optuna study and MLflow runs (``dashboards.collect``; nothing is written to the sweep)
and the adapters its runs logged, and writes to ``--out``:

- ``results.json``: every number of the tables, and per configuration (targets, r) the seeds' values,
  mean, std, n and trainable LoRA parameters (the runs' ``lora_params`` metric);
- ``tables.md``: Table 5 (target sets at one budget of rank x matrices), Table 6 (rank x target set),
  the pooled seed std, Figure 3's subspace similarities (query/value of the (q,v) adapters at the two
  ``--phi-ranks``, same-seed and cross-seed pairs, against random Gaussian A matrices) and Table 7
  (amplification factor of the (q,v) adapters' dW_q and dW_v, every rank present);
- ``figures.html`` (plotly, offline) and one PNG per figure (``figures.py``, headless Chromium).

The adapter analyses (Figure 3, Table 7) are ``adapter_analyses.py``, the figures ``figures.py``.

Comparisons are ``sweeps.stats.compare`` (one-sided Student t on the pooled seed std of the whole sweep,
false-gain rate ``ALPHA`` split Bonferroni over the comparisons of one table, one look). ``--pilot``
writes ``pilot.md``/``pilot.json`` instead: per validation step, each configuration's mean ± std over
seeds and the largest/smallest pairwise difference in standard errors of a difference. A missing
configuration is "not run" in a table; a missing sweep or home, or a configuration named by
``--phi-ranks``/``--amp-ranks`` that the sweep lacks, is a one-line error (exit 2).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from adapter_analyses import DRAWS, PAIR_TARGETS, TYPES, Cells, StudyError, figure3, label, stat, table7

from dashboards.adapters import AdapterCache
from dashboards.collect import collect
from dashboards.records import ConfigStats, SweepData, fmt_num, mean_std
from lora_core import LoraError
from sweeps.stats import GAIN, compare, pooled_std, t_quantile

ALPHA = 0.05       # false-gain rate of one table, split over its comparisons
TABLE5 = [("q", 8), ("k", 8), ("v", 8), ("o", 8), ("q,k", 4), ("q,v", 4), ("q,k,v,o", 2)]
TABLE5_REFS = [("q,v", 4), ("q,k,v,o", 2)]
TABLE6_TARGETS = ["q", "q,v", "q,k,v,o"]


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


# --------------------------------------------------------------------------- Tables 5 and 6

def cells_of(data: SweepData) -> Cells:
    out: Cells = {}
    for c in data.configs:
        key = (c.targets.replace(" ", ""), c.r)
        if key in out:
            raise StudyError(f"two configurations of {label(*key)} ({out[key].label}; {c.label}): the analysis "
                             "expects one lr/alpha/dropout per (targets, r)")
        out[key] = c
    return out


def config_json(c: ConfigStats) -> dict[str, Any]:
    lora = [t.metrics["lora_params"] for t in c.trials if "lora_params" in t.metrics]
    return {"targets": c.targets, "r": c.r, "params": c.params, "mean": c.mean, "std": c.std, "n": c.n,
            "lora_params": round(statistics.fmean(lora)) if lora else None,
            "trainable_params": c.cost.get("trainable_params"),
            "seeds": [{"seed_index": t.seed_index, "trial": t.number, "run_id": t.run_id, "value": t.value}
                      for t in c.trials]}


def verdict(data: SweepData, cand: ConfigStats, inc: ConfigStats, noise: dict[str, Any],
            comparisons: int) -> dict[str, Any]:
    c = compare(cand.values, inc.values, noise["pooled_std"], noise["dof"], maximize=data.maximize,
                alpha=ALPHA, comparisons=comparisons)
    return {"candidate": label(cand.targets, cand.r), "incumbent": label(inc.targets, inc.r),
            "verdict": c.verdict, "gain": c.gain, "se": c.se, "t": c.t, "lower": c.lower, "upper": c.upper}


def table5(data: SweepData, cells: Cells, noise: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Each row against (q,v) r=4 and against (q,k,v,o) r=2: is the row a gain over the reference?"""
    present = [k for k in TABLE5 if k in cells]
    comparisons = sum(1 for ref in TABLE5_REFS if ref in cells for k in present if k != ref)
    out: dict[str, Any] = {"alpha": ALPHA, "comparisons": comparisons, "looks": 1, "rows": []}
    rows = []
    for k in TABLE5:
        c = cells.get(k)
        row: dict[str, Any] = {"targets": k[0], "r": k[1], "run": c is not None}
        text = [label(*k), "not run", "–"]
        if c is not None:
            row |= {"mean": c.mean, "std": c.std, "n": c.n, "lora_params": config_json(c)["lora_params"]}
            text[1:] = [mean_std(c.mean, c.std, c.n), fmt_num(row["lora_params"])]
        for ref in TABLE5_REFS:
            if c is None or ref not in cells or k == ref:
                text.append("not run" if c is None else "–" if k == ref else "reference not run")
                continue
            v = row[f"vs {label(*ref)}"] = verdict(data, c, cells[ref], noise, comparisons)
            text.append(f"{v['verdict']} ({v['gain']:+.4f})")
        out["rows"].append(row)
        rows.append(text)
    head = ["configuration", f"{data.objective} mean ± std (n)", "LoRA params",
            *(f"vs {label(*ref)}" for ref in TABLE5_REFS)]
    return out, md_table(head, rows)


def table6(data: SweepData, cells: Cells, noise: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Rank x target set; per target set, compare(best rank, each other rank)."""
    ranks = sorted({r for t, r in cells if t in TABLE6_TARGETS})
    best = {t: max((cells[(t, r)] for r in ranks if (t, r) in cells),
                   key=lambda c: c.mean if data.maximize else -c.mean, default=None) for t in TABLE6_TARGETS}
    comparisons = sum(1 for (t, _), c in cells.items() if t in TABLE6_TARGETS and c is not best[t])
    out: dict[str, Any] = {"alpha": ALPHA, "comparisons": comparisons, "looks": 1, "ranks": ranks, "rows": {}}
    rows = []
    for t in TABLE6_TARGETS:
        b = best[t]
        found: dict[str, Any] = {"best_r": b.r if b else None, "cells": {}}
        text = [t]
        for r in ranks:
            c = cells.get((t, r))
            if c is None or b is None:
                text.append("not run")
                continue
            v = None if c is b else verdict(data, b, c, noise, comparisons)
            found["cells"][str(r)] = {"mean": c.mean, "std": c.std, "n": c.n, "best_vs_this": v}
            text.append(mean_std(c.mean, c.std, c.n) + (" **best**" if v is None else
                                                        "" if v["verdict"] == GAIN else " ≈"))
        out["rows"][t] = found
        rows.append(text)
    return out, md_table(["targets", *(f"r={r}" for r in ranks)], rows)


def figure3_md(fig: dict[str, Any]) -> str:
    if "note" in fig:
        return str(fig["note"])
    pts = [f"phi({i},{j})" for i, j in fig["points"]]

    def cell(v: dict[str, Any], p: str) -> str:
        text = [f"{v[k][p]['mean']:.3f}±{v[k][p]['std'] or 0:.3f}" if k in v else "–" for k in ("same", "cross")]
        return " / ".join([*text, f"{fig['random'][p]['mean']:.3f}"])

    parts = []
    for typ in TYPES:
        rows = [[key.split(".")[1], *(cell(v, p) for p in pts)] for key, v in fig["layers"].items()
                if key.startswith(typ)]
        mean = fig["mean_over_layers"].get(typ, {})
        rows.append(["mean", *(" / ".join([*(f"{mean[k][p]:.3f}" if k in mean else "–" for k in ("same", "cross")),
                                           f"{fig['random'][p]['mean']:.3f}"]) for p in pts)])
        parts.append(f"**W_{typ[0]} ({typ})**, same-seed / cross-seed / random:\n\n" + md_table(["layer", *pts], rows))
    return "\n\n".join(parts)


def table7_md(t7: dict[str, Any]) -> str:
    if "note" in t7:
        return str(t7["note"])
    cols = ["dW_norm", "proj_dW", "factor", "proj_W_top", "proj_random", "W_norm"]
    head = ["r", "matrix", "layer", "‖ΔW‖_F", "‖UᵀWVᵀ‖_F (U, V of ΔW)", "amplification", "‖UᵀWVᵀ‖_F (W top-r)",
            "‖UᵀWVᵀ‖_F (random)", "‖W‖_F"]
    rows = []
    for r, block in t7["ranks"].items():
        for key, v in [*block["layers"].items(), *((f"{typ}.mean", v) for typ, v in block["mean"].items())]:
            typ, layer = key.split(".")
            rows.append([r, f"W_{typ[0]}", layer, *(f"{v[c]:.4g}" for c in cols)])
    return md_table(head, rows)


# --------------------------------------------------------------------------- pilot: effect-to-noise over steps

def pilot(data: SweepData) -> tuple[dict[str, Any], str]:
    key = f"val_{data.objective}"
    if data.client is None:
        raise StudyError(f"the MLflow store {data.tracking_uri} cannot be read: no validation histories")
    series: dict[str, dict[int, list[float]]] = {}      # configuration -> step -> one value per seed
    for c in data.configs:
        for t in (t for t in c.trials if t.run_id):
            history = {int(m.step): float(m.value) for m in data.client.get_metric_history(t.run_id, key)}
            for step, value in sorted(history.items()):  # one value per run and step
                series.setdefault(label(c.targets, c.r), {}).setdefault(step, []).append(value)
    if len(series) < 2:
        raise StudyError(f"the pilot needs two COMPLETE configurations with a {key} history (found {len(series)})")
    names, n_pairs = list(series), math.comb(len(series), 2)
    out: dict[str, Any] = {"sweep": data.name, "metric": key, "alpha": ALPHA, "pairs": n_pairs, "steps": []}
    rows = []
    for step in sorted(set.intersection(*(set(s) for s in series.values()))):
        groups = {n: series[n][step] for n in names}
        pooled, dof = pooled_std(groups.values())
        ratios = []
        for a, b in itertools.combinations(names, 2) if pooled else []:
            diff = statistics.fmean(groups[a]) - statistics.fmean(groups[b])
            better, worse = (a, b) if (diff >= 0) == data.maximize else (b, a)
            v = compare(groups[better], groups[worse], pooled, dof, maximize=data.maximize, alpha=ALPHA,
                        comparisons=n_pairs)
            se = pooled * math.sqrt(1 / len(groups[a]) + 1 / len(groups[b]))
            ratios.append({"pair": f"{better} vs {worse}", "diff": abs(diff), "se": se, "ratio": abs(diff) / se,
                           "verdict": v.verdict})
        ratios.sort(key=lambda x: x["ratio"])
        t_crit = t_quantile(1 - ALPHA / n_pairs, dof) if dof else None
        out["steps"].append({"step": step, "configs": {n: stat(g) | {"values": g} for n, g in groups.items()},
                             "pooled_std": pooled, "dof": dof, "t_crit": t_crit, "pairs": ratios})
        ends = [f"{x['ratio']:.2f} ({x['pair']})" for x in (ratios[-1], ratios[0])] if ratios else ["–", "–"]
        rows.append([str(step), *(mean_std(**stat(g)) for g in groups.values()), f"{fmt_num(pooled)} ({dof})",
                     *ends, fmt_num(t_crit, 3), f"{sum(x['verdict'] == GAIN for x in ratios)}/{len(ratios)}"])
    head = ["step", *names, "pooled std (dof)", "largest \\|d\\|/SE", "smallest \\|d\\|/SE", "t crit", "separated"]
    text = (f"# Pilot: effect against seed noise by training length ({data.name})\n\n"
            f"`{key}` at each evaluation step: per configuration mean ± std (seeds); the pooled seed std over the "
            f"configurations at that step (dof); |d|/SE: the largest and smallest difference of two configurations' "
            f"means over the SE of a difference, pooled std x sqrt(1/n_a + 1/n_b); *t crit*: the Student t that a "
            f"gain needs (1 − {ALPHA}/{n_pairs}, Bonferroni over {n_pairs} pair{'s' * (n_pairs > 1)}, pooled dof); *separated*: "
            f"pairs `sweeps.stats.compare` calls a gain for the better one at that split.\n\n"
            + md_table(head, rows) + "\n")
    return out, text


# --------------------------------------------------------------------------- main

def ranks_arg(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"ranks must be integers separated by commas, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", help="the sweep's YAML (or its name)")
    p.add_argument("--home", required=True, help="the lora-sweep home the sweep ran with")
    p.add_argument("--out", required=True, type=Path, help="folder for the outputs")
    p.add_argument("--pilot", action="store_true", help="the pilot's effect-to-noise table instead of Tables 5-7")
    p.add_argument("--phi-ranks", type=ranks_arg, help="LOW,HIGH ranks of the (q,v) adapters of Figure 3 (8,64)")
    p.add_argument("--amp-ranks", type=ranks_arg, help="ranks of the (q,v) adapters in the Table 7 figure (4,64)")
    p.add_argument("--no-png", action="store_true", help="write figures.html only, no PNGs")
    p.add_argument("--report", action="store_true",
                   help="also build the sweep's lora-sweep report (not logged) and keep its rank and cost "
                        "figures as fig-rank.png and fig-cost.png")
    args = p.parse_args(argv)
    try:
        return run(args)
    except (StudyError, LoraError) as exc:
        print(f"analyze.py: error: {getattr(exc, 'message', exc)}".splitlines()[0], file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    from sweeps.config.ref import looks_like_file, resolve_sweep

    if not Path(args.home).expanduser().is_dir():
        raise StudyError(f"home {args.home} does not exist")
    if looks_like_file(args.sweep) and not Path(args.sweep).is_file():
        raise StudyError(f"sweep file {args.sweep} does not exist")
    phi, amp = args.phi_ranks or [8, 64], args.amp_ranks or [4, 64]
    if len(phi) != 2 or phi[0] >= phi[1]:
        raise StudyError(f"--phi-ranks takes LOW,HIGH with LOW < HIGH, got {phi}")
    data = collect(resolve_sweep(args.sweep, home=args.home))
    cells = cells_of(data)
    for given, ranks in ((args.phi_ranks, phi), (args.amp_ranks, amp)):
        missing = [r for r in ranks if (PAIR_TARGETS, r) not in cells]
        if given and missing:
            raise StudyError(f"sweep {data.name} has no COMPLETE {label(PAIR_TARGETS, missing[0])} configuration")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.pilot:
        found, text = pilot(data)
        (args.out / "pilot.json").write_text(json.dumps(found, indent=1) + "\n")
        (args.out / "pilot.md").write_text(text)
        print(text + f"\nwrote {args.out / 'pilot.md'}, {args.out / 'pilot.json'}")
        return 0
    pooled, dof = pooled_std(c.values for c in data.configs)
    noise = {"pooled_std": pooled, "dof": dof, "configurations": len(data.configs)}
    t5, t5_md = table5(data, cells, noise)
    t6, t6_md = table6(data, cells, noise)
    cache = AdapterCache(data)
    try:
        f3, t7 = figure3(cells, cache, *phi), table7(data, cells, cache)
    finally:
        cache.close()
    results = {"sweep": data.name, "objective": data.objective, "direction": data.direction, "noise": noise,
               "configurations": [config_json(c) for c in sorted(data.configs, key=lambda c: (c.targets, c.r))],
               "table5": t5, "table6": t6, "figure3": f3, "table7": t7}
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    rule = (f"`sweeps.stats.compare`, α = {ALPHA} split Bonferroni over the table's comparisons, one look, "
            f"pooled seed std {fmt_num(pooled)} ({dof} dof, all {len(data.configs)} configurations)")
    md = [f"# LoRA-paper study: {data.name} ({data.objective})\n",
          f"Pooled seed std over all {len(data.configs)} configurations: {fmt_num(pooled)} ({dof} degrees of "
          "freedom).\n",
          f"## Table 5: one budget of rank x matrices per layer\n\nEach row against the reference column: *gain* = "
          f"the row is clearly better, *no gain* = clearly worse, *undecided* = within the noise (the difference "
          f"in parentheses). {rule}; comparisons: {t5['comparisons']}.\n\n{t5_md}\n",
          f"## Table 6: rank x target set\n\n**best**: the row's best rank; ≈: within the noise of the best "
          f"(compare(best, this) is not a gain); no mark: the best is clearly better. {rule}; "
          f"comparisons: {t6['comparisons']}.\n\n{t6_md}\n",
          f"## Figure 3: subspace similarity of the {PAIR_TARGETS} adapters, r={phi[0]} vs r={phi[1]}\n\n"
          f"phi(A_r={phi[0]}, A_r={phi[1]}, i, j), mean±std over seed pairs; random: two Gaussian A matrices of "
          f"the same shapes, {DRAWS} draws (≈ j/d).\n\n{figure3_md(f3)}\n",
          f"## Table 7: amplification factor of the {PAIR_TARGETS} adapters\n\nMeans over seeds; U, V of rank r "
          f"from ΔW, from W's own SVD, or random orthonormal ({DRAWS} draws).\n\n{table7_md(t7)}\n"]
    (args.out / "tables.md").write_text("\n".join(md))
    import figures

    written = figures.write_all(results, amp, args.out, png=not args.no_png)
    if args.report:
        import tempfile

        from dashboards.report import build

        with tempfile.TemporaryDirectory(prefix="lora-study-report-") as tmp:
            page = build(data.config, Path(tmp) / "report.html", log_to_mlflow=False).path
            written += figures.render_png(page, ["fig-rank", "fig-cost"], args.out)
    print("\n".join(md) + "\nwrote " + ", ".join(map(str, [args.out / "results.json", args.out / "tables.md", *written])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
