"""``examples/quickstart.ipynb`` executed end to end in a Jupyter kernel (nbclient), as a notebook user runs it:
a small rank ladder on the built-in model and data, the trials DataFrame, the recommendation, one figure
inline and the exported adapter. The repository keeps it with its outputs stripped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import REPO

NOTEBOOK = REPO / "examples" / "quickstart.ipynb"


def test_the_notebook_is_stored_without_outputs() -> None:
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)


@pytest.mark.integration
def test_the_quickstart_notebook_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the kernel inherits the environment: the built-in model is cached
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = json.dumps([o for o in outputs])
    assert "\\u001b[" not in text and "\x1b[" not in text  # rendered for Jupyter, not as terminal escape codes
    by_cell = [c.outputs for c in nb.cells if c.cell_type == "code"]
    assert any("text/html" in o.get("data", {}) for o in by_cell[1])  # the run's printout, as HTML
    assert by_cell[1][-1]["data"]["text/plain"] in ("'ladder'", "'budget'")  # sweep.stopped
    trials_html = by_cell[2][0]["data"]["text/html"]
    assert "mlflow_run_id" in trials_html and "COMPLETE" in trials_html  # the trials DataFrame
    printed = "".join(o.get("text", "") for o in by_cell[4])
    assert printed.startswith("r=") and "over 2 seeds" in printed and "stage 3 recommendation" in printed
    figure = by_cell[5][-1]["data"]
    assert "application/vnd.plotly.v1+json" in figure or "text/html" in figure  # the rank figure, inline
    adapter = tmp_path / "quickstart-adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert (tmp_path / "lora-sweeps" / "reports" / "quickstart.html").is_file()
