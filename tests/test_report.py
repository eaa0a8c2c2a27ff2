"""Tests of ``lora-sweep report``: the HTML report of a sweep, read back against the study and the store.

Three real sweeps run once per session (shared with ``test_report_browser``) on the tiny BERT of
``test_train`` (20 steps a trial): ``tiny-report``, a grid of ranks 1 and 4 by target sets q,v and
q,k,v,o at two seeds (8 trials); ``tiny-other``, ranks 2 and 8 on q,v at one seed; and ``tiny-ladder``,
the real rank ladder (two 10-step calibration trials, ranks 1, 2, 4 at two to four seeds, then q,k,v,o). The
Optuna storage is the real journal file, the MLflow store a real sqlite file. One test also fabricates
a ladder decision record (in the shape sweeps/engine/ladder.py writes) on a copy of the grid's study. Nothing
touches the network.
"""

from __future__ import annotations

import html
import html.parser
import json
import math
import re
import shutil
import statistics
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState
from support import (
    LADDER,
    MAIN,
    OTHER,
    Sweeps,
    complete_trials,
    error_lines,
    rank_stats,
    report_data,
    seeded_home,
    write_sweep,
)

from dashboards.report import build_report
from sweeps.cli.main import main
from sweeps.config.ref import resolve_sweep
from sweeps.config.sweep import SweepConfig, load_sweep_config
from sweeps.engine.study import open_study
from sweeps.names import LADDER_ATTR, STAGE_ATTR, STEPS_ATTR
from sweeps.stats import t_quantile

pytestmark = pytest.mark.usefixtures("isolated")  # hub offline, a private data cache, quiet progress bars


# --------------------------------------------------------------------------- the sweeps (once per session)


def fabricated_ladder(sweeps: Sweeps, study: optuna.Study) -> dict[str, Any]:
    """A decision record in the shape sweeps/engine/ladder.py writes, with numbers from the real study."""
    stats = rank_stats(study)
    runs = {t.number: t.user_attrs["mlflow_run_id"] for t in complete_trials(study)}
    client = sweeps.client()
    low, high = stats[("q,v", 1)], stats[("q,v", 4)]
    pooled = math.sqrt(((low[1] or 0) ** 2 + (high[1] or 0) ** 2) / 2)
    delta = high[0] - low[0]
    rec_params = {"r": 1, "alpha": 2.0, "targets": "q,v", "lr": 0.01, "dropout": 0.0}
    trainable = client.get_run(runs[low[3][0]]).data.metrics["trainable_params"]
    best_key = max(stats, key=lambda k: stats[k][0])
    best = stats[best_key]
    return {
        "decisions": [
            {"stage": 0, "rung": None, "kind": "calibration",
             "text": f"Calibrated lr=0.01 at r=1 on q,v: mean accuracy {low[0]:.6f} over {low[2]} seeds.",
             "evidence": {"mean": low[0], "std": low[1], "n": low[2], "values": [0.01]}},
            {"stage": 1, "rung": 1, "kind": "rank",
             "text": f"r=4 against r=1: delta {delta:.6f} with pooled std {pooled:.6f}.",
             "evidence": {"mean": high[0], "best_mean": low[0], "delta": delta, "pooled_std": pooled,
                          "significant": False}},
            {"stage": 1, "rung": 1, "kind": "stop", "text": "Stopped the ladder: r=4 is not better than r=1.",
             "evidence": {"threshold": low[0] - pooled}},
            {"stage": 3, "rung": None, "kind": "recommendation",
             "text": f"Recommend r=1 on q,v (mean {low[0]:.6f}, {int(trainable)} trainable parameters).",
             "evidence": {"mean": low[0], "trainable_params": trainable}},
        ],
        "recommendation": {"params": rec_params, "mean": low[0], "std": low[1], "n": low[2],
                           "trainable_params": trainable, "trials": low[3]},
        "best_quality": {"params": {"r": best_key[1], "alpha": 2.0 * best_key[1], "targets": best_key[0],
                                    "lr": 0.01, "dropout": 0.0},
                         "mean": best[0], "std": best[1], "n": best[2], "trainable_params": None,
                         "trials": best[3]},
        "threshold": low[0] - pooled, "done": True,
    }


@pytest.fixture(scope="module")
def ladder_copy(sweeps: Sweeps) -> tuple[SweepConfig, dict[str, Any]]:
    """A copy of tiny-report's study (same MLflow store) carrying a fabricated ladder record."""
    copy = sweeps.folder / "ladder" / f"{MAIN}.journal"
    copy.parent.mkdir()
    shutil.copyfile(sweeps.home / "optuna" / f"{MAIN}.journal", copy)
    study = sweeps.study(storage=copy)
    ladder = fabricated_ladder(sweeps, study)
    study.set_user_attr(LADDER_ATTR, ladder)
    return resolve_sweep(MAIN, [], storage=str(copy)), ladder


class Cells(html.parser.HTMLParser):
    """Collects the rank table's cells (their data-* attrs and text) and script tags' attrs."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[dict[str, str]] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self._cell: dict[str, str] | None = None
        self._in_rank_table = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "table":
            self._in_rank_table = "rank-table" in (a.get("class") or "")
        if tag == "td" and self._in_rank_table and "data-r" in a:
            self._cell = {k: v or "" for k, v in a.items()} | {"text": ""}

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None
        if tag == "table":
            self._in_rank_table = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell["text"] += data


def parse(text: str) -> Cells:
    parser = Cells()
    parser.feed(text)
    return parser


def plotly_js_marker() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()[:300]


def fmt(value: float) -> str:
    return f"{value:.4g}"


# --------------------------------------------------------------------------- the report


def test_report_is_one_offline_file_with_plotly_once(main_report: Path, sweeps: Sweeps,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    text = main_report.read_text(encoding="utf-8")
    assert text.count(plotly_js_marker()) == 1
    assert len(text) < 8 * 2**20, "plotly.js (~4.8 MB) plus figures"
    parsed = parse(text)
    external = [(tag, a) for tag, a in parsed.tags
                if any(re.match(r"\s*(https?:)?//", a.get(k) or "") for k in ("src", "href"))]
    assert external == [], "no script, link or image from the network"
    assert not [a for tag, a in parsed.tags if tag == "script" and a.get("src")]
    data = report_data(text)
    assert data["figures"] == ["fig-rank", "fig-cost", "fig-curves", "fig-optuna-importances",
                               "fig-optuna-parallel", "fig-optuna-contour", "fig-optuna-timeline",
                               "fig-similarity", "fig-amplification"]
    for div in data["figures"]:
        assert text.count(f'id="{div}"') == 1
    for heading in ("Summary", "accuracy vs rank", "Quality vs cost", "Learning curves", "Optuna's plots",
                    "Subspace similarity", "Amplification factor"):
        assert f"<h2>{html.escape(heading)}</h2>" in text or f"<h3>{html.escape(heading)}" in text
    assert not list(main_report.parent.glob(".*")), "no temporary file left behind"


def test_rank_table_equals_the_study(main_report: Path, sweeps: Sweeps) -> None:
    text = main_report.read_text(encoding="utf-8")
    expected = rank_stats(sweeps.study())
    assert set(expected) == {(t, r) for t in ("q,v", "q,k,v,o") for r in (1, 4)}
    cells = parse(text).cells
    assert {(c["data-targets"], int(c["data-r"])) for c in cells} == set(expected)
    for c in cells:
        mean, std, n, _ = expected[(c["data-targets"], int(c["data-r"]))]
        assert n == 2 and int(c["data-n"]) == n
        assert abs(float(c["data-mean"]) - mean) <= 1e-9
        assert abs(float(c["data-std"]) - std) <= 1e-9
        assert c["text"] == f"{fmt(mean)} ± {fmt(std)} ({n})"
    rows = {(row["targets"], row["r"]): row for row in report_data(text)["rank_table"]}
    for key, (mean, std, _n, numbers) in expected.items():
        assert abs(rows[key]["mean"] - mean) <= 1e-9 and abs(rows[key]["std"] - std) <= 1e-9
        assert rows[key]["trials"] == numbers


def test_summary_without_a_ladder_recommends_the_cheapest_shown_within_the_margin(main_report: Path,
                                                                              sweeps: Sweeps) -> None:
    text = main_report.read_text(encoding="utf-8")
    data = report_data(text)
    stats = rank_stats(sweeps.study())
    assert data["best_quality"]["source"] == "report"
    assert abs(data["best_quality"]["mean"] - max(s[0] for s in stats.values())) <= 1e-9
    best_key = (data["best_quality"]["params"]["targets"], data["best_quality"]["params"]["r"])  # ties: the report's
    # non-inferiority by the ladder's rule (sweeps.stats.noninferior), computed here from the study: a
    # configuration cheaper than the best is shown within the margin when (its mean - the best's) - t x
    # pooled seed std x sqrt(1/n + 1/n_best) > -margin, t at 1 - 0.05 / (the cheaper ones tested), the std
    # pooled over the four pairs of seeds (n - 1 weights); the recommendation is the cheapest shown, else the best
    pooled = math.sqrt(sum(s[1] ** 2 for s in stats.values()) / len(stats))
    assert abs(data["noise"]["pooled_std"] - pooled) <= 1e-9 and data["noise"]["dof"] == len(stats)
    margin = 0.01  # the default margin of accuracy: one point
    assert data["noise"]["margin"] == margin and "Student t" in data["noise"]["rule"]
    best = stats[best_key]
    client = sweeps.client()
    runs = {t.number: client.get_run(t.user_attrs["mlflow_run_id"]) for t in complete_trials(sweeps.study())}
    trainable = {k: statistics.fmean(runs[n].data.metrics["trainable_params"] for n in s[3]) for k, s in stats.items()}
    cheaper = sorted((k for k in stats if trainable[k] < trainable[best_key]), key=lambda k: trainable[k])
    assert data["noise"]["tested"] == len(cheaper)
    lower = {}
    if cheaper:
        t = t_quantile(1 - 0.05 / len(cheaper), len(stats))
        lower = {k: stats[k][0] - best[0] - t * pooled * math.sqrt(1 / stats[k][2] + 1 / best[2]) for k in cheaper}
    shown = [k for k in cheaper if lower[k] > -margin]
    expected = shown[0] if shown else best_key
    rec = data["recommendation"]
    assert rec["source"] == "report" and (rec["params"]["targets"], rec["params"]["r"]) == expected
    assert rec["trainable_params"] == trainable[expected]
    assert rec["trials"] == stats[expected][3]
    assert data["noise"]["shown"] == bool(shown)
    for row in data["noise"]["tried"]:
        key = (row["params"]["targets"], row["params"]["r"])
        assert abs(row["lower"] - lower[key]) <= 1e-9
    said = "within 0.01 of the best, shown (lower bound" if shown else "the best itself"
    assert said in rec["how"] and said in html.unescape(text)
    assert 'id="recommendation"' in text and f"{int(trainable[expected]):,}" in text
    assert "ladder's decisions" not in text
    assert f"{sum(1 for _ in sweeps.study().get_trials())}: 8 COMPLETE" in text


def test_pareto_fronts_equal_the_store(main_report: Path, sweeps: Sweeps) -> None:
    data = report_data(main_report.read_text(encoding="utf-8"))
    client = sweeps.client()
    stats = rank_stats(sweeps.study())
    runs = {t.number: client.get_run(t.user_attrs["mlflow_run_id"]) for t in complete_trials(sweeps.study())}
    for metric in ("trainable_params", "train_s", "peak_memory_bytes"):
        cost = {k: statistics.fmean(runs[n].data.metrics[metric] for n in s[3]) for k, s in stats.items()}
        # o dominates k: no more cost and at least the quality, one of them strictly (qualities within
        # 1e-12 are equal: seed means that differ by rounding only). Equal quality at lower cost dominates.
        def dominates(o: tuple, k: tuple, cost: dict = cost) -> bool:
            tie = abs(stats[o][0] - stats[k][0]) <= 1e-12
            at_least = tie or stats[o][0] > stats[k][0]
            return cost[o] <= cost[k] and at_least and (cost[o] < cost[k] or not tie)

        front = {k for k in stats if not any(dominates(o, k) for o in stats if o != k)}
        shown = {(p["targets"], p["r"]) for p in data["pareto"][metric]}
        assert shown == front, metric
        top = max(s[0] for s in stats.values())
        assert any(abs(stats[k][0] - top) <= 1e-12 for k in shown)  # a best configuration is always on the front
        # (accuracies are counts over the validation rows, so two configurations can tie on the best mean:
        # then the cheaper one dominates the other)
    by_key = {(c["params"]["targets"], c["params"]["r"]): c for c in data["configs"]}
    for k, s in stats.items():
        assert by_key[k]["cost"]["train_s"] == pytest.approx(statistics.fmean(
            runs[n].data.metrics["train_s"] for n in s[3]), abs=1e-12)


def test_ladder_decisions_and_recommendation_are_shown(ladder_copy: tuple[SweepConfig, dict[str, Any]],
                                                       tmp_path: Path) -> None:
    config, ladder = ladder_copy
    out = build_report(config, tmp_path / "ladder.html", log_to_mlflow=False)
    text = out.read_text(encoding="utf-8")
    for d in ladder["decisions"]:
        assert json.dumps(d["text"])[1:-1] in text or d["text"] in text
    assert "<h3>The ladder's decisions</h3>" in text
    assert f"pooled_std={fmt(ladder['decisions'][1]['evidence']['pooled_std'])}" in text
    assert "1 (rank ladder)" in text and "0 (lr calibration)" in text
    data = report_data(text)
    rec = data["recommendation"]
    assert rec["source"] == "ladder" and rec["trials"] == ladder["recommendation"]["trials"]
    assert rec["mean"] == ladder["recommendation"]["mean"]
    assert data["best_quality"]["trials"] == ladder["best_quality"]["trials"]
    assert 'id="recommendation" data-source="ladder"' in text
    assert f"{int(ladder['recommendation']['trainable_params']):,}" in text
    # the amplification factor is measured on the recommended configuration's seed-0 adapter
    assert data["amplification"]["which"] == "recommended"
    assert data["amplification"]["trial"] == ladder["recommendation"]["trials"][0]


def test_a_real_ladder_shows_its_decisions_and_keeps_calibration_apart(sweeps: Sweeps, tmp_path: Path) -> None:
    study = sweeps.study(LADDER)
    record = study.user_attrs[LADDER_ATTR]
    assert record["done"] and record["recommendation"] is not None
    calibration = [t.number for t in complete_trials(study) if STEPS_ATTR in t.user_attrs]
    assert len(calibration) == 2 and all(study.trials[n].user_attrs[STAGE_ATTR] == 0 for n in calibration)
    out = build_report(sweeps.ladder, tmp_path / "ladder.html", log_to_mlflow=False)
    text = out.read_text(encoding="utf-8")
    kinds = [d["kind"] for d in record["decisions"]]
    assert kinds[0] == "calibration" and "rank" in kinds and "recommendation" in kinds
    for d in record["decisions"]:
        assert f"<td>{html.escape(d['text'])}</td>" in text
    data = report_data(text)
    assert data["decisions"] == record["decisions"]
    rec = data["recommendation"]
    assert rec["source"] == "ladder" and rec["trials"] == record["recommendation"]["trials"]
    assert rec["mean"] == record["recommendation"]["mean"]
    assert 'id="recommendation" data-source="ladder"' in text
    # the rank table holds the full-length trials only, equal to the study's numbers
    stats = rank_stats(study)
    rows = {(row["targets"], row["r"]): row for row in data["rank_table"]}
    assert set(rows) == set(stats)
    for key, (mean, std, n, numbers) in stats.items():
        assert abs(rows[key]["mean"] - mean) <= 1e-9 and rows[key]["n"] == n and 2 <= n <= 4  # adaptive seeds
        assert abs(rows[key]["std"] - std) <= 1e-9 and rows[key]["trials"] == numbers
        assert not set(numbers) & set(calibration)
    assert "2 learning-rate calibration trial(s) trained for fewer steps (10)" in text
    assert "The 2 shorter learning-rate calibration trial(s) are left out of these plots" in text
    assert data["optuna_plots"] == {"importances": True, "parallel": True, "contour": True, "timeline": True}
    assert "<dd data-key=\"seeds per configuration\">2</dd>" in text
    assert data["amplification"]["which"] == "recommended"
    assert data["amplification"]["trial"] in record["recommendation"]["trials"]


def test_report_is_logged_to_the_parent_run(main_report: Path, sweeps: Sweeps, tmp_path: Path) -> None:
    study = sweeps.study()
    parent = study.user_attrs["lora_sweep.parent_run_id"]
    client = sweeps.client()
    assert "report.html" in [a.path for a in client.list_artifacts(parent)]
    local = Path(client.download_artifacts(parent, "report.html", dst_path=str(tmp_path)))
    assert local.read_bytes() == main_report.read_bytes()


def test_compare_puts_two_sweeps_side_by_side(sweeps: Sweeps, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "compare.html"
    assert main(["report", MAIN, "--home", str(sweeps.home), "--compare", OTHER, "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    text = out.read_text(encoding="utf-8")
    data = report_data(text)
    assert [c["sweep"] for c in data["compare"]] == [MAIN, OTHER]
    assert "fig-compare-rank" in data["figures"]
    other = rank_stats(sweeps.study(OTHER))
    got = {(row["targets"], row["r"]): row["mean"] for row in data["compare"][1]["rank_table"]}
    assert got == {k: v[0] for k, v in other.items()}
    compare_table = text.split('<table class="compare">', 1)[1].split("</table>", 1)[0]
    assert f"<td>{MAIN}</td>" in compare_table and f"<td>{OTHER}</td>" in compare_table
    for name in (f"{MAIN} · q,v", f"{MAIN} · q,k,v,o", f"{OTHER} · q,v"):
        assert json.dumps(name)[1:-1] in text or name in text
    # without --out a comparison gets its own file and artifact: the sweep's own report stays
    own = sweeps.home / "reports" / f"{MAIN}.html"
    before = own.read_bytes() if own.exists() else None
    assert main(["report", MAIN, "--home", str(sweeps.home), "--compare", OTHER]) == 0
    assert (sweeps.home / "reports" / f"{MAIN}-vs-{OTHER}.html").is_file()
    assert (own.read_bytes() if own.exists() else None) == before

    client = MlflowClient(tracking_uri=f"sqlite:///{sweeps.home / 'mlflow.db'}")
    parent = sweeps.study(MAIN).user_attrs["lora_sweep.parent_run_id"]
    assert f"report-vs-{OTHER}.html" in [a.path for a in client.list_artifacts(parent)]


def test_one_varying_param_skips_importances_and_contour_with_a_note(sweeps: Sweeps, tmp_path: Path) -> None:
    out = build_report(sweeps.other, tmp_path / "other.html", log_to_mlflow=False)
    text = out.read_text(encoding="utf-8")
    data = report_data(text)
    assert data["optuna_plots"] == {"importances": False, "parallel": True, "contour": False, "timeline": True}
    assert "it needs at least two params that vary, and 1 vary (r)" in text
    assert "a contour needs two params that vary" in text
    assert data["similarity"]["r_low"] == 2 and data["similarity"]["r_high"] == 8
    assert len(data["similarity"]["grids"][0]["phi"]) == 2  # r_low rows
    assert "the cheapest configuration" not in text and "one seed per configuration" in text


def test_bad_inputs_exit_2_with_a_hint_and_write_nothing(sweeps: Sweeps, tmp_path: Path, empty_store: Path,
                                                         tiny_model_dir: Path, tiny_data_file: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    def files(root: Path) -> list[Path]:
        return sorted(p for p in root.rglob("*"))

    before = files(sweeps.home)
    assert main(["report", "no-such-sweep", "--home", str(sweeps.home)]) == 2
    err = error_lines(capsys.readouterr().err)
    assert err[0].startswith("error: no sweep named 'no-such-sweep'") and err[1].startswith("  hint:")
    assert main(["report", MAIN, "--home", str(sweeps.home), "--compare", "nope"]) == 2
    assert "hint:" in capsys.readouterr().err
    assert main(["report", MAIN, "--home", str(sweeps.home), "--out", str(tmp_path)]) == 2
    assert "it is a directory" in capsys.readouterr().err
    assert files(sweeps.home) == before

    # a sweep whose only trial failed: the study exists, nothing COMPLETE
    (tmp_path / "failed").mkdir()
    home = seeded_home(tmp_path / "failed", empty_store)
    path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, home, name="all-failed")
    study = open_study(load_sweep_config(path))
    study.tell(study.ask(), state=TrialState.FAIL)
    before = files(home)
    assert main(["report", "all-failed", "--home", str(home)]) == 2
    err = error_lines(capsys.readouterr().err)
    assert err[0] == "error: sweep 'all-failed' has no COMPLETE trial yet (1 FAIL): nothing to report"
    assert err[1].startswith("  hint:")
    assert files(home) == before and not (home / "reports").exists()
