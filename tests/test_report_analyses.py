"""The report's LoRA analyses against lora_core: the paper's subspace similarity and amplification factor
on the logged adapters, and the report's own reading of adapter files (fused q/k/v layers and per-module
patterns included)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from support import Sweeps, report_data

import lora_core
from lora_core.analysis import amplification_factor, base_weight, delta_weights, subspace_similarity_grid
from sweeps.models.load import load_model
from sweeps.tracking.artifacts import download_adapter


def _a_matrices(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        return {k[len("base_model.model."):-len(".lora_A.weight")]: f.get_tensor(k)
                for k in f.keys() if k.endswith(".lora_A.weight")}  # noqa: SIM118


def test_paper_analyses_equal_lora_core_on_the_logged_adapters(main_report: Path, sweeps: Sweeps,
                                                               tmp_path: Path, tiny_model_dir: Path) -> None:
    data = report_data(main_report.read_text(encoding="utf-8"))
    sim = data["similarity"]
    assert (sim["r_low"], sim["r_high"]) == (1, 4) and sim["module_type"] == "query"
    assert sim["low"]["seed_index"] == 0 and sim["high"]["seed_index"] == 0
    low = _a_matrices(download_adapter(sweeps.main.tracking, sim["low"]["run_id"], tmp_path / "low"))
    high = _a_matrices(download_adapter(sweeps.main.tracking, sim["high"]["run_id"], tmp_path / "high"))
    modules = [g["module"] for g in sim["grids"]]
    assert modules == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query"]
    for g in sim["grids"]:
        expected = subspace_similarity_grid(low[g["module"]], high[g["module"]])
        assert len(g["phi"]) == 1 and len(g["phi"][0]) == 4
        assert torch.allclose(torch.tensor(g["phi"]), expected, atol=1e-9, rtol=0)
        assert all(0.0 <= v <= 1.0 + 1e-9 for v in g["phi"][0])

    amp = data["amplification"]
    folder = download_adapter(sweeps.main.tracking, amp["run_id"], tmp_path / "amp")
    model = load_model(str(tiny_model_dir), "classification", num_labels=3, device="cpu").model
    lora_core.load_adapter(model, folder)  # lora_core's own reading of the adapter, strictly
    deltas = delta_weights(model)
    rows = {r["module"]: r for r in amp["rows"]}
    assert set(rows) == set(deltas)
    for path, delta in deltas.items():
        w = base_weight(model.get_submodule(path))
        r = lora_core.lora_weights(model)[path].r
        assert rows[path]["r"] == r
        assert rows[path]["factor"] == pytest.approx(amplification_factor(w, delta, r), rel=1e-5)
        assert rows[path]["delta_norm"] == pytest.approx(float(torch.linalg.matrix_norm(delta.double())), rel=1e-5)


@pytest.mark.parametrize("case", ["bert", "gpt2-fused", "llama-rslora-patterns"])
def test_adapter_files_are_read_as_lora_core_reads_them(case: str, tiny: Any, tmp_path: Path) -> None:
    """The report reads adapter files itself (A per role, dW with PEFT's scaling rules); both must equal
    what lora_core computes on the live model, fused q/k/v layers and per-module patterns included."""
    from dashboards.adapters import read_adapter

    if case == "bert":
        model, config = tiny.bert(), lora_core.LoraConfig(r=3, alpha=6, targets=["q", "v"])
    elif case == "gpt2-fused":
        model, config = tiny.gpt2(), lora_core.LoraConfig(r=2, alpha=5, targets=["q", "v"])
    else:
        model, config = tiny.llama(), lora_core.LoraConfig(r=4, alpha=8, targets=["q", "v", "o"], rslora=True,
                                                           rank_pattern={"o": 2}, alpha_pattern={"v": 3})
    lora_core.inject(model, config)
    tiny.randomize_lora(model)
    adapter = read_adapter(lora_core.save_adapter(model, tmp_path / "adapter"))
    weights = lora_core.lora_weights(model)
    deltas = delta_weights(model)
    assert set(adapter.delta) == set(deltas)
    for path, delta in deltas.items():
        assert torch.allclose(adapter.delta[path].float(), delta, atol=1e-6), path
        w = weights[path]
        if w.fused:
            for i, role in enumerate(w.roles):
                assert torch.equal(adapter.a[f"{path}[{role}]"].float(), w.lora_A[i * w.r:(i + 1) * w.r].detach())
        else:
            assert torch.equal(adapter.a[path].float(), w.lora_A.detach())
    if case == "gpt2-fused":
        assert sorted(adapter.a) == sorted(f"transformer.h.{i}.attn.c_attn[{r}]" for i in (0, 1) for r in "qv")
