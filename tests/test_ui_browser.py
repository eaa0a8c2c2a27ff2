"""The MLflow UI as a user lands on it: ``lora-sweep ui SWEEP`` prints the URL of the runs table of the
sweep's experiment, and headless Chromium (Debian's ``/usr/bin/chromium``, driven by Playwright; no browser
download) opening that URL, with no clicks, finds the table with the sweep's parent run and its trial runs,
named by what differs between them (``t0·r2·q,v·lr0.01·s0``), listed flat, best first.

The sweep is a grid of two learning rates of the tiny BERT of ``test_train``. ``make test`` installs
chromium when it is missing.
"""

from __future__ import annotations

import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest
from support import load_study, mlflow_runs, seeded_home, write_sweep

from sweeps.config.sweep import load_sweep_config
from sweeps.engine.loop import run_sweep

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
NAME = "tiny-ui"
RENDER_TIMEOUT_MS = 60_000

pytestmark = [
    pytest.mark.usefixtures("isolated"),  # hub offline, a private data cache, quiet progress bars
    pytest.mark.skipif(not CHROMIUM.exists() or shutil.which("chromium") is None,
                       reason="needs Debian's chromium (make test installs it)"),
]


def _sigint_as_in_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a script's background test run has SIGINT ignored


def _drain(stream: IO[str] | None, put: Callable[[str], None]) -> None:
    for line in stream or ():
        put(line)


@pytest.fixture
def home(tiny_model_dir: Path, tiny_data_file: Path, empty_store: Path, tmp_path: Path) -> Path:
    home = seeded_home(tmp_path, empty_store)
    path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, home, name=NAME, rank=[2], lr=[1e-2, 3e-2],
                       n_trials=2, train={"steps": 10, "eval_every": 10})
    assert run_sweep(load_sweep_config(path), include_plotlyjs="cdn").stopped == "budget"
    return home


def test_ui_opens_on_the_runs_table_with_the_parent_and_the_trial_runs(home: Path) -> None:
    from playwright.sync_api import sync_playwright

    parent, children = mlflow_runs(home, NAME)
    study = load_study(home, NAME)
    expected = {f"t{t.number}·r2·q,v·lr{t.params['lr']:.3g}·s0" for t in study.trials}
    assert {r.info.run_name for r in children} == expected == {"t0·r2·q,v·lr0.01·s0", "t1·r2·q,v·lr0.03·s0"}
    assert parent.info.run_name == NAME

    proc = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "ui", NAME, "--home", str(home), "--port", "0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_in_a_terminal)
    lines: queue.Queue[str] = queue.Queue()
    errors: list[str] = []  # drained as it comes, so a full pipe can never block the command
    threading.Thread(target=_drain, args=(proc.stdout, lines.put), daemon=True).start()
    threading.Thread(target=_drain, args=(proc.stderr, errors.append), daemon=True).start()
    try:
        url = None
        deadline = time.monotonic() + 300  # bounds a hang only: the loop ends when the URL shows
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            match = re.search(r"http://127\.0\.0\.1:\d+/#/experiments/(\d+)/runs\?\S+", line)
            if match:
                url, experiment_id = match.group(0), match.group(1)
        assert url is not None, f"no URL printed; exit {proc.poll()}: {''.join(errors)[-2000:]}"
        assert experiment_id == parent.info.experiment_id
        query = urllib.parse.parse_qs(url.split("?", 1)[1])
        assert query == {"workflowType": ["machine_learning"], "orderByKey": ["metrics.`final_accuracy`"],
                         "orderByAsc": ["false"]}

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(url, wait_until="load")
                rows = "[role=grid] [role=row] a[href*='/runs/']"  # the run name cells' links
                page.wait_for_function(
                    "([sel, names]) => { const shown = [...document.querySelectorAll(sel)].map(a => a.textContent);"
                    " return names.every(n => shown.includes(n)); }",
                    arg=[rows, [NAME, *sorted(expected)]], timeout=RENDER_TIMEOUT_MS)
                shown = page.eval_on_selector_all(rows, "els => els.map(a => [a.textContent, a.getAttribute('href')])")
                landed = page.url
            finally:
                browser.close()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=120)  # bounds a hang only: stopping takes seconds
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"lora-sweep ui did not stop on Ctrl-C; its stderr: {''.join(errors)[-2000:]}") from None
    assert code == 0

    assert f"/#/experiments/{experiment_id}/runs" in landed  # not sent on to the GenAI overview
    names = [name for name, _ in shown]
    assert sorted(names) == sorted([NAME, *expected])  # flat: the trial runs are not folded under the parent
    assert names[-1] == NAME  # the trials first (by their objective), then the parent (which has none)
    run_ids = {r.info.run_name: r.info.run_id for r in [parent, *children]}
    for name, href in shown:
        assert href.endswith(f"/experiments/{experiment_id}/runs/{run_ids[name]}")
