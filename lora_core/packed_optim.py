"""Per-slot optimisation of a :class:`lora_core.packed.Pack`: AdamW and gradient clipping, each slot on its own.

Every tensor of a pack has the slot as its first dimension, so one parameter group per trial is not
possible with ``torch.optim``; instead each slot gets its own learning rate, weight decay, step count
(for Adam's bias correction) and clipping threshold, applied to its own slice of every tensor. The
arithmetic per element is AdamW's (decoupled weight decay, as ``torch.optim.AdamW``); slots that do not
step (not in the batch, or empty) are left exactly as they are, moments included. The number of
kernels grows with the number of tensors, not with the number of slots.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lora_core.errors import LoraError

__all__ = ["PackedAdamW", "clip_per_slot", "slot_grad_norms"]


def _per_slot(values: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``values`` (K,) shaped to broadcast against ``p`` (K, ...)."""
    return values.view(-1, *([1] * (p.dim() - 1)))


def slot_grad_norms(params: Sequence[nn.Parameter]) -> torch.Tensor:
    """Each slot's gradient norm over all ``params`` (its slice of each), float32, shape (K,)."""
    total: torch.Tensor | None = None
    for p in params:
        if p.grad is None:
            continue
        sq = p.grad.detach().float().pow(2).flatten(1).sum(1)
        total = sq if total is None else total + sq
    if total is None:
        raise LoraError("no gradients to clip", hint="call loss.backward() before clipping")
    return total.sqrt()


def clip_per_slot(params: Sequence[nn.Parameter], max_norms: torch.Tensor) -> torch.Tensor:
    """Scale each slot's gradients so their norm is at most ``max_norms[slot]`` (0 or inf: no clipping),
    as ``torch.nn.utils.clip_grad_norm_`` would for that slot alone; returns the norms before clipping."""
    norms = slot_grad_norms(params)
    limit = max_norms.to(norms)
    coef = torch.where(limit > 0, (limit / (norms + 1e-6)).clamp(max=1.0), torch.ones_like(norms))
    for p in params:
        if p.grad is not None:
            p.grad.mul_(_per_slot(coef, p.grad).to(p.grad.dtype))
    return norms


class PackedAdamW:
    """AdamW over a pack's tensors with per-slot hyperparameters and step counts.

    Args:
        params: the pack's tensors (:meth:`lora_core.packed.Pack.parameters`), slot first.
        capacity: K.
        groups: for each tensor, its group (0, 1, ...): each slot has one learning rate per group
            (e.g. the adapter and the classifier head); default one group.
        n_groups: how many groups there are (some may have no tensors); default ``max(groups) + 1``.
        betas, eps: as ``torch.optim.AdamW`` (shared by all slots).
    """

    def __init__(self, params: Sequence[nn.Parameter], capacity: int, groups: Sequence[int] | None = None,
                 n_groups: int | None = None, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if not params:
            raise LoraError("PackedAdamW got no parameters")
        for p in params:
            if p.shape[0] != capacity:
                raise LoraError(f"a tensor of shape {tuple(p.shape)} is not stacked over {capacity} slots")
        self.params, self.capacity, self.betas, self.eps = list(params), capacity, betas, eps
        self.groups = list(groups) if groups is not None else [0] * len(self.params)
        if len(self.groups) != len(self.params) or min(self.groups) < 0:
            raise LoraError("PackedAdamW needs one group number (>= 0) per tensor")
        dev = self.params[0].device
        n = max(self.groups) + 1 if n_groups is None else n_groups
        if n < max(self.groups) + 1:
            raise LoraError(f"n_groups={n_groups} but a tensor is in group {max(self.groups)}")
        self.lr = torch.zeros(n, capacity, dtype=torch.float64, device=dev)
        self.weight_decay = torch.zeros(capacity, dtype=torch.float64, device=dev)
        self.steps = torch.zeros(capacity, dtype=torch.float64, device=dev)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def reset_slot(self, slot: int, lr: float | Sequence[float], weight_decay: float) -> None:
        """A new trial in ``slot``: moments and step count zero, its learning rate(s) and weight decay."""
        self.set_lr(slot, lr)
        self.weight_decay[slot] = weight_decay
        self.steps[slot] = 0
        with torch.no_grad():
            for m, v in zip(self.exp_avg, self.exp_avg_sq, strict=True):
                m[slot].zero_()
                v[slot].zero_()

    def set_lr(self, slot: int, lr: float | Sequence[float]) -> None:
        """``slot``'s learning rate from now on, one number for every group or one per group (a schedule
        calls this before each step)."""
        values = [float(lr)] * self.lr.shape[0] if isinstance(lr, (int, float)) else [float(v) for v in lr]
        if len(values) != self.lr.shape[0]:
            raise LoraError(f"{len(values)} learning rates for {self.lr.shape[0]} groups")
        self.lr[:, slot] = torch.tensor(values, dtype=self.lr.dtype)

    @torch.no_grad()
    def step(self, slots: Sequence[int]) -> None:
        """One AdamW step for ``slots``; every other slot stays exactly as it is."""
        if not slots:
            return
        b1, b2 = self.betas
        stepping = torch.zeros(self.capacity, dtype=torch.bool, device=self.lr.device)
        stepping[list(slots)] = True
        self.steps += stepping.to(self.steps.dtype)
        t = self.steps.clamp(min=1)
        # Per group and slot, in float64 as torch.optim.AdamW computes its scalars: lr / (1 - b1^t), sqrt(1 - b2^t).
        step_size = torch.where(stepping, self.lr / (1 - b1 ** t), torch.zeros_like(self.lr))
        bc2_sqrt = (1 - b2 ** t).sqrt()
        decay = torch.where(stepping, 1 - self.lr * self.weight_decay, torch.ones_like(self.lr))
        for p, m, v, group in zip(self.params, self.exp_avg, self.exp_avg_sq, self.groups, strict=True):
            if p.grad is None:
                continue
            g = p.grad
            on = _per_slot(stepping, p)
            p.mul_(_per_slot(decay[group], p).to(p.dtype))
            m.copy_(torch.where(on, m.lerp(g, 1 - b1), m))
            v.copy_(torch.where(on, v * b2 + (1 - b2) * g * g, v))
            denom = (v.sqrt() / _per_slot(bc2_sqrt, p).to(p.dtype)).add_(self.eps)
            p.sub_(_per_slot(step_size[group], p).to(p.dtype) * m / denom)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
