"""The LoRA layer: ``y = base(x) + scaling * B @ A @ dropout(x)`` on an existing linear layer.

The adapted module stays the same object with the same parameters (its ``weight`` and ``bias``
keep their names), so the base model's state dict is unchanged. Injection turns its class into a
subclass that adds the LoRA branch, the way ``torch.nn.utils.parametrize`` does; unloading turns it
back. A module can hold several named adapters; one or more of them are active at a time.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from lora_core.targets import in_out_features, is_conv1d


class LoraWeights(nn.Module):
    """One adapter's ``A`` and ``B`` on one linear layer.

    For a plain layer ``lora_A`` is ``(r, in)`` and ``lora_B`` is ``(out, r)``. For a fused q/k/v
    layer adapted on ``k`` of its roles, ``lora_A`` stacks one ``(r, in)`` block per role and
    ``lora_B`` stacks one ``(rows_of_role, r)`` block per role; ``rows`` holds the output rows each
    block writes to. Trainable numbers: ``sum(r * (in + rows_of_role))``, i.e. r·(in+out) per matrix.
    """

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
        if rows:
            for _i, role in enumerate(self.roles):
                idx = rows[role].to(device=device, dtype=torch.long)
                self.register_buffer(f"rows_{role}", idx, persistent=False)
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
        return bool(self.roles)

    def rows(self, role: str) -> torch.Tensor:
        return getattr(self, f"rows_{role}")

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

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` as an ``(out, in)`` float32 matrix."""
        return (self.expanded_B().float() @ self.lora_A.float()) * self.scaling

    def add_to(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return ``y + scaling * B @ A @ dropout(x)`` (y is the base layer's output)."""
        a, b = self.lora_A, self.expanded_B()
        if self.dropout is not None:
            x = self.dropout(x)
        if x.dtype != a.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.dtype)
        h = F.linear(x, a)
        if (h.dtype == y.dtype and b.dtype == y.dtype) or torch.is_autocast_enabled(y.device.type):
            # One fused GEMM: y + s * h @ B^T, no separate scale or add kernels.
            out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=self.scaling)
            return out.view(y.shape)
        return y + (F.linear(h, b) * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        roles = f", roles={','.join(self.roles)}" if self.roles else ""
        return f"r={self.r}, scaling={self.scaling:g}, in={self.in_features}, out={self.out_features}{roles}"


class LoraLayerMixin:
    """Mixed into the class of an adapted linear layer (``nn.Linear`` or GPT-2's ``Conv1D``).

    Attributes added by :func:`attach`: ``lora`` (a ``ModuleDict`` of :class:`LoraWeights` by adapter
    name), ``lora_active`` (names whose branch runs), ``lora_enabled`` (False gives the base output),
    ``lora_merged`` (names currently folded into ``weight``).
    """

    lora: nn.ModuleDict
    lora_active: tuple[str, ...]
    lora_enabled: bool
    lora_merged: list[str]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
        y = super().forward(x, *args, **kwargs)  # type: ignore[misc]
        if not self.lora_enabled:
            return y
        for name in self.lora_active:
            if name in self.lora and name not in self.lora_merged:
                y = self.lora[name].add_to(x, y)
        return y

    def merge_adapter(self, name: str) -> None:
        """Fold ``scaling * B @ A`` into ``weight``: float32 arithmetic, one cast back."""
        if name in self.lora_merged:
            return
        self._shift_weight(self.lora[name].delta_weight(), sign=1.0)
        self.lora_merged.append(name)

    def unmerge_adapter(self, name: str) -> None:
        if name not in self.lora_merged:
            return
        self._shift_weight(self.lora[name].delta_weight(), sign=-1.0)
        self.lora_merged.remove(name)

    def _shift_weight(self, delta: torch.Tensor, sign: float) -> None:
        w = self.weight  # type: ignore[attr-defined]
        if is_conv1d(self):  # type: ignore[arg-type]
            delta = delta.t()
        with torch.no_grad():
            w.copy_((w.float() + sign * delta.to(w.device)).to(w.dtype))


@functools.cache
def lora_class_for(base_cls: type) -> type:
    """The adapted counterpart of ``base_cls`` (same name with a ``Lora`` prefix). Cached per class."""
    return type(f"Lora{base_cls.__name__}", (LoraLayerMixin, base_cls), {"_lora_base_class": base_cls})


def is_lora_layer(module: nn.Module) -> bool:
    return isinstance(module, LoraLayerMixin)


def attach(module: nn.Module, name: str, weights: LoraWeights) -> None:
    """Give ``module`` an adapter ``name`` (turning it into a LoRA layer on first use)."""
    if not is_lora_layer(module):
        module.__class__ = lora_class_for(type(module))
        module.lora = nn.ModuleDict()
        module.lora_active = ()
        module.lora_enabled = True
        module.lora_merged = []
    module.lora[name] = weights


def detach(module: nn.Module, name: str) -> None:
    """Remove adapter ``name``; a module left without adapters turns back into its base class."""
    if name in module.lora_merged:
        raise RuntimeError(f"adapter {name!r} is merged into the weights; unmerge it before removing it")
    del module.lora[name]
    module.lora_active = tuple(n for n in module.lora_active if n != name)
    if len(module.lora) == 0:
        restore_base_class(module)


def restore_base_class(module: nn.Module) -> None:
    for attr in ("lora", "lora_active", "lora_enabled", "lora_merged"):
        if attr in module.__dict__ or attr in getattr(module, "_modules", {}):
            delattr(module, attr)
    module.__class__ = module._lora_base_class


def new_weights_for(module: nn.Module, r: int, scaling: float, dropout: float, init: str | None,
                    rows: dict[str, torch.Tensor] | None) -> LoraWeights:
    """LoRA weights shaped for ``module``, on its device; float32 unless the base is float64."""
    in_f, out_f = in_out_features(module)
    w = module.weight
    dtype = w.dtype if w.dtype == torch.float64 else torch.float32
    return LoraWeights(in_f, out_f, r, scaling, dropout, init, rows, dtype=dtype, device=w.device)
