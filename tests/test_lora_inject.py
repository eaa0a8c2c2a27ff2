"""inject: the model is unchanged at step 0, A/B initialisation, freezing, names, scaling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lora_core
from lora_core import LoraConfig, LoraError, inject, lora_weights


class TwoLayers(nn.Module):
    """A plain container (no transformers config) with a big enough layer for init statistics."""

    def __init__(self, d_in: int = 512, d_out: int = 128) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)
        self.head = nn.Linear(d_out, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.proj(x)))


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2", "neox", "phi3"])
@pytest.mark.parametrize("targets", [["q", "v"], ["all-linear"]])
def test_output_exactly_unchanged_at_init(tiny, family, targets):
    model = getattr(tiny, family)()
    ids = tiny.ids()
    before = tiny.logits(model, ids)
    inject(model, LoraConfig(r=4, alpha=8, targets=targets))
    assert lora_weights(model)  # something was adapted
    for w in lora_weights(model).values():
        assert torch.count_nonzero(w.lora_B) == 0
        assert torch.count_nonzero(w.lora_A) == w.lora_A.numel()
    assert torch.equal(tiny.logits(model, ids), before)


def test_kaiming_uniform_bound_and_std():
    torch.manual_seed(0)
    model = TwoLayers(d_in=512, d_out=128)
    inject(model, LoraConfig(r=64, alpha=64, targets=["proj"]))
    a = lora_weights(model)["proj"].lora_A
    assert a.shape == (64, 512) and a.dtype == torch.float32
    bound = 1.0 / math.sqrt(512)  # kaiming_uniform(a=sqrt(5)): gain*sqrt(3/fan_in) = 1/sqrt(fan_in)
    assert a.abs().max().item() <= bound
    assert a.abs().max().item() > 0.99 * bound  # the whole range is used (32768 draws)
    # Uniform(-b, b) has std b/sqrt(3); with 32768 draws the sample std is within ~0.5% (3% allowed).
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    assert a.mean().item() == pytest.approx(0.0, abs=0.05 * bound)


def test_gaussian_init_std_is_one_over_r():
    torch.manual_seed(0)
    model = TwoLayers(d_in=512, d_out=128)
    inject(model, LoraConfig(r=16, alpha=16, targets=["proj"], init="gaussian"))
    w = lora_weights(model)["proj"]
    # 8192 draws: sample std within ~1% of 1/16 (3% allowed); B still zero.
    assert w.lora_A.std().item() == pytest.approx(1 / 16, rel=0.03)
    assert w.lora_A.abs().max().item() > 2 / 16  # not uniform-bounded like kaiming
    assert torch.count_nonzero(w.lora_B) == 0


def test_fused_blocks_each_kaiming_initialised(tiny):
    model = tiny.gpt2()
    inject(model, LoraConfig(r=4, alpha=8, targets=["q", "v"]))
    w = lora_weights(model)["transformer.h.0.attn.c_attn"]
    assert w.lora_A.shape == (8, 16)  # two (r, in) blocks
    bound = 1 / math.sqrt(16)
    assert w.lora_A.abs().max().item() <= bound
    assert not torch.equal(w.lora_A[:4], w.lora_A[4:])


def test_base_names_state_dict_and_objects_unchanged(tiny):
    model = tiny.llama()
    ref_sd = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    q = model.model.layers[0].self_attn.q_proj
    q_weight = q.weight
    inject(model, LoraConfig(r=2, alpha=4, targets=["q", "v"]))
    assert model.model.layers[0].self_attn.q_proj is q  # same module object
    assert q.weight is q_weight  # same tensor
    assert isinstance(q, nn.Linear)
    sd = model.state_dict()
    base_keys = [k for k in sd if ".lora." not in k]
    assert base_keys == list(ref_sd)
    for k in ref_sd:
        assert torch.equal(sd[k], ref_sd[k])
    lora_keys = sorted(k for k in sd if ".lora." in k)
    assert lora_keys[:2] == ["model.layers.0.self_attn.q_proj.lora.default.lora_A",
                             "model.layers.0.self_attn.q_proj.lora.default.lora_B"]
    assert len(lora_keys) == 8
    assert [n for n, _ in model.named_parameters() if ".lora." not in n] == names


def test_only_lora_and_saved_modules_train(tiny):
    model = tiny.bert()
    ids = tiny.ids()
    inject(model, LoraConfig(r=2, alpha=4, targets=["q", "v"], modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"bert.encoder.layer.0.attention.self.{m}.lora.default.lora_{ab}" for m in ("query", "value")
                for ab in "AB"} | {"classifier.weight", "classifier.bias"}
    assert trainable == expected

    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if n not in expected}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if n in expected}
    # Hand AdamW *every* parameter (with weight decay): frozen ones must still not move.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        target = torch.randn(2, 3, generator=gen)
        loss = (model(input_ids=ids).logits - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            if n in expected:
                assert p.grad is not None, n
            else:
                assert p.grad is None, n
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
        else:
            assert not torch.equal(p, lora_before[n]), n


def test_set_trainable_returns_exactly_the_adapter_params(tiny):
    model = tiny.llama()
    inject(model, LoraConfig(r=2, alpha=4, targets=["q"]))
    params = lora_core.set_trainable(model)
    assert len(params) == 4  # A and B on two layers
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_with_known_matrices(rslora):
    torch.manual_seed(0)
    model = TwoLayers(d_in=6, d_out=5)
    r, alpha = 4, 3.0
    inject(model, LoraConfig(r=r, alpha=alpha, targets=["proj"], rslora=rslora))
    w = lora_weights(model)["proj"]
    s = alpha / math.sqrt(r) if rslora else alpha / r
    assert w.scaling == s
    a = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 10 - 1
    b = torch.arange(20, dtype=torch.float32).reshape(5, 4) / 7 - 1.5
    with torch.no_grad():
        w.lora_A.copy_(a)
        w.lora_B.copy_(b)
    x = torch.randn(3, 2, 6, generator=torch.Generator().manual_seed(4))
    layer = model.proj
    with torch.no_grad():
        base = x @ layer.weight.T + layer.bias
        delta = layer(x) - base
    expected = x @ a.T @ b.T * s
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.delta_weight(), s * b @ a, atol=1e-6, rtol=0)


def test_dropout_only_in_training_mode(tiny):
    model = tiny.llama()
    inject(model, LoraConfig(r=4, alpha=8, targets=["q"], dropout=0.5))
    tiny.randomize_lora(model)
    ids = tiny.ids()
    model.eval()
    assert torch.equal(tiny.logits(model, ids), tiny.logits(model, ids))
    model.train()
    torch.manual_seed(0)
    first = tiny.logits(model, ids)
    torch.manual_seed(1)
    assert not torch.allclose(first, tiny.logits(model, ids))


def test_inject_errors(tiny):
    model = tiny.llama()
    with pytest.raises(LoraError, match="config must be a LoraConfig"):
        inject(model, {"r": 4})  # type: ignore[arg-type]
    with pytest.raises(LoraError, match="adapter name 'a b' is not valid"):
        inject(model, LoraConfig(r=4, alpha=8, targets=["q"]), name="a b")
    inject(model, LoraConfig(r=4, alpha=8, targets=["q"]))
    with pytest.raises(LoraError, match="adapter 'default' already exists"):
        inject(model, LoraConfig(r=4, alpha=8, targets=["q"]))
    with pytest.raises(LoraError, match="modules_to_save entry 'nothing_here' matches no module"):
        inject(model, LoraConfig(r=4, alpha=8, targets=["q"], modules_to_save=["nothing_here"]), name="b")
    assert lora_core.adapter_names(model) == ["default"]


def test_float64_model_gets_float64_lora(tiny):
    model = tiny.llama(dtype=torch.float64)
    inject(model, LoraConfig(r=2, alpha=4, targets=["q"]))
    assert all(w.lora_A.dtype == torch.float64 for w in lora_weights(model).values())


def test_bf16_model_keeps_fp32_lora_and_runs(tiny):
    model = tiny.llama(dtype=torch.bfloat16)
    ids = tiny.ids()
    before = tiny.logits(model, ids)
    inject(model, LoraConfig(r=2, alpha=4, targets=["q", "v"]))
    assert all(w.lora_A.dtype == torch.float32 for w in lora_weights(model).values())
    out = tiny.logits(model, ids)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, before)


def test_cpu_bf16_autocast_forward_and_backward(tiny):
    ids = tiny.ids()
    model = tiny.llama()
    inject(model, LoraConfig(r=4, alpha=8, targets=["q", "v", "mlp"]))
    tiny.randomize_lora(model, scale=0.2)
    ref = tiny.logits(model, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids).logits
    # bf16 activations: a few 2**-8 relative error per op; stated tolerance 5% of the logit range.
    assert (out.float() - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
    out.float().pow(2).mean().backward()
    for w in lora_weights(model).values():
        assert w.lora_A.grad is not None and w.lora_A.grad.dtype == torch.float32
        assert w.lora_B.grad is not None and torch.count_nonzero(w.lora_B.grad) > 0
