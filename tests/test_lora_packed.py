"""Packed adapters (lora_core.packed): K adapters over one frozen model, each on its own rows of the batch."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lora_core
from lora_core import LoraConfig, LoraError, inject, load_adapter
from lora_core.packed import Pack
from lora_core.packed_optim import PackedAdamW, clip_per_slot

# One pack mixing ranks, target sets, alphas, rsLoRA, inits and dropout.
MIXED = [
    LoraConfig(r=1, alpha=2, targets=["q", "v"], dropout=0.1),
    LoraConfig(r=4, alpha=4, targets=["q", "k", "v", "o"], rslora=True, init="gaussian"),
    LoraConfig(r=16, alpha=8, targets=["all-linear"], dropout=0.3),
]
HEAD = ("classifier",)


def _configs(task: str) -> list[LoraConfig]:
    if task == "bert":
        return [LoraConfig(**{**c.to_dict(), "modules_to_save": list(HEAD)}) for c in MIXED]
    return MIXED


def _model(tiny, task: str, seed: int = 0) -> nn.Module:
    model = tiny.bert(seed=seed) if task == "bert" else tiny.llama(seed=seed)
    for m in model.modules():  # the base model's own dropout off: only LoRA dropout is compared here
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _pack(model: nn.Module, task: str, configs: list[LoraConfig], capacity: int | None = None) -> Pack:
    return Pack(model, capacity or len(configs), ["all-linear"], max_rank=16,
                modules_to_save=HEAD if task == "bert" else ())


def _randomize(pack: Pack, slot: int, seed: int) -> None:
    """Random A and B inside the slot's own ranks and layers (B is zero after load)."""
    gen = torch.Generator().manual_seed(seed)
    spec = pack.specs[slot]
    assert spec is not None
    with torch.no_grad():
        for path in spec.paths:
            r, branch = spec.config.rank_for(path), pack.branches[path]
            branch.lora_A[slot, :r].copy_(torch.randn(branch.lora_A[slot, :r].shape, generator=gen))
            branch.lora_B[slot, :, :r].copy_(torch.randn(branch.lora_B[slot, :, :r].shape, generator=gen) * 0.5)
        for packed in pack.saved.values():
            for p in packed.stacked:
                p[slot].add_(torch.randn(p[slot].shape, generator=gen) * 0.5)


def _solo(tiny, task: str, pack: Pack, slot: int) -> nn.Module:
    """A fresh copy of the base model with slot ``slot``'s adapter injected the ordinary way."""
    spec = pack.specs[slot]
    assert spec is not None
    model = _model(tiny, task)
    inject(model, spec.config)
    with torch.no_grad():
        for path, (a, b) in pack.slot_weights(slot).items():
            w = lora_core.lora_weights(model)[path]
            w.lora_A.copy_(a)
            w.lora_B.copy_(b)
        for path, packed in pack.saved.items():
            for name, value in packed.slot_values(slot).items():
                dict(model.get_submodule(path).named_parameters())[name].copy_(value)
    return model.eval()


@pytest.mark.parametrize("task", ["bert", "llama"])
@pytest.mark.parametrize("layout", [[(0, 2), (1, 2), (2, 2)], [(2, 3), (0, 1)], [(1, 1), (2, 2), (0, 3)]],
                         ids=["equal", "subset-reordered", "unequal"])
def test_each_slot_equals_its_adapter_alone(tiny, task, layout) -> None:
    configs = _configs(task)
    model = _model(tiny, task).eval()
    pack = _pack(model, task, configs)
    for slot, config in enumerate(configs):
        pack.load(slot, config)
        _randomize(pack, slot, seed=10 + slot)
    ids = tiny.ids(batch=sum(n for _, n in layout), length=6)
    with torch.no_grad(), pack.batch(layout):
        packed = model(input_ids=ids).logits
    start = 0
    for slot, n in layout:
        alone = tiny.logits(_solo(tiny, task, pack, slot), ids[start:start + n])
        tiny.assert_f32_close(packed[start:start + n], alone, msg=f"slot {slot}")
        start += n


def _per_slot_loss(model: nn.Module, task: str, ids: torch.Tensor, layout, labels=None) -> torch.Tensor:
    """Sum over slots of each slot's mean loss (as the packed trainer computes it)."""
    logits = model(input_ids=ids).logits
    total, start = logits.new_zeros(()), 0
    for _, n in layout:
        part = logits[start:start + n]
        if task == "bert":
            total = total + nn.functional.cross_entropy(part, labels[start:start + n])
        else:
            total = total + nn.functional.cross_entropy(part[:, :-1].reshape(-1, part.shape[-1]),
                                                        ids[start:start + n, 1:].reshape(-1))
        start += n
    return total


@pytest.mark.parametrize("task", ["bert", "llama"])
def test_no_cross_talk_between_slots(tiny, task) -> None:
    """New token values in slot 1's rows leave slots 0 and 2's gradients and updates bit-identical."""
    configs = _configs(task)
    layout = [(0, 2), (1, 2), (2, 2)]
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    results = []
    for variant in range(2):
        model = _model(tiny, task).train()
        pack = _pack(model, task, configs)
        for slot, config in enumerate(configs):
            pack.load(slot, config, seed=slot, generator=torch.Generator().manual_seed(slot))
            _randomize(pack, slot, seed=10 + slot)
        ids = tiny.ids(batch=6, length=6)
        if variant:
            ids[2:4] = tiny.ids(batch=2, length=6, seed=99)
        opt = PackedAdamW(pack.parameters(), 3)
        for slot in range(3):
            opt.reset_slot(slot, lr=1e-2, weight_decay=0.01)
        with pack.batch(layout):
            _per_slot_loss(model, task, ids, layout, labels).backward()
        grads = [p.grad.clone() for p in pack.parameters()]
        clip_per_slot(pack.parameters(), torch.tensor([0.5, 0.5, 0.5]))
        opt.step([0, 1, 2])
        results.append((grads, [p.detach().clone() for p in pack.parameters()]))
    (g0, p0), (g1, p1) = results
    for slot, same in ((0, True), (1, False), (2, True)):
        grads_equal = all(torch.equal(a[slot], b[slot]) for a, b in zip(g0, g1, strict=True))
        params_equal = all(torch.equal(a[slot], b[slot]) for a, b in zip(p0, p1, strict=True))
        assert grads_equal is same and params_equal is same, f"slot {slot}"


@pytest.mark.parametrize("task", ["bert", "llama"])
def test_training_in_a_pack_equals_training_alone(tiny, task) -> None:
    """Each slot trained for 6 steps in a pack of 3 (its sequences padded to the longest, other slots'
    rows beside it) follows the same loss curve as the same slot in a pack of 1, with dropout > 0."""
    configs = _configs(task)
    lengths, rows, steps = [5, 7, 4], 2, 6

    def batches(slot: int, step: int, pad_to: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = tiny.ids(batch=rows, length=lengths[slot], seed=1000 * slot + step)
        mask = torch.ones_like(ids)
        pad = pad_to - ids.shape[1]
        labels = torch.tensor([(slot + step + i) % 3 for i in range(rows)])
        return (nn.functional.pad(ids, (0, pad)), nn.functional.pad(mask, (0, pad)), labels)

    def train(slots: list[int]) -> dict[int, list[float]]:
        model = _model(tiny, task).train()
        pack = _pack(model, task, [configs[s] for s in slots])
        opt = PackedAdamW(pack.parameters(), len(slots))
        for i, s in enumerate(slots):
            pack.load(i, configs[s], seed=s, generator=torch.Generator().manual_seed(s))
            opt.reset_slot(i, lr=[3e-2, 1e-2, 5e-3][s], weight_decay=0.01)
        curves: dict[int, list[float]] = {s: [] for s in slots}
        width = max(lengths[s] for s in slots)
        for step in range(steps):
            parts = [batches(s, step, width) for s in slots]
            ids, mask, labels = (torch.cat([p[j] for p in parts]) for j in range(3))
            layout = [(i, rows) for i in range(len(slots))]
            with pack.batch(layout, [lengths[s] for s in slots]):
                logits = model(input_ids=ids, attention_mask=mask).logits
            total = logits.new_zeros(())
            for i, s in enumerate(slots):
                part, m, part_ids = logits[i * rows:(i + 1) * rows], mask[i * rows:(i + 1) * rows], ids[i * rows:(i + 1) * rows]
                if task == "bert":
                    loss = nn.functional.cross_entropy(part, labels[i * rows:(i + 1) * rows])
                else:
                    target = part_ids[:, 1:].masked_fill(m[:, 1:] == 0, -100)
                    loss = nn.functional.cross_entropy(part[:, :-1].reshape(-1, part.shape[-1]), target.reshape(-1))
                curves[s].append(loss.item())
                total = total + loss
            total.backward()
            clip_per_slot(pack.parameters(), torch.full((len(slots),), 1.0))
            opt.step(list(range(len(slots))))
            opt.zero_grad()
        return curves

    packed = train([0, 1, 2])
    for s in range(3):
        alone = train([s])[s]
        assert alone[0] != alone[-1]  # it trained
        for step, (a, b) in enumerate(zip(packed[s], alone, strict=True)):
            assert math.isclose(a, b, rel_tol=1e-4), f"slot {s} step {step}: {a} in the pack, {b} alone"


def test_padded_ranks_and_untargeted_layers_stay_exactly_zero(tiny) -> None:
    model = _model(tiny, "llama").train()
    pack = _pack(model, "llama", MIXED)
    opt = PackedAdamW(pack.parameters(), 3)
    for slot, config in enumerate(MIXED):
        pack.load(slot, config, seed=slot)
        opt.reset_slot(slot, lr=1e-1, weight_decay=0.1)
    layout = [(0, 2), (1, 2), (2, 2)]
    for step in range(3):
        ids = tiny.ids(batch=6, length=6, seed=step)
        with pack.batch(layout):
            _per_slot_loss(model, "llama", ids, layout).backward()
        opt.step([0, 1, 2])
        opt.zero_grad()
    for slot, spec in enumerate(pack.specs):
        assert spec is not None
        for path, branch in pack.branches.items():
            a, b = branch.lora_A[slot], branch.lora_B[slot]
            r = spec.config.rank_for(path) if path in spec.paths else 0
            assert not a[r:].any() and not b[:, r:].any(), f"slot {slot} {path}"
            if r:
                assert b[:, :r].abs().sum() > 0  # it trained there
    paths = {slot: pack.specs[slot].paths for slot in range(3)}  # type: ignore[union-attr]
    assert len(paths[0]) == 4 and len(paths[1]) == 8 and len(paths[2]) == 14  # 2 layers x (2, 4, 7) matrices


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


# Ops of the per-part dropout masks on the CPU (one bernoulli_ per part and site, see apply_dropout).
PER_PART_MASK_OPS = {"aten.bernoulli_", "aten.empty", "aten.mul_", "aten.select", "aten.copy_", "aten.slice"}


def _op_counts(tiny, k: int, rows: str, dropout: float) -> Counter[str]:
    model = _model(tiny, "bert").train()
    pack = Pack(model, k, ["all-linear"], max_rank=8, modules_to_save=HEAD)
    for slot in range(k):
        pack.load(slot, LoraConfig(r=1 + slot % 8, alpha=2, targets=["all-linear"], dropout=dropout,
                                   modules_to_save=HEAD), seed=slot)
    layout = [(slot, 2 if rows == "equal" or slot else 1) for slot in range(k)]
    ids = tiny.ids(batch=sum(n for _, n in layout), length=5)
    with _OpCounter() as counter, pack.batch(layout):
        model(input_ids=ids).logits.sum().backward()
    return counter.ops


@pytest.mark.parametrize("rows", ["equal", "unequal"])
def test_kernel_count_does_not_grow_with_the_number_of_slots(tiny, rows) -> None:
    counts = [_op_counts(tiny, k, rows, dropout=0.0) for k in (1, 2, 8)]
    assert counts[0]["aten.bmm"] > 0
    if rows == "equal":
        assert counts[0] == counts[1] == counts[2]
    else:  # with one part shorter than the rest: the same ops at K = 2 and 8 (K = 1 has nothing to pad)
        assert counts[1] == counts[2]
    # With LoRA dropout on the CPU only the per-part masks grow: one bernoulli_ per part and adapted layer.
    two, eight = _op_counts(tiny, 2, rows, dropout=0.1), _op_counts(tiny, 8, rows, dropout=0.1)
    grown = {op for op in eight if eight[op] != two[op]}
    assert grown <= PER_PART_MASK_OPS and eight["aten.bernoulli_"] - two["aten.bernoulli_"] == 6 * 7


def test_packed_adamw_and_clipping_match_torch_for_each_slot() -> None:
    gen = torch.Generator().manual_seed(0)
    stacked = nn.Parameter(torch.randn(3, 4, 5, generator=gen))
    alone = [nn.Parameter(stacked[i].detach().clone()) for i in range(3)]
    lrs, decays, norms = [1e-2, 3e-3, 1e-1], [0.0, 0.01, 0.1], [0.5, 0.0, 100.0]
    opt = PackedAdamW([stacked], 3)
    for i in range(3):
        opt.reset_slot(i, lr=lrs[i], weight_decay=decays[i])
    torch_opts = [torch.optim.AdamW([alone[i]], lr=lrs[i], weight_decay=decays[i]) for i in range(3)]
    for step in range(5):
        grads = torch.randn(3, 4, 5, generator=gen) * (step + 1)
        stacked.grad = grads.clone()
        clip_per_slot([stacked], torch.tensor(norms))
        stepping = [0, 1, 2] if step != 2 else [0, 2]  # slot 1 sits out step 2
        opt.step(stepping)
        for i in stepping:
            alone[i].grad = grads[i].clone()
            if norms[i]:
                torch.nn.utils.clip_grad_norm_([alone[i]], norms[i])
            torch_opts[i].step()
    for i in range(3):
        torch.testing.assert_close(stacked[i].detach(), alone[i].detach(), rtol=1e-5, atol=1e-6)


def test_exported_slot_saves_and_loads_as_an_ordinary_adapter(tiny, tmp_path) -> None:
    configs = _configs("bert")
    model = _model(tiny, "bert").eval()
    pack = _pack(model, "bert", configs)
    for slot, config in enumerate(configs):
        pack.load(slot, config)
        _randomize(pack, slot, seed=20 + slot)
    ids = tiny.ids(batch=2, length=6)
    with torch.no_grad(), pack.batch([(2, 2)]):
        packed = model(input_ids=ids).logits
    pack.save_slot(2, tmp_path / "slot2")
    assert all(p.requires_grad for p in pack.parameters())
    assert lora_core.adapter_names(model) == [] and sum(p.requires_grad for p in model.parameters()) == len(
        pack.parameters())
    with torch.no_grad(), pack.batch([(2, 2)]):
        torch.testing.assert_close(model(input_ids=ids).logits, packed, rtol=0, atol=0)  # the pack unchanged
    fresh = _model(tiny, "bert").eval()
    load_adapter(fresh, tmp_path / "slot2")
    tiny.assert_f32_close(tiny.logits(fresh, ids), packed)


def test_remove_gives_the_base_model_back(tiny) -> None:
    model = _model(tiny, "bert").eval()
    ids = tiny.ids()
    before = tiny.logits(model, ids)
    pack = _pack(model, "bert", _configs("bert"))
    pack.load(0, _configs("bert")[0])
    _randomize(pack, 0, seed=1)
    pack.remove()
    assert tiny.lora_module_paths(model) == []
    assert torch.equal(tiny.logits(model, ids), before)


def test_bad_use_is_a_clear_error(tiny) -> None:
    with pytest.raises(LoraError, match="fused q/k/v"):
        Pack(tiny.gpt2(), 2, ["q", "v"], max_rank=4)
    model = _model(tiny, "llama")
    pack = Pack(model, 2, ["q", "v"], max_rank=4)
    with pytest.raises(LoraError, match="max_rank"):
        pack.load(0, LoraConfig(r=8, alpha=8, targets=["q"]))
    with pytest.raises(LoraError, match="match none"):
        pack.load(0, LoraConfig(r=2, alpha=2, targets=["down_proj"]))
    with pytest.raises(LoraError, match="saves"):
        pack.load(0, LoraConfig(r=2, alpha=2, targets=["q"], modules_to_save=["lm_head"]))
    with pytest.raises(LoraError, match="empty"), pack.batch([(0, 2)]):
        pass
    pack.load(0, LoraConfig(r=2, alpha=2, targets=["q"]))
    with pytest.raises(LoraError, match="outside"):
        model(input_ids=tiny.ids())
    with pytest.raises(LoraError, match="covers 3"), pack.batch([(0, 3)]):
        model(input_ids=tiny.ids(batch=2))
    with pytest.raises(LoraError, match="already carries a pack"):
        Pack(model, 2, ["q"], max_rank=2)
