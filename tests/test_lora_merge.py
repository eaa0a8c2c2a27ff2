"""merge / unmerge / merge_and_unload / unload, in float32, float64 and bfloat16."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lora_core
from lora_core import LoraConfig, LoraError, inject, lora_weights, merge, merge_and_unload, unload, unmerge
from lora_core.analysis import base_weight

CASES = [
    ("llama", {"targets": ["all-linear"]}),
    ("llama", {"targets": ["q", "v"], "rslora": True}),
    ("gpt2", {"targets": ["q", "v"]}),  # fused slices on a Conv1D
    ("gpt2", {"targets": ["all-linear"]}),  # Conv1D whole layers
    ("neox", {"targets": ["q", "v", "mlp"]}),
    ("phi3", {"targets": ["k", "o"]}),
    ("bert", {"targets": ["attn"], "modules_to_save": ["classifier"]}),
]


def adapted(tiny, family: str, cfg: dict, seed: int = 0) -> nn.Module:
    model = getattr(tiny, family)(seed=seed)
    inject(model, LoraConfig(r=3, alpha=6, **cfg))
    tiny.randomize_lora(model, scale=0.3)
    if cfg.get("modules_to_save"):
        tiny.perturb_saved(model)
    return model


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora." not in f".{n}"}


@pytest.mark.parametrize(("family", "cfg"), CASES)
def test_merge_matches_unmerged_and_unmerge_restores(tiny, family, cfg):
    model = adapted(tiny, family, cfg)
    ids = tiny.ids()
    w0 = weights(model)
    expected_delta = {p: w.delta_weight().detach() for p, w in lora_weights(model).items()}
    unmerged = tiny.logits(model, ids)
    merge(model)
    merged = tiny.logits(model, ids)
    tiny.assert_f32_close(merged, unmerged)
    for path, delta in expected_delta.items():  # W' = W0 + s * B @ A, in (out, in) orientation
        w0_path = w0[f"{path}.weight"]
        w0_oi = w0_path.t() if isinstance(model.get_submodule(path), Conv1D) else w0_path
        tiny.assert_f32_close(base_weight(model.get_submodule(path)), w0_oi + delta)
    merge(model)  # merging twice is a no-op
    tiny.assert_f32_close(tiny.logits(model, ids), unmerged)
    unmerge(model)
    for name, value in weights(model).items():
        tiny.assert_f32_close(value, w0[name])
    tiny.assert_f32_close(tiny.logits(model, ids), unmerged)


@pytest.mark.parametrize(("family", "cfg"), CASES)
def test_merge_and_unload_gives_plain_model(tiny, family, cfg):
    model = adapted(tiny, family, cfg)
    ids = tiny.ids()
    expected = tiny.logits(model, ids)
    fresh = getattr(tiny, family)()
    plain_types = {n: type(m) for n, m in fresh.named_modules()}
    out = merge_and_unload(model)
    assert out is model
    assert {n: type(m) for n, m in model.named_modules()} == plain_types
    assert tiny.lora_module_paths(model) == []
    assert not any(hasattr(m, attr) for m in model.modules() for attr in ("lora", "lora_merged", "lora_active"))
    assert list(model.state_dict()) == list(fresh.state_dict())
    assert lora_core.adapter_names(model) == []
    tiny.assert_f32_close(tiny.logits(model, ids), expected)
    # The result is an ordinary model: it can be adapted again.
    inject(model, LoraConfig(r=2, alpha=2, targets=["all-linear"]))
    tiny.assert_f32_close(tiny.logits(model, ids), expected)


def test_gpt2_conv1d_merge_and_unload_types(tiny):
    model = adapted(tiny, "gpt2", {"targets": ["q", "v", "o", "mlp"]})
    merge_and_unload(model)
    for layer in model.transformer.h:
        for mod in (layer.attn.c_attn, layer.attn.c_proj, layer.mlp.c_fc, layer.mlp.c_proj):
            assert type(mod) is Conv1D
    assert type(model.lm_head) is nn.Linear


def test_merge_and_unload_keeps_trained_head(tiny):
    model = adapted(tiny, "bert", {"targets": ["q"], "modules_to_save": ["classifier"]})
    trained = model.classifier.weight.detach().clone()
    assert not torch.equal(trained, tiny.bert().classifier.weight)
    merge_and_unload(model)
    assert torch.equal(model.classifier.weight, trained)


@pytest.mark.parametrize(("family", "cfg"), CASES)
def test_unload_restores_base_exactly(tiny, family, cfg):
    model = adapted(tiny, family, cfg)
    ids = tiny.ids()
    fresh = getattr(tiny, family)()
    merge(model)
    unload(model)  # unmerges first
    assert tiny.lora_module_paths(model) == []
    assert list(model.state_dict()) == list(fresh.state_dict())
    for (n, p), (_, q) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        tiny.assert_f32_close(p, q, msg=n)
    tiny.assert_f32_close(tiny.logits(model, ids), tiny.logits(fresh, ids))


def test_switching_or_disabling_while_merged_is_an_error(tiny):
    model = adapted(tiny, "llama", {"targets": ["q"]})
    inject(model, LoraConfig(r=2, alpha=2, targets=["v"]), name="other")
    lora_core.set_active_adapter(model, "default")
    merge(model)
    with pytest.raises(LoraError, match=r"adapter 'default' is merged into model\.layers\.0\.self_attn\.q_proj"):
        lora_core.set_active_adapter(model, "other")
    with pytest.raises(LoraError, match="is merged"):
        lora_core.disable_adapters(model)
    with pytest.raises(LoraError, match="is merged"):
        lora_core.delete_adapter(model, "default")
    assert lora_core.adapter_names(model) == ["default", "other"]
    unmerge(model)
    lora_core.set_active_adapter(model, "other")


# ---------------------------------------------------------------------------------------------- float64


def float64_adapted(tiny, family: str) -> nn.Module:
    """A float64 model whose (float64) LoRA matrices hold full float64 values, not float32-representable ones."""
    model = tiny.llama(dtype=torch.float64) if family == "llama" else tiny.gpt2().double()
    inject(model, LoraConfig(r=3, alpha=6, targets=["all-linear"] if family == "llama" else ["q", "v", "mlp"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, w in sorted(lora_weights(model).items()):
            assert w.lora_A.dtype == w.lora_B.dtype == torch.float64
            w.lora_A.copy_(torch.randn(w.lora_A.shape, generator=gen, dtype=torch.float64) * 0.3)
            w.lora_B.copy_(torch.randn(w.lora_B.shape, generator=gen, dtype=torch.float64) * 0.3)
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D layers and fused q/v rows
def test_float64_merge_and_unmerge_stay_in_float64(tiny, family):
    """Float64 weights are merged in float64: float32 arithmetic would leave errors of ~1e-8 in W and the logits."""
    model = float64_adapted(tiny, family)
    ids = tiny.ids()
    w0 = weights(model)
    deltas = {p: w.delta_weight().detach() for p, w in lora_weights(model).items()}
    assert all(d.dtype == torch.float64 for d in deltas.values())
    unmerged = tiny.logits(model, ids)
    assert unmerged.dtype == torch.float64
    merge(model)
    for path, delta in deltas.items():  # W0 + dW rounded once, in float64: the same bits as computing it here
        w0_path = w0[f"{path}.weight"]
        w0_oi = w0_path.t() if isinstance(model.get_submodule(path), Conv1D) else w0_path
        assert torch.equal(base_weight(model.get_submodule(path)), w0_oi + delta), path
    torch.testing.assert_close(tiny.logits(model, ids), unmerged, atol=1e-10, rtol=0)
    unmerge(model)
    for name, value in weights(model).items():
        assert value.dtype == torch.float64
        torch.testing.assert_close(value, w0[name], atol=1e-12, rtol=0, msg=name)
    torch.testing.assert_close(tiny.logits(model, ids), unmerged, atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------- bf16


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bfloat16 numbers at |x| (8 significant bits): 2**(e - 8) where x = m * 2**e, m in [0.5, 1)."""
    _, exp = torch.frexp(x.float().abs().clamp_min(1e-30))
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exp - 8)


def test_bf16_merge_rounds_once(tiny):
    cfg = LoraConfig(r=4, alpha=8, targets=["all-linear"])
    fp32 = tiny.llama()
    inject(fp32, cfg)
    tiny.randomize_lora(fp32, scale=0.05)  # |s * B @ A| comparable to |W0| (~0.02)
    model = tiny.llama(dtype=torch.bfloat16)  # same seed: W0 rounded to bf16
    inject(model, cfg)
    with torch.no_grad():
        for path, w in lora_weights(model).items():
            src = lora_weights(fp32)[path]
            w.lora_A.copy_(src.lora_A)
            w.lora_B.copy_(src.lora_B)
    w0 = {p: model.get_submodule(p).weight.detach().clone() for p in lora_weights(model)}
    deltas = {p: w.delta_weight().detach() for p, w in lora_weights(model).items()}
    merge(model)
    ours_err, naive_err = 0.0, 0.0
    for path, delta in deltas.items():
        merged = model.get_submodule(path).weight.detach()
        assert merged.dtype == torch.bfloat16
        exact = w0[path].float() + delta  # the value the merge should round, once
        err = (merged.float() - exact).abs()
        # Rounded once to nearest: at most half a bf16 ulp, i.e. <= 2**-8 * |W'| element by element.
        assert torch.all(err <= 2.0 ** -8 * exact.abs()), path
        assert torch.all(err <= bf16_ulp(exact) / 2), path
        # Against the fp32 model's merged weights the bf16 rounding of W0 adds at most another half ulp.
        fp32_merged = fp32.get_submodule(path).weight.detach() + delta
        assert (merged.float() - fp32_merged).abs().max() <= 2.0 ** -7 * fp32_merged.abs().max(), path
        naive = w0[path] + delta.to(torch.bfloat16)  # bf16 arithmetic: rounds twice
        naive_e = (naive.float() - exact).abs()
        assert torch.all(err <= naive_e), path  # the correctly rounded value is never further away
        ours_err += float(err.pow(2).sum())
        naive_err += float(naive_e.pow(2).sum())
    assert ours_err < naive_err
    # Merge then unmerge: the bound lora_core.merge's docstring states, checked element by element.
    #   merge stores W1 = bf16(W0 + dW), off by e = W1 - (W0 + dW), |e| <= half a bf16 ulp at |W0 + dW|;
    #   unmerge stores W2 = bf16(W1 - dW) = bf16(W0 + e). W0 is itself a bf16 number, |e| away from W0 + e,
    #   so the nearest bf16 number to W0 + e is at most |e| away from it too: |W2 - W0| <= 2|e|, which is at
    #   most one bf16 ulp at |W0 + dW|, i.e. <= 2**-7 * |W0 + dW| (bf16 keeps 8 significant bits).
    # The two additions happen in float32 and round too, by 2**-24 relative each (a 2**-16 part of a bf16 ulp):
    # `slack` covers them.
    merged_w = {p: model.get_submodule(p).weight.detach().clone() for p in deltas}
    unmerge(model)
    worst = 0.0
    for path, delta in deltas.items():
        restored = model.get_submodule(path).weight.detach()
        assert restored.dtype == torch.bfloat16
        x = w0[path].double() + delta.double()  # W0 + dW, exact
        e = merged_w[path].double() - x
        err = (restored.double() - w0[path].double()).abs()
        slack = 2.0 ** -23 * (x.abs() + w0[path].double().abs())
        assert torch.all(err <= 2 * e.abs() + slack), path
        assert torch.all(err <= bf16_ulp(x).double() + slack), path
        assert torch.all(err <= 2.0 ** -7 * x.abs() + slack), path
        worst = max(worst, float((err / (2.0 ** -7 * x.abs())).max()))
        # Most weights come back bit-exact (|e| below half an ulp at W0 rounds back to W0).
        assert (restored == w0[path]).float().mean() > 0.5, path
    assert 0 < worst <= 1  # some weights do move, by at most the bound


def test_bf16_merged_logits_close_to_fp32_merged(tiny):
    ids = tiny.ids()
    cfg = LoraConfig(r=4, alpha=8, targets=["q", "v"])
    fp32 = tiny.llama()
    inject(fp32, cfg)
    tiny.randomize_lora(fp32, scale=0.05)
    bf16 = tiny.llama(dtype=torch.bfloat16)
    inject(bf16, cfg)
    with torch.no_grad():
        for path, w in lora_weights(bf16).items():
            w.lora_A.copy_(lora_weights(fp32)[path].lora_A)
            w.lora_B.copy_(lora_weights(fp32)[path].lora_B)
    unmerged_bf16 = tiny.logits(bf16, ids).float()
    merge(fp32)
    merge(bf16)
    ref = tiny.logits(fp32, ids)
    out = tiny.logits(bf16, ids).float()
    # bf16 activations: relative error of a few 2**-8; stated tolerance 5% of the logit range.
    tol = 0.05 * ref.abs().max().item()
    assert (out - ref).abs().max().item() <= tol
    assert (unmerged_bf16 - ref).abs().max().item() <= tol


def test_adding_an_adapter_while_merged_is_refused_cleanly(tiny, tmp_path):
    model = adapted(tiny, "llama", {"targets": ["q"]})
    lora_core.save_adapter(model, tmp_path)
    merge(model)
    ids = tiny.ids()
    merged = tiny.logits(model, ids)
    with pytest.raises(LoraError, match="is merged"):
        inject(model, LoraConfig(r=2, alpha=2, targets=["q", "v"]), name="other")
    with pytest.raises(LoraError, match="is merged"):
        lora_core.load_adapter(model, tmp_path, name="other")
    # Nothing was attached: only the merged adapter exists, on the q layers only.
    assert lora_core.adapter_names(model) == ["default"]
    assert all(list(m.lora) == ["default"] for m in model.modules() if hasattr(m, "lora"))
    assert not any(hasattr(layer.self_attn.v_proj, "lora") for layer in model.model.layers)
    assert torch.equal(tiny.logits(model, ids), merged)
    # Loading without activating is fine: the merged adapter stays active.
    lora_core.load_adapter(model, tmp_path, name="other", activate=False)
    assert lora_core.active_adapter(model) == "default"
    torch.testing.assert_close(tiny.logits(model, ids), merged, atol=0, rtol=0)
