"""Fused q/k/v projections (GPT-2 c_attn, GPT-NeoX query_key_value, Phi-3 qkv_proj).

LoRA on "q and v" must change only the q and v rows of the fused output, by exactly
``s * x @ A_role.T @ B_role.T`` for each adapted role.
"""

from __future__ import annotations

import pytest
import torch

from lora_core import LoraConfig, adapters_disabled, inject, lora_weights
from lora_core.analysis import expected_lora_count, parameter_count

X_GEN_SEED = 11


def layer_io(model, path: str, in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, adapted output, base output) of the layer at ``path`` for a fixed random x."""
    x = torch.randn(2, 5, in_features, generator=torch.Generator().manual_seed(X_GEN_SEED))
    layer = model.get_submodule(path)
    with torch.no_grad():
        out = layer(x)
        with adapters_disabled(model):
            base = layer(x)
    return x, out, base


def role_blocks(w, role: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_role, B_role) from the documented layout: A stacks (r, in) blocks, B stacks (rows, r) blocks."""
    i = w.roles.index(role)
    start = sum(w.rows(r).numel() for r in w.roles[:i])
    n = w.rows(role).numel()
    return w.lora_A[i * w.r:(i + 1) * w.r], w.lora_B[start:start + n]


def check_fused_layer(model, path: str, in_features: int, out_features: int, expected_rows: dict[str, list[int]],
                      adapted: tuple[str, ...]) -> None:
    w = lora_weights(model)[path]
    assert w.roles == adapted
    x, out, base = layer_io(model, path, in_features)
    assert out.shape[-1] == out_features
    touched = set()
    for role in adapted:
        rows = torch.tensor(expected_rows[role])
        assert torch.equal(w.rows(role).cpu(), rows), role
        a, b = role_blocks(w, role)
        expected = base[..., rows] + w.scaling * (x @ a.T @ b.T)
        torch.testing.assert_close(out[..., rows], expected, atol=1e-5, rtol=1e-5)
        assert (out[..., rows] - base[..., rows]).abs().max() > 1e-2  # it really changed
        touched |= set(expected_rows[role])
    untouched = [i for i in range(out_features) if i not in touched]
    assert untouched  # some role was left alone
    assert torch.equal(out[..., untouched], base[..., untouched])  # bit-identical


def test_gpt2_c_attn_q_and_v_slices(tiny):
    model = tiny.gpt2()
    inject(model, LoraConfig(r=3, alpha=6, targets=["q", "v"]))
    tiny.randomize_lora(model)
    rows = {"q": list(range(0, 16)), "k": list(range(16, 32)), "v": list(range(32, 48))}
    for layer in (0, 1):
        check_fused_layer(model, f"transformer.h.{layer}.attn.c_attn", 16, 48, rows, ("q", "v"))
    w = lora_weights(model)["transformer.h.0.attn.c_attn"]
    assert w.lora_A.shape == (6, 16) and w.lora_B.shape == (32, 3)
    assert w.scaling == 2.0


def test_gpt2_fused_trainable_count(tiny):
    model = tiny.gpt2()
    r = 3
    inject(model, LoraConfig(r=r, alpha=6, targets=["q", "v"]))
    per_layer = r * (16 + 16) + r * (16 + 16)  # r * (in + out_role) for q and for v
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * per_layer == 384
    assert expected_lora_count(model) == 384
    assert parameter_count(model).lora == 384


def test_gpt2_whole_c_attn(tiny):
    model = tiny.gpt2()
    r = 2
    inject(model, LoraConfig(r=r, alpha=4, targets=["c_attn"]))
    tiny.randomize_lora(model)
    path = "transformer.h.0.attn.c_attn"
    w = lora_weights(model)[path]
    assert not w.fused and w.lora_A.shape == (2, 16) and w.lora_B.shape == (48, 2)
    x, out, base = layer_io(model, path, 16)
    torch.testing.assert_close(out, base + 2.0 * (x @ w.lora_A.T @ w.lora_B.T), atol=1e-5, rtol=1e-5)
    for lo in (0, 16, 32):  # every slice changes
        assert (out[..., lo:lo + 16] - base[..., lo:lo + 16]).abs().max() > 1e-2
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * r * (16 + 48)


def test_neox_query_key_value_interleaved_per_head(tiny):
    model = tiny.neox()
    inject(model, LoraConfig(r=2, alpha=4, targets=["q", "v"]))
    tiny.randomize_lora(model)
    # Output viewed as [heads=2, 3 * head_dim=24]: per head q rows, then k rows, then v rows.
    rows = {role: [h * 24 + i * 8 + d for h in range(2) for d in range(8)] for i, role in enumerate("qkv")}
    check_fused_layer(model, "gpt_neox.layers.0.attention.query_key_value", 16, 48, rows, ("q", "v"))
    assert expected_lora_count(model) == 2 * (2 * (16 + 16))


def test_phi3_qkv_proj_with_fewer_kv_heads(tiny):
    model = tiny.phi3()
    inject(model, LoraConfig(r=2, alpha=2, targets=["k", "v"]))
    tiny.randomize_lora(model)
    rows = {"q": list(range(0, 16)), "k": list(range(16, 24)), "v": list(range(24, 32))}
    check_fused_layer(model, "model.layers.0.self_attn.qkv_proj", 16, 32, rows, ("k", "v"))
    assert expected_lora_count(model) == 2 * (16 + 8) * 2


@pytest.mark.parametrize("family", ["gpt2", "neox", "phi3"])
def test_slices_mean_what_the_model_means(tiny, family):
    """With one token, attention returns v whatever q and k are: a q/k adapter must not change the logits
    and a v adapter must. This checks the row layout against the model's own q/k/v split."""
    ids = tiny.ids(length=1)
    base = tiny.logits(getattr(tiny, family)(), ids)
    for targets, changes in ((["q", "k"], False), (["v"], True)):
        model = getattr(tiny, family)()
        inject(model, LoraConfig(r=2, alpha=4, targets=targets))
        tiny.randomize_lora(model, scale=1.0)
        out = tiny.logits(model, ids)
        if changes:
            assert (out - base).abs().max() > 1e-3
        else:
            tiny.assert_f32_close(out, base)
    # ...and with several tokens q/k do matter.
    model = getattr(tiny, family)()
    inject(model, LoraConfig(r=2, alpha=4, targets=["q", "k"]))
    tiny.randomize_lora(model, scale=1.0)
    assert (tiny.logits(model, tiny.ids()) - tiny.logits(getattr(tiny, family)(), tiny.ids())).abs().max() > 1e-3


def test_fused_gradients_reach_only_own_blocks(tiny):
    model = tiny.gpt2(layers=1)
    inject(model, LoraConfig(r=2, alpha=4, targets=["q", "v"]))
    tiny.randomize_lora(model)
    path = "transformer.h.0.attn.c_attn"
    w = lora_weights(model)[path]
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(5))
    out = model.get_submodule(path)(x)
    out[..., 16:32].sum().backward()  # loss on the k slice only: no LoRA gradient at all
    assert torch.count_nonzero(w.lora_A.grad) == 0 and torch.count_nonzero(w.lora_B.grad) == 0
    w.lora_A.grad = w.lora_B.grad = None
    out = model.get_submodule(path)(x)
    out[..., :16].sum().backward()  # q slice: only the q blocks get gradients
    assert torch.count_nonzero(w.lora_A.grad[2:]) == 0 and torch.count_nonzero(w.lora_B.grad[16:]) == 0
    assert torch.count_nonzero(w.lora_A.grad[:2]) > 0 and torch.count_nonzero(w.lora_B.grad[:16]) > 0


# Rows of one role: one contiguous range (GPT-2, Phi-3), the same slice of every head (GPT-NeoX), or no
# regular layout at all (possible for a custom fused layer; handled with index_add).
ROW_LAYOUTS = {
    "contiguous": {"q": list(range(0, 8)), "v": list(range(16, 24))},
    "per-group": {"q": [0, 1, 6, 7, 12, 13, 18, 19], "v": [4, 5, 10, 11, 16, 17, 22, 23]},
    "irregular": {"q": [0, 3, 4, 9], "k": [1, 2, 23], "v": [5, 17]},
}


@pytest.mark.parametrize("layout", list(ROW_LAYOUTS))
@pytest.mark.parametrize(("y_dtype", "autocast"), [(torch.float32, False), (torch.bfloat16, False),
                                                   (torch.bfloat16, True)], ids=["fp32", "bf16-base", "autocast"])
def test_per_role_forward_equals_the_dense_update(layout, y_dtype, autocast):
    """The forward adds each role's B block into its own rows: the same numbers as the dense, zero-padded
    ``expanded_B`` (which export and merge use), with gradients reaching the same blocks."""
    from lora_core.layer import LoraWeights, row_layout

    rows = {role: torch.tensor(v) for role, v in ROW_LAYOUTS[layout].items()}
    assert (row_layout(rows["q"], 24) is None) == (layout == "irregular")
    w = LoraWeights(6, 24, r=2, scaling=1.5, dropout=0.0, init="kaiming", rows=rows)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        w.lora_B.copy_(torch.randn(w.lora_B.shape, generator=gen))
    x = torch.randn(2, 3, 6, generator=gen)
    y = torch.randn(2, 3, 24, generator=gen).to(y_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = w.add_to(x, y)
    assert out.dtype == y_dtype and out.shape == y.shape
    expected = y.float() + 1.5 * (x @ w.lora_A.T @ w.expanded_B().T)
    if y_dtype == torch.float32:
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    else:  # bf16 output: within a few bf16 roundings (2**-8 relative each) of the exact value
        torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=2 ** -6)
    untouched = sorted(set(range(24)) - {i for v in ROW_LAYOUTS[layout].values() for i in v})
    assert torch.equal(out[..., untouched], y[..., untouched])  # other rows are the base output, bit for bit
    # The dense form's gradients, block by block.
    out.float().pow(2).sum().backward()
    grads = (w.lora_A.grad.clone(), w.lora_B.grad.clone())
    w.lora_A.grad = w.lora_B.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        h = torch.nn.functional.linear(x if autocast else x.float(), w.lora_A)
        dense = (y.float() + (1.5 * h.float() @ w.expanded_B().T)).to(y_dtype)
    dense.float().pow(2).sum().backward()
    for ours, ref in zip(grads, (w.lora_A.grad, w.lora_B.grad), strict=True):
        # float32: reordered sums only; bf16: the dense reference rounds differently, a few 2**-8 of the scale
        scale = ref.abs().max().item()
        atol = 1e-5 * scale if y_dtype == torch.float32 and not autocast else 2 ** -5 * scale
        torch.testing.assert_close(ours, ref, atol=atol, rtol=0)
