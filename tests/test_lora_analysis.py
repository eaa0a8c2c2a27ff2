"""lora_core.analysis: counts, bytes, spectra, subspace similarity and amplification, on known answers."""

from __future__ import annotations

import math

import pytest
import torch

from lora_core import LoraConfig, inject
from lora_core.analysis import (
    adapter_nbytes,
    amplification_factor,
    base_parameter_count,
    base_weight,
    delta_weights,
    expected_lora_count,
    parameter_count,
    singular_spectrum,
    subspace_similarity,
    subspace_similarity_grid,
)

# Tiny llama: hidden 16, 2 heads of 8, 1 KV head (k/v: 16 -> 8), MLP 32, 2 layers, untied lm_head.
# (in, out) per adapted matrix:
LLAMA_SHAPES = {"q_proj": (16, 16), "k_proj": (16, 8), "v_proj": (16, 8), "o_proj": (16, 16),
                "gate_proj": (16, 32), "up_proj": (16, 32), "down_proj": (32, 16)}
# embed 64*16 + 2 * (q 256 + k 128 + v 128 + o 256 + gate 512 + up 512 + down 512 + 2 norms 32)
# + final norm 16 + lm_head 64*16
LLAMA_BASE = 1024 + 2 * 2336 + 16 + 1024


def test_hand_computed_llama_counts(tiny):
    model = tiny.llama()
    assert sum(p.numel() for p in model.parameters()) == LLAMA_BASE == 6736
    r = 2
    inject(model, LoraConfig(r=r, alpha=4, targets=["all-linear"]))
    per_layer = sum(r * (i + o) for i, o in LLAMA_SHAPES.values())
    assert per_layer == 64 + 48 + 48 + 64 + 96 + 96 + 96 == 512
    count = parameter_count(model)
    assert count.lora == expected_lora_count(model) == 2 * per_layer == 1024
    assert count.trainable == 1024 and count.saved_modules == 0
    assert count.base == base_parameter_count(model) == LLAMA_BASE
    assert count.fraction == pytest.approx(1024 / 6736, rel=1e-12)
    assert count.per_module["model.layers.1.mlp.down_proj"] == r * (32 + 16)
    assert count.per_module["model.layers.0.self_attn.k_proj"] == r * (16 + 8)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 1024
    assert adapter_nbytes(model) == 4 * 1024  # float32


def test_counts_with_rank_pattern_and_saved_head(tiny):
    model = tiny.bert()
    inject(model, LoraConfig(r=4, alpha=4, targets=["q", "v"], rank_pattern={"value": 1},
                             modules_to_save=["classifier"]))
    count = parameter_count(model)
    assert count.lora == expected_lora_count(model) == 4 * (16 + 16) + 1 * (16 + 16) == 160
    assert count.saved_modules == 3 * 16 + 3
    assert count.trainable == 160 + 51
    assert count.base == sum(p.numel() for p in tiny.bert().parameters())
    assert count.fraction == pytest.approx(211 / count.base, rel=1e-12)
    assert adapter_nbytes(model) == 4 * 211


def test_nbytes_follow_dtype(tiny):
    model = tiny.llama(dtype=torch.float64)
    inject(model, LoraConfig(r=2, alpha=4, targets=["q"]))
    assert adapter_nbytes(model) == 8 * 2 * 2 * (16 + 16)


def test_singular_spectrum_has_at_most_r_nonzero_values(tiny):
    model = tiny.llama()
    r = 3
    inject(model, LoraConfig(r=r, alpha=3, targets=["all-linear"]))
    tiny.randomize_lora(model)
    deltas = delta_weights(model)
    assert set(deltas) == {f"model.layers.{i}.{'self_attn' if n.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{n}"
                           for i in range(2) for n in LLAMA_SHAPES}
    for path, delta in deltas.items():
        s = singular_spectrum(delta)
        assert s.dtype == torch.float32
        assert torch.all(s[:-1] >= s[1:])  # largest first
        assert int((s > 1e-5 * s[0]).sum()) == r, path
        assert delta.shape == (LLAMA_SHAPES[path.rsplit(".", 1)[1]][1], LLAMA_SHAPES[path.rsplit(".", 1)[1]][0])


def test_base_weight_is_out_by_in(tiny):
    gpt2 = tiny.gpt2()
    c_attn = gpt2.transformer.h[0].attn.c_attn
    assert base_weight(c_attn).shape == (48, 16)
    assert torch.equal(base_weight(c_attn), c_attn.weight.t())
    q = tiny.llama().model.layers[0].self_attn.k_proj
    assert base_weight(q).shape == (8, 16)


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_subspace_similarity_identical():
    a = rand(8, 32, seed=0)
    for i in range(1, 9):
        assert subspace_similarity(a, a, i, i) == pytest.approx(1.0, abs=1e-9)
    grid = subspace_similarity_grid(a, a)
    torch.testing.assert_close(torch.diagonal(grid), torch.ones(8), atol=1e-6, rtol=0)


def test_subspace_similarity_same_row_space():
    a1 = rand(4, 32, seed=1)
    mix = rand(4, 4, seed=2) + 3 * torch.eye(4, dtype=torch.float64)  # invertible: rotates/rescales the rows
    a2 = mix @ a1
    assert subspace_similarity(a1, a2, 4, 4) == pytest.approx(1.0, abs=1e-9)
    # And any top-i of one lies inside all 4 of the other.
    for i in range(1, 5):
        assert subspace_similarity(a1, a2, i, 4) == pytest.approx(1.0, abs=1e-9)
    # Against a bigger adapter whose rows include A1's space (the paper's r=8 vs r=64 shape).
    big = torch.cat([rand(4, 4, seed=3) @ a1, rand(12, 32, seed=4)])
    assert subspace_similarity(a1, big, 4, 16) == pytest.approx(1.0, abs=1e-9)


def test_subspace_similarity_orthogonal():
    basis = torch.linalg.qr(rand(32, 32, seed=5))[0].t()  # orthonormal rows
    a1 = rand(4, 4, seed=6) @ basis[:4]
    a2 = rand(6, 6, seed=7) @ basis[4:10]
    for i in range(1, 5):
        for j in range(1, 7):
            assert subspace_similarity(a1, a2, i, j) == pytest.approx(0.0, abs=1e-6)


def test_subspace_similarity_known_partial_overlap():
    e = torch.eye(6, dtype=torch.float64)
    a1 = torch.stack([2 * e[0], e[1]])  # singular directions e0 (sv 2), e1 (sv 1)
    a2 = torch.stack([3 * e[0], e[2]])  # e0 (sv 3), e2 (sv 1)
    assert subspace_similarity(a1, a2, 1, 1) == pytest.approx(1.0, abs=1e-12)
    assert subspace_similarity(a1, a2, 2, 2) == pytest.approx(0.5, abs=1e-12)  # (1 + 0 + 0 + 0) / 2
    assert subspace_similarity(a1, a2, 2, 1) == pytest.approx(1.0, abs=1e-12)  # e0 lies in span(e0, e1)
    a3 = ((e[0] + e[2]) / math.sqrt(2))[None]  # halfway between A1's top direction and outside
    assert subspace_similarity(a1, a3, 1, 1) == pytest.approx(0.5, abs=1e-12)
    a4 = ((e[0] + e[1]) / math.sqrt(2))[None]  # inside span(e0, e1) but not along e0
    assert subspace_similarity(a1, a4, 1, 1) == pytest.approx(0.5, abs=1e-12)
    assert subspace_similarity(a1, a4, 2, 1) == pytest.approx(1.0, abs=1e-12)
    grid = subspace_similarity_grid(a1, a2)
    torch.testing.assert_close(grid, torch.tensor([[1.0, 1.0], [1.0, 0.5]]), atol=1e-6, rtol=0)


def test_subspace_similarity_grid_matches_pointwise():
    a1, a2 = rand(8, 32, seed=8), rand(16, 32, seed=9)
    grid = subspace_similarity_grid(a1, a2)
    assert grid.shape == (8, 16) and grid.dtype == torch.float32
    for i in range(1, 9):
        for j in range(1, 17):
            assert grid[i - 1, j - 1].item() == pytest.approx(subspace_similarity(a1, a2, i, j), abs=1e-6)
    assert torch.all((grid >= -1e-6) & (grid <= 1 + 1e-6))
    # float32 LoRA matrices are accepted as they come from a model.
    assert subspace_similarity(a1.float(), a2.float(), 8, 8) == pytest.approx(grid[7, 7].item(), abs=1e-5)


def test_subspace_similarity_index_errors():
    a = rand(4, 8, seed=10)
    with pytest.raises(ValueError, match="need 1 <= i <= 4"):
        subspace_similarity(a, a, 0, 1)
    with pytest.raises(ValueError, match="need 1 <= i <= 4 and 1 <= j <= 4"):
        subspace_similarity(a, a, 1, 5)


def test_amplification_factor_rank_one():
    w = torch.diag(torch.tensor([10.0, 5.0, 2.0, 0.5]))
    e = torch.eye(4)
    delta = 4 * torch.outer(e[3], e[3])  # dW amplifies the direction W uses least
    # ||dW||_F = 4; U = e3, V = e3; U^T W V^T = W[3, 3] = 0.5  ->  4 / 0.5 = 8
    assert amplification_factor(w, delta, 1) == pytest.approx(8.0, rel=1e-12)
    delta = 4 * torch.outer(e[0], e[0])  # ...and along its strongest direction: 4 / 10
    assert amplification_factor(w, delta, 1) == pytest.approx(0.4, rel=1e-12)


def test_amplification_factor_rank_two_and_off_diagonal():
    w = torch.tensor([[10.0, 1.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 0.5]])
    e = torch.eye(3)
    delta = 4 * torch.outer(e[2], e[2]) + 1 * torch.outer(e[0], e[1])  # sv 4 (e2, e2), sv 1 (e0, e1)
    # U = [e2, e0], V = [e2, e1]: U^T W V = [[W22, W21], [W02, W01]] = [[0.5, 0], [0, 1]]
    expected = math.sqrt(16 + 1) / math.sqrt(0.25 + 1)
    assert amplification_factor(w, delta, 2) == pytest.approx(expected, rel=1e-12)
    # r=1 keeps only the top direction in the denominator; the numerator is all of ||dW||_F.
    assert amplification_factor(w, delta, 1) == pytest.approx(math.sqrt(17) / 0.5, rel=1e-12)
    with pytest.raises(ValueError, match="r must be between 1 and 3"):
        amplification_factor(w, delta, 4)


def test_amplification_factor_on_an_adapter(tiny):
    model = tiny.llama()
    inject(model, LoraConfig(r=2, alpha=4, targets=["q"]))
    tiny.randomize_lora(model)
    path = "model.layers.0.self_attn.q_proj"
    delta = delta_weights(model)[path]
    w = base_weight(model.get_submodule(path))
    u, _, vh = torch.linalg.svd(delta.double())
    projected = u[:, :2].T @ w.double() @ vh[:2].T
    expected = float(torch.linalg.matrix_norm(delta.double()) / torch.linalg.matrix_norm(projected))
    assert amplification_factor(w, delta, 2) == pytest.approx(expected, rel=1e-9)
    assert amplification_factor(w, delta, 2) > 0
