"""The LoRA layer: ``y = base(x) + scaling * B @ A @ dropout(x)`` on an existing linear layer.

The adapted module stays the same object with the same parameters (its ``weight`` and ``bias``
keep their names), so the base model's state dict is unchanged. Injection turns its class into a
subclass that adds the LoRA branch, the way ``torch.nn.utils.parametrize`` does; unloading turns it
back. A module can hold several named adapters; one or more of them are active at a time.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from lora_core.errors import LoraError
from lora_core.quantized import quant_kind
from lora_core.targets import in_out_features, is_conv1d, weight_of

PACKED_ATTR = "lora_packed"
"""The submodule name under which a layer holds a pack's branch (see :mod:`lora_core.packed`)."""


class PackedBranch(Protocol):
    """What a layer calls on its pack's branch: ``y`` plus each slot's update on that slot's rows."""

    def add_to(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


class LoraWeights(nn.Module):
    """One adapter's ``A`` and ``B`` on one linear layer.

    For a plain layer ``lora_A`` is ``(r, in)`` and ``lora_B`` is ``(out, r)``. For a fused q/k/v
    layer adapted on ``k`` of its roles, ``lora_A`` stacks one ``(r, in)`` block per role and
    ``lora_B`` stacks one ``(rows_of_role, r)`` block per role; ``rows`` holds the output rows each
    block writes to. Trainable numbers: ``sum(r * (in + rows_of_role))``, i.e. r·(in+out) per matrix.

    The forward pass of a fused layer applies each role's B block to that role's output rows only;
    :meth:`expanded_B` (the dense, zero-padded ``(out, k * r)`` B) is for export, merging and analysis.
    """

    dropout: nn.Dropout | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        scaling: float,
        dropout: float,
        init: str | None,
        rows: dict[str, torch.Tensor] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.r, self.scaling = in_features, out_features, r, float(scaling)
        self.roles: tuple[str, ...] = tuple(rows) if rows else ()
        blocks = len(self.roles) or 1
        b_rows = sum(int(v.numel()) for v in rows.values()) if rows else out_features
        self.lora_A = nn.Parameter(torch.empty(blocks * r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(b_rows, r, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        # Per role: where its block starts in lora_B, its number of rows, and their layout (see row_layout).
        self._blocks: list[tuple[int, int, tuple[int, int] | None]] = []
        if rows:
            start = 0
            for role in self.roles:
                idx = rows[role].to(device=device, dtype=torch.long)
                self.register_buffer(f"rows_{role}", idx, persistent=False)
                self._blocks.append((start, int(idx.numel()), row_layout(idx, out_features)))
                start += int(idx.numel())
        self.reset_parameters(init)

    def reset_parameters(self, init: str | None = "kaiming") -> None:
        """Initialise A (``None`` leaves it as allocated: for weights about to be loaded) and zero B."""
        with torch.no_grad():
            if init is None:
                pass
            elif init == "kaiming":
                for i in range(len(self.roles) or 1):
                    # Each role's block is initialised as its own (r, in) matrix would be.
                    nn.init.kaiming_uniform_(self.lora_A[i * self.r:(i + 1) * self.r], a=math.sqrt(5))
            elif init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:
                raise ValueError(f"unknown init {init!r}")
            self.lora_B.zero_()

    @property
    def fused(self) -> bool:
        """Whether this adapts some roles (rows) of a fused q/k/v layer rather than the whole output."""
        return bool(self.roles)

    def rows(self, role: str) -> torch.Tensor:
        """The output rows (a LongTensor, on the weights' device) that ``role``'s B block writes to."""
        idx = getattr(self, f"rows_{role}")
        assert isinstance(idx, torch.Tensor)
        return idx

    def expanded_B(self) -> torch.Tensor:
        """B as one ``(out, blocks * r)`` matrix, so that ``expanded_B() @ lora_A`` is the whole update.

        For a fused layer this is block structured: role i's block sits in its output rows and in
        columns ``i*r:(i+1)*r``; every other entry is zero. Differentiable.
        """
        if not self.fused:
            return self.lora_B
        full = self.lora_B.new_zeros(self.out_features, len(self.roles) * self.r)
        start = 0
        for i, role in enumerate(self.roles):
            idx = self.rows(role)
            n = idx.numel()
            full[idx, i * self.r:(i + 1) * self.r] = self.lora_B[start:start + n]
            start += n
        return full

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``scaling * B @ A`` as an ``(out, in)`` matrix, computed in ``dtype``.

        The default is the LoRA weights' dtype promoted to at least float32: float32 for float32
        weights, float64 for float64 weights (those of a float64 model).
        """
        dtype = dtype or torch.promote_types(self.lora_A.dtype, torch.float32)
        return (self.expanded_B().to(dtype) @ self.lora_A.to(dtype)) * self.scaling

    def add_to(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return ``y + scaling * B @ A @ dropout(x)`` (y is the base layer's output)."""
        a = self.lora_A
        if self.dropout is not None:
            x = self.dropout(x)
        autocast = torch.is_autocast_enabled(x.device.type)
        if x.dtype != a.dtype and not autocast:
            x = x.to(a.dtype)
        h = F.linear(x, a)
        y2, h2 = y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1])
        if self.fused:
            return self._add_per_role(h2, y2, autocast).view(y.shape)
        b = self.lora_B
        if (h.dtype == y.dtype and b.dtype == y.dtype) or autocast:
            # One fused GEMM: y + s * h @ B^T, no separate scale or add kernels.
            return torch.addmm(y2, h2, b.t(), alpha=self.scaling).view(y.shape)
        return y + (F.linear(h, b) * self.scaling).to(y.dtype)

    def _add_per_role(self, h: torch.Tensor, y: torch.Tensor, autocast: bool) -> torch.Tensor:
        """``y`` (tokens, out) plus, in each role's rows, ``scaling * h_role @ B_role^T``.

        ``h`` is ``x @ A^T`` (tokens, k * r): role i's columns ``i*r:(i+1)*r`` meet only role i's B
        block, so no zero-padded B is built and no zero products are computed. The result goes into
        a view of the role's rows (or, for rows without a regular layout, an ``index_add_``).
        """
        out = y.clone(memory_format=torch.contiguous_format)
        tokens, dt = out.shape[0], out.dtype
        one_gemm = autocast or (h.dtype == dt and self.lora_B.dtype == dt)
        for i, (start, n, layout) in enumerate(self._blocks):
            h_i, b_i = h[:, i * self.r:(i + 1) * self.r], self.lora_B[start:start + n]
            if one_gemm and layout is not None and layout[0] == self.out_features:
                # One contiguous range (GPT-2, Phi-3): one GEMM adds into that slice of the output, in the
                # output's dtype (under autocast that is the autocast dtype, as for the base layer).
                out[:, layout[1]:layout[1] + n].addmm_(h_i.to(dt), b_i.t().to(dt), alpha=self.scaling)
                continue
            u = F.linear(h_i, b_i)
            u, alpha = (u, self.scaling) if u.dtype == dt else ((u * self.scaling).to(dt), 1.0)
            if layout is None:
                out.index_add_(1, self.rows(self.roles[i]), u, alpha=alpha)
            else:
                group, first = layout
                groups = self.out_features // group
                dst = out.view(tokens, groups, group)[:, :, first:first + n // groups]
                dst.add_(u.view(tokens, groups, n // groups), alpha=alpha)
        return out

    def extra_repr(self) -> str:
        roles = f", roles={','.join(self.roles)}" if self.roles else ""
        return f"r={self.r}, scaling={self.scaling:g}, in={self.in_features}, out={self.out_features}{roles}"


class LoraLayerMixin(nn.Module):
    """Mixed into the class of an adapted linear layer (``nn.Linear`` or GPT-2's ``Conv1D``).

    Attributes added by :func:`attach`: ``lora`` (a ``ModuleDict`` of :class:`LoraWeights` by adapter
    name), ``lora_active`` (names whose branch runs), ``lora_enabled`` (False gives the base output),
    ``lora_merged`` (names currently folded into ``weight``).
    """

    weight: torch.Tensor  # the base layer's, (out, in) for nn.Linear and (in, out) for Conv1D
    lora: nn.ModuleDict
    lora_active: tuple[str, ...]
    lora_enabled: bool
    lora_merged: list[str]
    _lora_base_class: type[nn.Module]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y: torch.Tensor = super().forward(x, *args, **kwargs)
        if not self.lora_enabled:
            return y
        for name in self.lora_active:
            if name in self.lora and name not in self.lora_merged:
                y = self.adapter_weights(name).add_to(x, y)
        packed = self._modules.get(PACKED_ATTR)
        if packed is not None:  # a pack of adapters (lora_core.packed), each on its own rows of the batch
            y = cast(PackedBranch, packed).add_to(x, y)
        return y

    def adapter_weights(self, name: str) -> LoraWeights:
        """Adapter ``name``'s :class:`LoraWeights` on this layer."""
        return cast(LoraWeights, self.lora[name])

    def merge_adapter(self, name: str) -> None:
        """Fold ``scaling * B @ A`` into ``weight`` (arithmetic as :func:`lora_core.merge` describes)."""
        if name in self.lora_merged:
            return
        self._shift_weight(name, sign=1.0)
        self.lora_merged.append(name)

    def unmerge_adapter(self, name: str) -> None:
        """Subtract ``scaling * B @ A`` from ``weight`` again."""
        if name not in self.lora_merged:
            return
        self._shift_weight(name, sign=-1.0)
        self.lora_merged.remove(name)

    def _shift_weight(self, name: str, sign: float) -> None:
        """``W <- W + sign * dW`` in ``promote_types(W.dtype, float32)``, cast back to W's dtype once."""
        check_mergeable(self)
        w = self.weight
        compute = torch.promote_types(w.dtype, torch.float32)
        delta = self.adapter_weights(name).delta_weight(compute).to(w.device)
        if is_conv1d(self):
            delta = delta.t()
        with torch.no_grad():
            if w.dtype == compute:
                w.add_(delta, alpha=sign)
            else:
                w.copy_((w.to(compute) + sign * delta).to(w.dtype))


def check_mergeable(module: nn.Module, path: str = "") -> None:
    """Raise LoraError if ``module`` is a quantized layer: ``W0 + dW`` does not fit a 4-/8-bit weight in place."""
    kind = quant_kind(module)
    if kind is not None:
        where = f" at {path}" if path else ""
        raise LoraError(f"cannot merge an adapter into the {kind} quantized layer{where} "
                        f"({type(module).__name__}): W0 + dW is not on the quantization grid",
                        hint="dequantize first (lora_core.dequantize.dequantize(model, torch.bfloat16)), then "
                             "merge into the 16-bit copy; or keep the adapter separate")


def row_layout(idx: torch.Tensor, out_features: int) -> tuple[int, int] | None:
    """``(group, first)`` when the rows ``idx`` are the same slice ``[first, first + n/g)`` of each of the
    ``g = out_features / group`` consecutive groups of ``group`` rows, in order; None for any other layout.

    One contiguous range (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``) is ``(out_features, start)``; GPT-NeoX's
    per-head q/k/v rows are ``(3 * head_dim, i * head_dim)``. Either way the role's rows are then a
    strided view of the output, ``out.view(tokens, g, group)[:, :, first:first + n/g]``.
    """
    n = int(idx.numel())
    if n == 0:
        return None
    values: list[int] = idx.tolist()
    first = values[0]
    run = 1
    while run < n and values[run] == first + run:
        run += 1
    group = out_features if run == n else values[run] - first
    if group <= 0 or out_features % group or n != (out_features // group) * run or first + run > group:
        return None
    expected = (torch.arange(out_features // group)[:, None] * group + first + torch.arange(run)[None, :]).reshape(-1)
    return (group, first) if torch.equal(idx.cpu(), expected) else None


_LORA_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def lora_class_for(base_cls: type[nn.Module]) -> type[nn.Module]:
    """The adapted counterpart of ``base_cls`` (same name with a ``Lora`` prefix). One per class."""
    if base_cls not in _LORA_CLASSES:
        _LORA_CLASSES[base_cls] = type(f"Lora{base_cls.__name__}", (LoraLayerMixin, base_cls),
                                       {"_lora_base_class": base_cls})
    return _LORA_CLASSES[base_cls]


def is_lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` carries LoRA adapters (its class was swapped by :func:`attach`)."""
    return isinstance(module, LoraLayerMixin)


def as_lora_layer(module: nn.Module) -> LoraLayerMixin:
    """``module`` as a LoRA layer (its class swapped on first use, with no adapters yet)."""
    if not isinstance(module, LoraLayerMixin):
        module.__class__ = lora_class_for(type(module))
        layer = cast(LoraLayerMixin, module)
        layer.lora = nn.ModuleDict()
        layer.lora_active = ()
        layer.lora_enabled = True
        layer.lora_merged = []
    return cast(LoraLayerMixin, module)


def attach(module: nn.Module, name: str, weights: LoraWeights) -> LoraLayerMixin:
    """Give ``module`` an adapter ``name`` (turning it into a LoRA layer on first use); returns the module."""
    layer = as_lora_layer(module)
    weights.train(module.training)  # a model in eval mode gets no LoRA dropout from a new adapter
    layer.lora[name] = weights
    return layer


def detach(layer: LoraLayerMixin, name: str) -> None:
    """Remove adapter ``name``; a layer left without adapters (and no pack) turns back into its base class."""
    if name in layer.lora_merged:
        raise RuntimeError(f"adapter {name!r} is merged into the weights; unmerge it before removing it")
    del layer.lora[name]
    layer.lora_active = tuple(n for n in layer.lora_active if n != name)
    restore_if_bare(layer)


def restore_if_bare(layer: LoraLayerMixin) -> None:
    """Give ``layer`` its base class back when it carries neither adapters nor a pack."""
    if len(layer.lora) == 0 and PACKED_ATTR not in layer._modules:
        restore_base_class(layer)


def restore_base_class(layer: LoraLayerMixin) -> None:
    """Drop the LoRA attributes and give the module its original class back (weights untouched)."""
    for attr in ("lora", "lora_active", "lora_enabled", "lora_merged"):
        if attr in layer.__dict__ or attr in layer._modules:
            delattr(layer, attr)
    module: nn.Module = layer
    module.__class__ = layer._lora_base_class


def new_weights_for(module: nn.Module, r: int, scaling: float, dropout: float, init: str | None,
                    rows: dict[str, torch.Tensor] | None) -> LoraWeights:
    """LoRA weights shaped for ``module``, on its device; float32 unless the base is float64."""
    in_f, out_f = in_out_features(module)
    w = weight_of(module)
    dtype = w.dtype if w.dtype == torch.float64 else torch.float32
    return LoraWeights(in_f, out_f, r, scaling, dropout, init, rows, dtype=dtype, device=w.device)
