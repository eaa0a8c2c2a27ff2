"""Exactness of packed trials as a property over the space: a trial in a pack gets the numbers it gets alone.

``test_random_packs`` draws (fixed seeds) 24 packs, half on a tiny BERT classifier and half on a tiny
Llama causal LM, both built from configs and saved locally (no download). Each draw picks the pack size
K (2-4) and 1-2 trials more than K (so trials that end leave their slots to waiting ones), and per trial
its seed, rank (1-8), target set (q,v / q,k,v,o / all-linear / q alone / v alone / k,o / mlp: sets that
overlap and sets that do not), alpha, rsLoRA, init, LoRA dropout (0-0.3), learning rates (head too),
schedule (linear / cosine / constant) with warm-up, steps, batch size, gradient accumulation,
micro-batches, clipping and mid-trial evaluation; per pack the base model's dropout (hidden and
attention-probability, 0-0.2) and whether one trial is pruned at an evaluation. Each trial is run alone
the way a sweep with ``search.pack: 1`` runs it (:func:`sweeps.training.trainer.run_trial`: a pack of
one built for its own targets and rank) and in its pack the way a packed sweep runs it (a
:class:`PackedTrainer` over the union of the trials' targets, their largest rank and every trial
waiting for a slot). Every trial's state, loss curve (each step, 1e-4 relative) and evaluations (every
metric 1e-4 absolute; perplexity 1e-4 relative, i.e. its eval loss 1e-4 absolute) must agree.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from sweeps.config.trial import TrialConfig, load_trial_config
from sweeps.data.prepare import PreparedData, prepare_data
from sweeps.models.cache import BaseModelCache
from sweeps.models.load import load_tokenizer
from sweeps.training.packed import PackedTrainer, Waiting
from sweeps.training.result import TrialResult
from sweeps.training.trainer import run_trial

pytestmark = pytest.mark.usefixtures("isolated")

PACKS = 24
TARGET_SETS = ["q,v", "q,k,v,o", "all-linear", "q", "v", "k,o", "mlp"]
BASE_DROPOUT = [0.0, 0.1, 0.2]
REL, ABS = 1e-4, 1e-4


def _model_dir(root: Path, kind: str, dropout: float, source: Path) -> Path:
    """The tiny model of ``source`` saved again with its dropout rates set to ``dropout``."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    out = root / f"{kind}-{dropout}"
    if out.is_dir():
        return out
    config = AutoConfig.from_pretrained(source)
    if kind == "bert":
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
        model = AutoModelForSequenceClassification.from_pretrained(source, config=config)
    else:
        config.attention_dropout = dropout
        model = AutoModelForCausalLM.from_pretrained(source, config=config)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def draw_pack(rng: random.Random, kind: str) -> dict[str, Any]:
    """One pack: its size, base dropout, pruned trial and per-trial ``--set`` values (see the docstring)."""
    k = rng.choice([2, 3, 4])
    n = k + rng.choice([1, 2])
    trials = []
    for _ in range(n):
        r = rng.choice([1, 2, 4, 8])
        steps = rng.choice([4, 5, 6])
        batch = rng.choice([4, 6, 8])
        sets = [f"seed={rng.randrange(1000)}", f"lora.r={r}", f"lora.targets=[{rng.choice(TARGET_SETS)}]",
                f"lora.alpha={rng.choice([r, 2 * r, 16])}", f"lora.rslora={rng.choice(['true', 'false'])}",
                f"lora.init={rng.choice(['kaiming', 'gaussian'])}", f"lora.dropout={rng.choice([0.0, 0.1, 0.3])}",
                f"train.lr={rng.choice([3e-3, 1e-2, 3e-2])}", f"train.head_lr={rng.choice([1e-2, 3e-2])}",
                f"train.schedule={rng.choice(['linear', 'cosine', 'constant'])}",
                f"train.warmup_ratio={rng.choice([0.0, 0.2, 0.4])}", f"train.steps={steps}",
                f"train.eval_every={rng.choice([2, 3, steps])}", f"train.batch_size={batch}",
                f"train.grad_accum={rng.choice([1, 1, 2])}",
                f"train.micro_batch_size={rng.choice(['null', 'null', '3', str(batch // 2)])}",
                f"train.max_grad_norm={rng.choice(['null', '0.5', '1.0'])}"]
        trials.append(sets)
    return {"k": k, "dropout": rng.choice(BASE_DROPOUT), "trials": trials,
            "prune": rng.randrange(n) if rng.random() < 0.5 else None}


def _configs(kind: str, model_dir: Path, data_file: Path, draw: dict[str, Any]) -> list[TrialConfig]:
    common = [f"model.name={model_dir}", "model.device=cpu", "model.dtype=float32", "data.name=null",
              f"data.files={data_file}", "data.max_length=32"]
    if kind == "llama":
        common += ["model.task=causal-lm", "data.prompt_template={prompt}\\nAnswer:", "train.generate_samples=2",
                   "train.max_new_tokens=2"]
    return [load_trial_config(None, common + sets) for sets in draw["trials"]]


def _pruner(draw: dict[str, Any], index: int) -> Any:
    """The report hook of trial ``index``: the pruned trial stops at its first evaluation before its end."""
    if draw["prune"] != index:
        return None
    return lambda step, metrics: f"pruned at step {step}" if step < 100 else None


def run_alone(config: TrialConfig, data: PreparedData, report: Any, models: BaseModelCache) -> TrialResult:
    return run_trial(config, report=report, data=data, models=models).result


def run_packed(configs: list[TrialConfig], data: PreparedData, k: int, draw: dict[str, Any],
               models: BaseModelCache) -> list[TrialResult]:
    """The trials in one pack of ``k`` slots over the union of their targets (as a packed sweep builds it)."""
    m = configs[0].model
    loaded = models.get(m.name, m.task, num_labels=data.num_labels, dtype="float32", device="cpu")
    targets = sorted({t for c in configs for t in c.lora.targets})
    trainer = PackedTrainer(loaded, data, k, targets, max(c.lora.r for c in configs), "auto", m.task)
    waiting = [Waiting(c, report=_pruner(draw, i), tag=i) for i, c in enumerate(configs)]
    members = trainer.run(waiting)
    assert max(mm.result.pack_size for mm in members) == min(k, len(configs))
    return [mm.result for mm in sorted(members, key=lambda mm: mm.tag)]


def _close(key: str, value: float) -> Any:
    """Metrics within 1e-4 absolute; perplexity (exp of the eval loss, ~1e4 on an untrained LM) within 1e-4
    relative, which is its eval loss within 1e-4 absolute."""
    return pytest.approx(value, rel=REL) if key == "perplexity" else pytest.approx(value, abs=ABS)


def assert_same(packed: TrialResult, alone: TrialResult, what: str) -> None:
    assert (packed.state, packed.reason, packed.steps_done) == (alone.state, alone.reason, alone.steps_done), what
    assert [s for s, _ in packed.train_curve] == [s for s, _ in alone.train_curve], what
    for (step, x), (_, y) in zip(packed.train_curve, alone.train_curve, strict=True):
        assert math.isclose(x, y, rel_tol=REL), f"{what} step {step}: train loss {x} packed, {y} alone"
    assert [h["step"] for h in packed.history] == [h["step"] for h in alone.history], what
    for hp, ha in zip(packed.history, alone.history, strict=True):
        for key, value in ha.items():
            assert hp[key] == _close(key, value), f"{what} step {ha['step']}: {key} {hp[key]} vs {value}"
    assert packed.final_metrics.keys() == alone.final_metrics.keys(), what
    for key, value in alone.final_metrics.items():
        assert packed.final_metrics[key] == _close(key, value), f"{what}: final {key}"
    assert (packed.lora_params, packed.trainable_params) == (alone.lora_params, alone.trainable_params), what


@pytest.fixture(scope="module")
def data_of(tiny_model_dir: Path, tiny_data_file: Path, tiny_llama_dir: Path, copy_task: Path,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Per model kind: its model folders by base dropout and the prepared data (built once)."""
    root = tmp_path_factory.mktemp("exactness-models")
    out: dict[str, Any] = {}
    for kind, source, data_file in (("bert", tiny_model_dir, tiny_data_file), ("llama", tiny_llama_dir, copy_task)):
        dirs = {p: _model_dir(root, kind, p, source) for p in BASE_DROPOUT}
        probe = _configs(kind, dirs[0.0], data_file, {"trials": [[]]})[0]
        data = prepare_data(probe.data, probe.model.task, load_tokenizer(str(dirs[0.0])), seed=0)
        out[kind] = (dirs, data_file, data)
    return out


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> Any:
    """torch on one thread for the test (restored after): these models are so small that a second thread
    only waits for a core, and on a shared 2-core machine it measured 2-30x slower, erratically. And no
    peak-memory reset before each trial alone (a full garbage collection, 0.4 s a trial here: a third of
    the test's time); memory is not what this test compares."""
    monkeypatch.setattr("sweeps.training.trainer.reset_peak_memory", lambda device: None)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("quick")
def test_random_packs(data_of: dict[str, Any]) -> None:
    rng = random.Random(24)
    models = BaseModelCache()  # one load per model folder, a fresh copy per trial (as a sweep worker does)
    seen = {"trials": 0, "pruned": 0, "swapped_in": 0, "disjoint": 0}
    for p in range(PACKS):
        kind = "bert" if p % 2 == 0 else "llama"
        dirs, data_file, data = data_of[kind]
        draw = draw_pack(rng, kind)
        configs = _configs(kind, dirs[draw["dropout"]], data_file, draw)
        packed = run_packed(configs, data, draw["k"], draw, models)
        for i, config in enumerate(configs):
            alone = run_alone(config, data, _pruner(draw, i), models)
            what = f"pack {p} ({kind}, K={draw['k']}, base dropout {draw['dropout']}) trial {i}: " + \
                json.dumps(draw["trials"][i])
            assert alone.train_curve[0][1] != alone.train_curve[-1][1], what  # it trained
            assert_same(packed[i], alone, what)
        seen["trials"] += len(configs)
        seen["pruned"] += sum(r.state == "PRUNED" for r in packed)
        seen["swapped_in"] += len(configs) - draw["k"]
        sets = [set(c.lora.targets) for c in configs]
        seen["disjoint"] += any(a.isdisjoint(b) and "all-linear" not in a | b for a in sets for b in sets)
    # The draw covered what it is meant to (fixed seeds: these counts are the draw's).
    assert seen == {"trials": 110, "pruned": 13, "swapped_in": 37, "disjoint": 20}, seen
