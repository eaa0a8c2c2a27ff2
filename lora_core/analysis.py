"""Measurements on adapters: parameter counts, bytes, spectra, and the LoRA paper's analyses.

``subspace_similarity`` and ``amplification_factor`` follow Hu et al. (2021), section 7:

* phi(A1, A2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j), where U1, U2 hold the right-singular
  vectors of A1 and A2 (columns, ordered by singular value). 1 means the top-i directions of one
  lie inside the top-j directions of the other; 0 means they are orthogonal.
* amplification = ||dW||_F / ||U^T W V^T||_F, with U, V^T the top-r left/right singular vectors of dW:
  how much dW amplifies directions that W itself barely uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lora_core.model import adapter_info, lora_weights, registry
from lora_core.quantized import dequantized_weight, quant_kind, quantized_layers
from lora_core.targets import is_conv1d, weight_of


@dataclass(frozen=True)
class ParameterCount:
    """Trainable numbers of one adapter.

    Attributes:
        trainable: LoRA numbers plus ``modules_to_save`` numbers.
        lora: LoRA numbers only (sum of r·(in + out) over adapted matrices).
        saved_modules: numbers in ``modules_to_save``.
        base: parameters of the model without any adapter.
        fraction: ``trainable / base``.
        per_module: ``{module path: LoRA numbers}``.
    """

    trainable: int
    lora: int
    saved_modules: int
    base: int
    fraction: float
    per_module: dict[str, int]


def base_parameter_count(model: nn.Module) -> int:
    """Parameters of the model with every LoRA matrix left out (a 4-bit weight, stored two values a byte,
    counts as its ``in * out`` values)."""
    packed = {id(m.weight): int(m.in_features) * int(m.out_features)
              for _, m in quantized_layers(model) if quant_kind(m) == "4bit" and isinstance(m, nn.Linear)}
    return sum(packed.get(id(p), p.numel()) for n, p in model.named_parameters() if ".lora." not in f".{n}")


def parameter_count(model: nn.Module, name: str | None = None) -> ParameterCount:
    """Count adapter ``name``'s trainable numbers (default: the active adapter)."""
    info = adapter_info(model, name)
    per_module = {p: w.lora_A.numel() + w.lora_B.numel() for p, w in lora_weights(model, info.name).items()}
    saved = sum(sum(p.numel() for p in model.get_submodule(s).parameters()) for s in info.saved_paths)
    lora = sum(per_module.values())
    base = base_parameter_count(model)
    return ParameterCount(lora + saved, lora, saved, base, (lora + saved) / base, per_module)


def expected_lora_count(model: nn.Module, name: str | None = None) -> int:
    """r·(in + out) summed over adapted matrices (a fused layer counts one matrix per adapted role)."""
    total = 0
    for w in lora_weights(model, name).values():
        if w.fused:
            total += sum(w.r * (w.in_features + w.rows(role).numel()) for role in w.roles)
        else:
            total += w.r * (w.in_features + w.out_features)
    return total


def adapter_nbytes(model: nn.Module, name: str | None = None) -> int:
    """Bytes of adapter ``name``'s tensors in memory (LoRA matrices plus saved modules)."""
    info = adapter_info(model, name)
    total = sum(w.lora_A.numel() * w.lora_A.element_size() + w.lora_B.numel() * w.lora_B.element_size()
                for w in lora_weights(model, info.name).values())
    reg = registry(model)
    for spath in info.saved_paths:
        values = reg.saved[spath].values(model.get_submodule(spath), info.name)
        total += sum(v.numel() * v.element_size() for v in values.values())
    return total


def delta_weights(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """``{module path: scaling * B @ A}`` as ``(out, in)`` matrices: float32, or float64 for float64 LoRA weights."""
    with torch.no_grad():
        return {p: w.delta_weight() for p, w in lora_weights(model, name).items()}


def singular_spectrum(delta: torch.Tensor) -> torch.Tensor:
    """Singular values of an update matrix, largest first (float32)."""
    values: torch.Tensor = torch.linalg.svdvals(delta.detach().float())
    return values


def _right_singular_vectors(a: torch.Tensor) -> torch.Tensor:
    """Columns are the right-singular vectors of ``a`` (``r x in``), largest singular value first."""
    vh: torch.Tensor = torch.linalg.svd(a.detach().double(), full_matrices=False).Vh
    return vh.t()


def subspace_similarity(a1: torch.Tensor, a2: torch.Tensor, i: int, j: int) -> float:
    """The paper's phi(A1, A2, i, j) in [0, 1] for two A matrices of shape ``(r1, in)`` and ``(r2, in)``."""
    u1, u2 = _right_singular_vectors(a1), _right_singular_vectors(a2)
    if not (1 <= i <= u1.shape[1] and 1 <= j <= u2.shape[1]):
        raise ValueError(f"need 1 <= i <= {u1.shape[1]} and 1 <= j <= {u2.shape[1]}, got i={i}, j={j}")
    overlap = u1[:, :i].t() @ u2[:, :j]
    return float(overlap.pow(2).sum() / min(i, j))


def subspace_similarity_grid(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """phi(A1, A2, i, j) for every ``1 <= i <= r1``, ``1 <= j <= r2`` as an ``(r1, r2)`` tensor."""
    u1, u2 = _right_singular_vectors(a1), _right_singular_vectors(a2)
    sq = (u1.t() @ u2).pow(2)  # sq[a, b] = <u1_a, u2_b>^2
    cum = sq.cumsum(0).cumsum(1)  # cum[i-1, j-1] = ||U1[:, :i]^T U2[:, :j]||_F^2
    r1, r2 = sq.shape
    mins = torch.minimum(torch.arange(1, r1 + 1)[:, None], torch.arange(1, r2 + 1)[None, :]).to(cum.dtype)
    return (cum / mins).float()


def amplification_factor(w: torch.Tensor, delta: torch.Tensor, r: int) -> float:
    """||dW||_F / ||U^T W V^T||_F with U, V^T the top-``r`` singular vectors of dW.

    ``w`` and ``delta`` are ``(out, in)``. Large values mean dW amplifies directions that are weak in W.
    """
    d = delta.detach().double()
    u, _, vh = torch.linalg.svd(d, full_matrices=False)
    if not 1 <= r <= u.shape[1]:
        raise ValueError(f"r must be between 1 and {u.shape[1]}, got {r}")
    projected = u[:, :r].t() @ w.detach().double() @ vh[:r].t()
    return float(torch.linalg.matrix_norm(d) / torch.linalg.matrix_norm(projected))


def base_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as ``(out, in)`` (GPT-2 Conv1D stores it transposed; a quantized one dequantized)."""
    if quant_kind(module) is not None:
        return dequantized_weight(module)
    w = weight_of(module).detach()
    return w.t() if is_conv1d(module) else w
