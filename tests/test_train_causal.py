"""A causal-LM trial end to end on a tiny llama with the smollm2 tokenizer (no network)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from sweeps.config.trial import load_trial_config
from sweeps.training.evaluate import evaluate, generation_sample
from sweeps.training.trainer import run_trial


def _config(model_dir: Path, data: Path, home: Path, steps: int = 60) -> list[str]:
    return [f"model.name={model_dir}", "model.task=causal-lm", "model.device=cpu", "data.name=null",
            f"data.files={data}", "data.prompt_template={prompt}\\nAnswer:", "data.max_length=32",
            "lora.r=4", "lora.alpha=8", "lora.targets=[q, v, o, mlp]", f"train.steps={steps}",
            "train.batch_size=8", "train.lr=1e-2", f"train.eval_every={steps // 2}", "train.generate_samples=10",
            "train.max_new_tokens=4", f"tracking.home={home}"]


def test_causal_trial_learns_and_reports_lm_metrics(tiny_llama_dir: Path, copy_task: Path, tmp_path: Path) -> None:
    cfg = load_trial_config(None, _config(tiny_llama_dir, copy_task, tmp_path))
    trial = run_trial(cfg)
    r = trial.result
    assert r.state == "COMPLETE"
    assert r.objective == "eval_loss" and r.direction == "minimize"
    assert set(r.final_metrics) == {"eval_loss", "perplexity", "exact_match"}
    assert r.final_metrics["perplexity"] == pytest.approx(math.exp(r.final_metrics["eval_loss"]), rel=1e-9)
    first_loss = r.train_curve[0][1]
    # LoRA alone on a random tiny model learns slowly, but the loss must fall clearly.
    assert r.final_metrics["eval_loss"] < first_loss - 0.3
    assert r.history[-1]["eval_loss"] < r.history[0]["eval_loss"]
    assert 0.0 <= r.final_metrics["exact_match"] <= 1.0
    # Only the completion tokens are supervised, and the evaluation is reproducible.
    again = evaluate(trial.model, trial.data, "validation", cfg, trial.loaded.tokenizer)
    assert again["eval_loss"] == pytest.approx(r.final_metrics["eval_loss"], abs=1e-6)


def test_generation_sample_spreads_over_the_split() -> None:
    data = SimpleNamespace(generation={"validation": [(f"p{i}", f"c{i}") for i in range(100)]})
    picked = generation_sample(data, "validation", 4)  # type: ignore[arg-type]
    assert picked == [("p0", "c0"), ("p25", "c25"), ("p50", "c50"), ("p75", "c75")]
    assert len(generation_sample(data, "validation", 500)) == 100  # type: ignore[arg-type]
