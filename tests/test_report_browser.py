"""The report in a real browser: headless Chromium (Debian's ``/usr/bin/chromium``, driven by Playwright;
no browser download) opens the report file with the network blocked, and every figure must render
(an ``svg.main-svg`` in each plot div), the console must stay free of errors, and the numbers the page
shows must equal the study's and the tracking store's.

The report is the fullest one: the real rank ladder's sweep tiny-ladder, compared with the grid
tiny-report; the sweeps are the session's of ``test_report``. ``make test`` installs chromium when it is missing.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from support import LADDER, MAIN, Sweeps, rank_stats, report_data

from dashboards.report import build_report
from sweeps.names import LADDER_ATTR

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.usefixtures("isolated"),  # hub offline, a private data cache, quiet progress bars
    pytest.mark.skipif(not CHROMIUM.exists() or shutil.which("chromium") is None,
                       reason="needs Debian's chromium (make test installs it)"),
]


@pytest.fixture
def page_report(sweeps: Sweeps, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    ladder = sweeps.study(LADDER).user_attrs[LADDER_ATTR]
    out = build_report(sweeps.ladder, tmp_path / "full.html", compare=[sweeps.main], log_to_mlflow=False)
    return out, ladder


def test_the_report_renders_offline_without_errors_and_shows_the_store_numbers(
        page_report: tuple[Path, dict[str, Any]], sweeps: Sweeps) -> None:
    from playwright.sync_api import sync_playwright

    path, ladder = page_report
    data = report_data(path.read_text(encoding="utf-8"))
    figures = data["figures"]
    assert len(figures) == 10  # 9 of the sweep + the comparison
    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900})

            def route(r: Any) -> None:
                requests.append(r.request.url)
                if r.request.url.startswith(("file:", "data:", "blob:")):
                    r.continue_()
                else:
                    r.abort()

            context.route("**/*", route)
            page = context.new_page()
            page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.goto(path.as_uri(), wait_until="load")
            page.wait_for_function(
                "ids => ids.every(id => document.querySelector(`#${CSS.escape(id)} svg.main-svg`))",
                arg=figures, timeout=120_000)
            rendered = page.evaluate(
                "ids => ids.map(id => [id, document.querySelectorAll(`#${CSS.escape(id)} svg.main-svg`).length,"
                " (document.getElementById(id).data || []).length])", figures)
            # what the page shows
            cells = page.eval_on_selector_all(
                ".rank-table td[data-r]", "els => els.map(e => [e.dataset.targets, +e.dataset.r, e.textContent])")
            rank_traces = page.evaluate(
                "() => document.getElementById('fig-rank').data.map(t => [t.name, t.x, t.y, t.error_y.array])")
            heatmaps = page.evaluate(
                "() => document.getElementById('fig-similarity').data.map(t => t.z)")
            card = page.eval_on_selector_all(
                "#recommendation dd", "els => Object.fromEntries(els.map(e => [e.dataset.key, e.textContent]))")
            decisions = page.eval_on_selector_all(".decisions tbody tr td:nth-child(4)",
                                                  "els => els.map(e => e.textContent)")
            compare_rows = page.eval_on_selector_all("table.compare tbody tr td:first-child",
                                                     "els => els.map(e => e.textContent)")
            visible = page.is_visible("#fig-cost svg.main-svg") and page.is_visible("#fig-amplification svg.main-svg")
        finally:
            browser.close()

    assert errors == []
    assert [u for u in requests if not u.startswith(("file:", "data:", "blob:"))] == [], "nothing from the network"
    for div, svgs, traces in rendered:
        assert svgs >= 1 and traces >= 1, f"{div} did not render"
    assert visible

    study = sweeps.study(LADDER)
    stats = rank_stats(study)
    assert sorted((t, r) for t, r, _ in cells) == sorted(stats)
    for t, r, text in cells:
        mean, std, n, _ = stats[(t, r)]
        assert text == f"{mean:.4g} ± {std:.4g} ({n})"
    for name, xs, ys, errs in rank_traces:
        for x, y, e in zip(xs, ys, errs, strict=True):
            mean, std, _, _ = stats[(name, x)]
            assert abs(y - mean) <= 1e-9 and abs(e - std) <= 1e-9

    grids = [g["phi"] for g in data["similarity"]["grids"]]
    assert len(heatmaps) == len(grids)
    for z, grid in zip(heatmaps, grids, strict=True):
        assert all(math.isclose(a, b, abs_tol=1e-12) for ra, rb in zip(z, grid, strict=True)
                   for a, b in zip(ra, rb, strict=True))

    rec = ladder["recommendation"]
    client = sweeps.client()
    by_number = {t.number: t for t in study.get_trials()}
    trainable = client.get_run(by_number[rec["trials"][0]].user_attrs["mlflow_run_id"]).data.metrics["trainable_params"]
    assert card["trainable"] == f"{int(trainable):,}"
    assert card["trials"] == ", ".join(str(n) for n in rec["trials"])
    assert card["accuracy"] == f"{rec['mean']:.4g} ± {rec['std']:.4g} ({rec['n']})"
    assert card["r"] == str(rec["params"]["r"]) and card["targets"] == rec["params"]["targets"]
    assert decisions == [d["text"] for d in ladder["decisions"]]
    assert compare_rows == [LADDER, MAIN]
