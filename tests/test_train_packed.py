"""Packed trials (sweeps.training.packed): trials trained together give the numbers they give alone.

"Alone" is a pack of one: the same trainer with capacity 1. Each pack mixes ranks {1, 4, 16}, target
sets {q,v}, {q,k,v,o} and all-linear, learning rates, LoRA dropout > 0, one trial with a smaller batch
(so the parts of the batch differ in size) and, on the BERT classifier, the model's own dropout (0.1)
and a classification head per trial. Tolerances: 1e-4 absolute on metrics, 1e-4 relative on losses.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from support import tiny_sets

from sweeps.config.trial import TrialConfig, load_trial_config
from sweeps.data.prepare import prepare_data
from sweeps.models.load import load_model, load_tokenizer
from sweeps.training.packed import PackedTrainer, PackMember, Waiting, forward_groups

pytestmark = pytest.mark.usefixtures("isolated")

MIX = [  # (seed, r, targets, lr, batch size)
    (0, 1, "[q, v]", 1e-2, 8),
    (1, 4, "[q, k, v, o]", 3e-3, 8),
    (2, 16, "[all-linear]", 2e-2, 4),
]


def _configs(kind: str, model_dir: Path, data_file: Path, steps: int = 12) -> list[TrialConfig]:
    out = []
    for seed, r, targets, lr, batch in MIX:
        if kind == "bert":
            sets = tiny_sets(model_dir, data_file, None)
        else:
            sets = [f"model.name={model_dir}", "model.task=causal-lm", "model.device=cpu", "data.name=null",
                    f"data.files={data_file}", "data.prompt_template={prompt}\\nAnswer:", "data.max_length=32",
                    "train.generate_samples=4", "train.max_new_tokens=3"]
        sets += [f"seed={seed}", f"lora.r={r}", f"lora.alpha={2 * r}", f"lora.targets={targets}", "lora.dropout=0.1",
                 f"train.lr={lr}", f"train.batch_size={batch}", f"train.steps={steps}", f"train.eval_every={steps // 2}",
                 "train.max_grad_norm=1.0"]
        out.append(load_trial_config(None, sets))
    return out


def _trainer(config: TrialConfig, capacity: int, pad_waste: float | None = None) -> PackedTrainer:
    m = config.model
    tokenizer = load_tokenizer(m.name)
    data = prepare_data(config.data, m.task, tokenizer, seed=0)
    loaded = load_model(m.name, m.task, num_labels=data.num_labels, dtype="float32", device="cpu")
    return PackedTrainer(loaded, data, capacity, ["all-linear"], max_rank=16, modules_to_save="auto", task=m.task,
                         pad_waste=pad_waste)


def _run(configs: list[TrialConfig], capacity: int, hooks: dict[int, object] | None = None,
         pad_waste: float | None = math.inf) -> dict[int, PackMember]:
    """Train ``configs`` with ``capacity`` slots. By default every step is one forward over all trials,
    padded to the longest (pad_waste None: the CPU default, one forward per length)."""
    trainer = _trainer(configs[0], capacity, pad_waste)
    waiting = [Waiting(c, report=(hooks or {}).get(c.seed)) for c in configs]  # type: ignore[arg-type]
    return {m.config.seed: m for m in trainer.run(waiting)}


@pytest.fixture(scope="module")
def alone_bert(tiny_model_dir: Path, tiny_data_file: Path,
               tmp_path_factory: pytest.TempPathFactory) -> dict[int, PackMember]:
    """Each BERT trial of MIX trained alone (a pack of one), shared by the tests below (isolated as
    the tests are: hub offline, a private data cache)."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setenv("LORA_SWEEP_CACHE", str(tmp_path_factory.mktemp("alone-cache")))
        return {c.seed: _run([c], capacity=1)[c.seed] for c in _configs("bert", tiny_model_dir, tiny_data_file)}


def _assert_same(packed: PackMember, alone: PackMember) -> None:
    a, b = packed.result, alone.result
    assert (a.state, a.reason, a.steps_done) == (b.state, b.reason, b.steps_done)
    assert [s for s, _ in a.train_curve] == [s for s, _ in b.train_curve]
    for (step, x), (_, y) in zip(a.train_curve, b.train_curve, strict=True):
        assert math.isclose(x, y, rel_tol=1e-4), f"seed {packed.config.seed} step {step}: {x} packed, {y} alone"
    assert [h["step"] for h in a.history] == [h["step"] for h in b.history]
    for ha, hb in zip(a.history, b.history, strict=True):
        for key in hb:
            assert ha[key] == pytest.approx(hb[key], abs=1e-4), (packed.config.seed, key)
    assert (a.trainable_params, a.lora_params, a.adapter_bytes) == (b.trainable_params, b.lora_params, b.adapter_bytes)


@pytest.mark.parametrize(("kind", "pad_waste"), [("bert", math.inf), ("bert", None), ("llama", math.inf)],
                         ids=["bert-one-forward", "bert-forward-per-length", "llama-one-forward"])
def test_a_trial_in_a_pack_gives_its_numbers_alone(kind, pad_waste, tiny_model_dir, tiny_data_file, tiny_llama_dir,
                                                   copy_task, request) -> None:
    model_dir, data_file = (tiny_model_dir, tiny_data_file) if kind == "bert" else (tiny_llama_dir, copy_task)
    configs = _configs(kind, model_dir, data_file)
    packed = _run(configs, capacity=3, pad_waste=pad_waste)
    assert {m.result.pack_size for m in packed.values()} == {3}
    for config in configs:
        alone = request.getfixturevalue("alone_bert")[config.seed] if kind == "bert" else \
            _run([config], capacity=1)[config.seed]
        assert alone.result.pack_size == 1
        assert alone.result.train_curve[0][1] != alone.result.train_curve[-1][1]  # it trained
        _assert_same(packed[config.seed], alone)
    r = {seed: m.result for seed, m in packed.items()}
    # Exact costs: r * (in + out) per adapted matrix, 2 layers, hidden 32, MLP 64 (llama: k and v out 16;
    # all-linear on BERT adapts the pooler too).
    if kind == "bert":
        qv, qkvo, mlp, extra = 2 * 64, 4 * 64, 2 * 96, 16 * 64
    else:
        qv, qkvo, mlp, extra = 64 + 48, 2 * 64 + 2 * 48, 3 * 96, 0
    assert [r[s].lora_params for s in range(3)] == [2 * 1 * qv, 2 * 4 * qkvo, 2 * 16 * (qkvo + mlp) + extra]
    assert all(r[s].adapter_bytes == 4 * r[s].trainable_params for s in range(3))
    if kind == "bert":
        assert r[0].trainable_params == r[0].lora_params + 32 * 3 + 3  # and the head
        assert set(r[0].final_metrics) >= {"accuracy", "eval_loss"}
    else:
        assert "exact_match" in r[0].final_metrics


def test_pruned_trial_leaves_its_slot_to_a_waiting_one(tiny_model_dir, tiny_data_file, alone_bert) -> None:
    configs = _configs("bert", tiny_model_dir, tiny_data_file)
    hooks = {0: lambda step, metrics: "pruned at step 6" if step == 6 else None}
    packed = _run(configs, capacity=2, hooks=hooks)
    assert packed[0].result.state == "PRUNED" and packed[0].result.steps_done == 6
    assert packed[2].slot == packed[0].slot  # the waiting trial took the pruned one's slot
    _assert_same(packed[0], _run([configs[0]], capacity=1, hooks=hooks)[0])
    for seed in (1, 2):
        _assert_same(packed[seed], alone_bert[seed])


def test_a_nan_loss_fails_its_trial_alone(tiny_model_dir, tiny_data_file, alone_bert, monkeypatch) -> None:
    configs = _configs("bert", tiny_model_dir, tiny_data_file)
    seen: list[int] = []
    original_loss = PackedTrainer._loss

    def poison(self: PackedTrainer, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = original_loss(self, logits, labels)
        slot = seen.pop(0)
        member = self.members[slot]
        assert member is not None
        return loss * float("nan") if member.config.seed == 1 and member.steps == 3 else loss

    original_step = PackedTrainer._step

    def step(self: PackedTrainer) -> None:  # the slots whose losses _step computes, in order
        seen.clear()
        seen.extend(m.slot for m in self.live)
        original_step(self)

    monkeypatch.setattr(PackedTrainer, "_loss", poison)
    monkeypatch.setattr(PackedTrainer, "_step", step)
    packed = _run(configs, capacity=3)
    failed = packed[1].result
    assert failed.state == "FAILED" and failed.reason == "loss became nan at step 4"
    for seed in (0, 2):
        _assert_same(packed[seed], alone_bert[seed])


def test_forward_groups_bound_the_padding() -> None:
    lengths, rows = [30, 12, 29, 12, 20], [8, 8, 8, 8, 4]
    assert forward_groups(lengths, rows, math.inf) == [[0, 1, 2, 3, 4]]
    assert forward_groups(lengths, rows, 0.0) == [[0], [2], [4], [1, 3]]  # equal lengths only
    groups = forward_groups(lengths, rows, 0.1)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4]
    for g in groups:
        width, n = max(lengths[i] for i in g), sum(rows[i] for i in g)
        assert n * width <= 1.1 * sum(rows[i] * lengths[i] for i in g)
    assert groups == [[0, 2, 4], [1, 3]]  # 30, 29 and 20 (4 rows) pad 8.7% over their own; 12 + 12 none
