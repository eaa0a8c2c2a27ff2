"""Packed adapters: K LoRA adapters trained together over one frozen model, each on its own batch rows.

A :class:`Pack` puts, on every layer any of its adapters may target, one stacked branch holding all K
slots: ``A`` is ``(K, R, in)`` and ``B`` is ``(K, out, R)`` with ``R`` the pack's largest rank. A slot
of rank ``r < R`` uses the first ``r`` rows of its ``A`` and columns of its ``B``; the rest are zero,
get zero gradients (``dL/dA_pad = B_pad^T ...`` with ``B_pad = 0`` and ``dL/dB_pad = ... (x A_pad^T)``
with ``A_pad = 0``) and stay exactly zero under AdamW. A slot that does not target a layer is all zero
there in the same way, so it contributes nothing. Each slot has its own scaling (alpha/r or
alpha/sqrt(r), per layer with rank/alpha patterns), init, dropout rate and dropout seed.

A batch is the concatenation of one batch per slot, in the order :meth:`Pack.batch` is given::

    with pack.batch([(slot0, 8), (slot2, 8)]):     # rows 0-7 are slot 0's, rows 8-15 slot 2's
        loss = model(**batch).loss

Per adapted layer the branch is two batched matmuls over the slots in the batch (``bmm(x, A^T)`` then
``baddbmm(y, h * s, B^T)``): the number of kernels does not depend on K. When every slot in the batch
has the same number of rows the per-slot inputs are a view of the batch; otherwise they are gathered
into a zero-padded ``(slots, most rows, ...)`` block (one gather, one select back). Slot k's update
reads only slot k's rows, so its gradients depend on nothing else in the batch.

``modules_to_save`` (a classifier head) are packed too (:class:`PackedModule`): each slot has its own
copy of the module's parameters, stacked, and the module runs once over all slots with
:func:`torch.func.vmap`, each slot's copy on its own rows.

Dropout (LoRA's, and with :meth:`Pack.replace_dropout` the base model's) is keyed by (slot seed, the
slot's forward count, layer) rather than drawn from torch's global generator, so a slot's masks are the
same whichever slots share its batch and however long their sequences are (see :func:`apply_dropout`).
Train a slot alone (K = 1) and in any pack: the same masks.

Optimizer and clipping per slot: :mod:`lora_core.packed_optim`. :meth:`Pack.save_slot` writes a slot
as an ordinary adapter (PEFT's format, loadable by PEFT and :func:`lora_core.load_adapter`).
Fused q/k/v layers (GPT-2 ``c_attn``) cannot be packed yet: a pack that would target one is refused.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.func import functional_call, vmap

from lora_core.config import LoraConfig
from lora_core.errors import LoraError
from lora_core.io import save_adapter
from lora_core.layer import PACKED_ATTR, LoraLayerMixin, as_lora_layer, restore_if_bare
from lora_core.model import (
    adapter_names,
    delete_adapter,
    inject,
    lora_layer,
    registry,
    resolve_saved_modules,
    set_active_adapter,
)
from lora_core.targets import in_out_features, resolve_targets, weight_of

__all__ = ["Layout", "Pack", "PackedBranch", "PackedDropout", "PackedModule", "SlotSnapshot", "SlotSpec", "add_snapshot", "apply_dropout",
           "dropout_keep", "fused_sites"]

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SlotSpec:
    """What occupies a slot: its adapter config, dropout seed, and the layers it adapts."""

    config: LoraConfig
    seed: int
    paths: frozenset[str]


@dataclass(frozen=True)
class SlotSnapshot:
    """A slot's adapter copied out of the pack: config, ``{path: (A, B)}`` at its ranks, saved modules."""

    config: LoraConfig
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    saved: dict[str, dict[str, torch.Tensor]]


def add_snapshot(model: nn.Module, snap: SlotSnapshot, name: str) -> None:
    """Add ``snap`` to ``model`` as an ordinary adapter ``name`` (made active and trainable, as
    :func:`lora_core.inject` does), e.g. after :meth:`Pack.remove` to keep a trained slot. The model's
    saved modules must be the original (unpacked) ones; their own values are left as they are."""
    inject(model, snap.config, name)
    reg = registry(model)
    for path, values in snap.saved.items():
        reg.saved[path].show(model.get_submodule(path), None)  # the module back to its own values
        reg.saved[path].per_adapter[name] = {k: v.clone() for k, v in values.items()}
    for path, (a, b) in snap.weights.items():
        weights = lora_layer(model, path).adapter_weights(name)
        with torch.no_grad():
            weights.lora_A.copy_(a)
            weights.lora_B.copy_(b)
    set_active_adapter(model, name)  # shows the adapter's saved values


@dataclass
class Layout:
    """Which slot owns which rows of the current batch: ``(slot, rows)`` in batch order."""

    parts: tuple[tuple[int, int], ...]
    capacity: int
    device: torch.device
    keys: tuple[int, ...] | None = None  # per part, the dropout key of this forward; None: not training
    rates: tuple[float, ...] = ()  # per part, its LoRA dropout rate
    positions: tuple[int, ...] | None = None  # per part, its own sequence length (before padding to the longest)
    slots: torch.Tensor = field(init=False)  # slot ids, in batch order
    whole: bool = field(init=False)  # every slot, in slot order: no per-slot selection needed
    seed_keys: torch.Tensor | None = field(init=False)  # keys on the device (None: not training)
    rate_tensor: torch.Tensor | None = field(init=False)  # LoRA dropout rates (None: no LoRA dropout now)
    rows: int = field(init=False)  # the most rows of any part
    gather: torch.Tensor | None = field(init=False)  # (parts * rows,) batch row per padded row, N = zero
    select: torch.Tensor | None = field(init=False)  # padded rows that are real, in batch order

    def __post_init__(self) -> None:
        counts = [n for _, n in self.parts]
        ids = [s for s, _ in self.parts]
        self.slots = torch.tensor(ids, dtype=torch.long, device=self.device)
        self.whole = ids == list(range(self.capacity))
        self.seed_keys = self.rate_tensor = None
        if self.keys is not None:
            self.seed_keys = torch.tensor(self.keys, dtype=torch.int64, device=self.device)
            if any(rate > 0 for rate in self.rates):
                self.rate_tensor = torch.tensor(self.rates, dtype=torch.float32, device=self.device)
        self.rows = max(counts)
        self.gather = self.select = None
        if len(set(counts)) > 1:
            total, gather, select, start = sum(counts), [], [], 0
            for i, n in enumerate(counts):
                gather += list(range(start, start + n)) + [total] * (self.rows - n)
                select += list(range(i * self.rows, i * self.rows + n))
                start += n
            self.gather = torch.tensor(gather, dtype=torch.long, device=self.device)
            self.select = torch.tensor(select, dtype=torch.long, device=self.device)

    @property
    def total(self) -> int:
        return sum(n for _, n in self.parts)

    def group(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (N, ...) as (parts, rows, ...): a view, or a zero-padded gather for unequal parts."""
        if self.gather is None:
            return x.reshape(len(self.parts), self.rows, *x.shape[1:])
        flat = x.reshape(x.shape[0], -1)
        padded = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])
        return padded.index_select(0, self.gather).view(len(self.parts), self.rows, *x.shape[1:])

    def ungroup(self, g: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`group`: (parts, rows, ...) back to (N, ...) in batch order."""
        flat = g.reshape(len(self.parts) * self.rows, *g.shape[2:])
        return flat if self.select is None else flat.index_select(0, self.select)


class _PackState:
    """Shared by a pack's branches: the slots and the current batch layout."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.capacity, self.device = capacity, device
        self.layout: Layout | None = None
        self.single: int | None = None  # Pack.only: every row is this slot's
        self._single_layouts: dict[tuple[int, int], Layout] = {}
        self.p = [0.0] * capacity  # dropout rate per slot

    def current(self, n: int) -> Layout:
        layout = self.layout
        if layout is None and self.single is not None:
            key = (self.single, n)
            if key not in self._single_layouts:
                self._single_layouts[key] = Layout(((self.single, n),), self.capacity, self.device)
            return self._single_layouts[key]
        if layout is None:
            raise LoraError("a packed model was called outside `with pack.batch(...)`",
                            hint="say which slot owns which rows: `with pack.batch([(slot, rows), ...]):`")
        if layout.total != n:
            raise LoraError(f"the batch has {n} rows but the pack's layout covers {layout.total}",
                            hint="give pack.batch one (slot, rows) entry per slot's part of the batch")
        return layout


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding 32-bit values (products wrap; masked)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _mix(*values: int) -> int:
    """A 32-bit hash of a few integers (the same finaliser, in Python)."""
    h = 0x9E3779B9
    for v in values:
        h = (h ^ (v & _M32)) * 0x01000193 & _M32
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & _M32
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & _M32
        h ^= h >> 16
    return h


def dropout_keep(keys: torch.Tensor, site: int, shape: tuple[int, int, int], p: torch.Tensor) -> torch.Tensor:
    """Keep-mask times ``1 / (1 - p)`` for each part: ``(parts, rows, positions, features)``, float32.

    ``keys`` (parts,) int64 are the parts' per-forward keys, ``site`` the layer's number in the pack,
    ``p`` (parts,) the rates. Element (i, r, t, f) depends only on (keys[i], site, r, t, f): not on how
    many rows or positions the other parts have.
    """
    rows, positions, features = shape
    dev = keys.device
    r = torch.arange(rows, device=dev, dtype=torch.int64).view(1, rows, 1, 1)
    t = torch.arange(positions, device=dev, dtype=torch.int64).view(1, 1, positions, 1)
    f = torch.arange(features, device=dev, dtype=torch.int64).view(1, 1, 1, features)
    base = (keys.view(-1, 1, 1, 1) + site * 0x27D4EB2F) & _M32
    h = _fmix32((base + r * 0x165667B1 + t * 0x1B873593 + f * 0x3C6EF372) & _M32)
    u = (h >> 8).to(torch.float32) * (1.0 / (1 << 24))
    keep_p = p.view(-1, 1, 1, 1).to(torch.float32)
    return (u >= keep_p).to(torch.float32) / (1.0 - keep_p)


def apply_dropout(lay: Layout, site: int, xg: torch.Tensor, rates: Sequence[float]) -> torch.Tensor:
    """``xg`` (parts, rows, positions, features) with each part's dropout (rate ``rates[i]``) applied.

    A part's mask depends only on its key, ``site``, its own rows and positions (``lay.positions``,
    capped at ``xg``'s) and the features. On CUDA it is :func:`dropout_keep`'s hash, one set of
    kernels for all parts; on the CPU, where that hash measured 8x slower than torch's own dropout
    (146 vs 17 ms for 32 x 48 x 384), each part draws from a generator seeded by (key, site), one
    ``bernoulli_`` per part.
    """
    keys = lay.keys
    if keys is None:
        raise LoraError("packed dropout ran without dropout keys", hint="this is a bug in lora_core.packed")
    parts, rows, positions, features = xg.shape
    if xg.device.type == "cuda":
        if lay.seed_keys is None:
            raise LoraError("packed dropout ran without dropout keys", hint="this is a bug in lora_core.packed")
        rate_t = lay.rate_tensor if rates is lay.rates and lay.rate_tensor is not None else \
            torch.tensor(list(rates), dtype=torch.float32, device=xg.device)
        return xg * dropout_keep(lay.seed_keys, site, (rows, positions, features), rate_t).to(xg.dtype)
    blocks: list[torch.Tensor | None] = []
    for i, ((_, n), rate) in enumerate(zip(lay.parts, rates, strict=True)):
        t = min(positions, lay.positions[i]) if lay.positions is not None else positions
        if rate <= 0:
            blocks.append(None)
            continue
        gen = torch.Generator(device=xg.device).manual_seed(_mix(keys[i], site))
        block = torch.empty(n, t, features, dtype=xg.dtype, device=xg.device).bernoulli_(1.0 - rate, generator=gen)
        blocks.append(block.mul_(1.0 / (1.0 - rate)))
        if parts == 1 and n == rows and t == positions:  # one part, nothing padded: the block is the mask
            return xg * block.unsqueeze(0)
    mask = torch.ones(parts, rows, positions, features, dtype=xg.dtype, device=xg.device)
    for i, drawn in enumerate(blocks):
        if drawn is not None:
            mask[i, :drawn.shape[0], :drawn.shape[1]] = drawn
    return xg * mask


class PackedBranch(nn.Module):
    """One layer's stacked LoRA weights for all slots of a pack (see the module docstring)."""

    scaling: torch.Tensor  # (K,): each slot's scaling on this layer, 0 where it does not adapt it

    def __init__(self, state: _PackState, site: int, in_f: int, out_f: int, rank: int, dtype: torch.dtype) -> None:
        super().__init__()
        k, dev = state.capacity, state.device
        self._state, self.site, self.rank = state, site, rank
        self.lora_A = nn.Parameter(torch.zeros(k, rank, in_f, dtype=dtype, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(k, out_f, rank, dtype=dtype, device=dev))
        self.register_buffer("scaling", torch.zeros(k, dtype=dtype, device=dev), persistent=False)

    def add_to(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lay = self._state.current(x.shape[0])
        n_parts, in_f = len(lay.parts), x.shape[-1]
        a, b, s = (self.lora_A, self.lora_B, self.scaling) if lay.whole else (
            self.lora_A.index_select(0, lay.slots), self.lora_B.index_select(0, lay.slots),
            self.scaling.index_select(0, lay.slots))
        xg = lay.group(x.reshape(x.shape[0], -1, in_f))  # (parts, rows, positions, in)
        if lay.keys is not None and lay.rate_tensor is not None:
            xg = apply_dropout(lay, self.site, xg, lay.rates)
        autocast = torch.is_autocast_enabled(x.device.type)
        if xg.dtype != a.dtype and not autocast:
            xg = xg.to(a.dtype)
        xs = xg.reshape(n_parts, -1, in_f)
        h = torch.bmm(xs, a.transpose(1, 2))
        h = h * s.view(-1, 1, 1).to(h.dtype)
        yg = lay.group(y.reshape(y.shape[0], -1, y.shape[-1])).reshape(n_parts, -1, y.shape[-1])
        if autocast or (yg.dtype == h.dtype and b.dtype == h.dtype):
            out = torch.baddbmm(yg, h, b.transpose(1, 2))
        else:
            out = yg + torch.bmm(h, b.transpose(1, 2)).to(yg.dtype)
        return lay.ungroup(out.view(n_parts, lay.rows, -1)).view(y.shape)

    def extra_repr(self) -> str:
        k, rank, in_f = self.lora_A.shape
        return f"slots={k}, rank<={rank}, in={in_f}, out={self.lora_B.shape[1]}"


class PackedModule(nn.Module):
    """A module trained in full per slot (``modules_to_save``): K stacked copies, each on its own rows."""

    def __init__(self, state: _PackState, module: nn.Module) -> None:
        super().__init__()
        self._state = state
        self.original = module  # frozen; its structure (and base values) for functional calls
        self.names = [name for name, _ in module.named_parameters()]
        self.stacked = nn.ParameterList(
            nn.Parameter(p.detach().unsqueeze(0).repeat(state.capacity, *([1] * p.dim())).clone())
            for _, p in module.named_parameters())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        lay = self._state.current(x.shape[0])
        params = {n: p.index_select(0, lay.slots) for n, p in zip(self.names, self.stacked, strict=True)}

        def one(ps: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = functional_call(self.original, ps, (xi, *args), kwargs)
            return out

        return lay.ungroup(vmap(one, randomness="different")(params, lay.group(x)))

    def load_slot(self, slot: int, values: dict[str, torch.Tensor] | None = None) -> None:
        """Give ``slot`` these values (default: the module's original values)."""
        source = values if values is not None else dict(self.original.named_parameters())
        with torch.no_grad():
            for name, p in zip(self.names, self.stacked, strict=True):
                p[slot].copy_(source[name])

    def slot_values(self, slot: int) -> dict[str, torch.Tensor]:
        return {n: p[slot].detach().clone() for n, p in zip(self.names, self.stacked, strict=True)}


class PackedDropout(nn.Module):
    """The base model's dropout in a pack: each part of the batch gets its slot's own masks, drawn from
    the same counter-based hash as the LoRA dropout (so they do not depend on the other parts).

    ``p`` reads 0.0: code that only reads a dropout module's rate to pass it to an attention kernel
    (BERT's attention-probability dropout goes to ``scaled_dot_product_attention``, which draws from
    one global generator) gets no dropout there; ``rate`` is the rate this module applies when called.
    """

    p = 0.0

    def __init__(self, state: _PackState, site: int, rate: float) -> None:
        super().__init__()
        self._state, self.site, self.rate = state, site, float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        lay = self._state.current(x.shape[0])
        xg = lay.group(x.reshape(x.shape[0], -1, x.shape[-1]))
        return lay.ungroup(apply_dropout(lay, self.site, xg, (self.rate,) * len(lay.parts))).view(x.shape)

    def extra_repr(self) -> str:
        return f"rate={self.rate:g} (per slot)"


def fused_sites(model: nn.Module, targets: Sequence[str], modules_to_save: Sequence[str] = ()) -> list[str]:
    """Paths of the fused q/k/v layers (GPT-2 ``c_attn``...) that ``targets`` adapt: a pack refuses them."""
    probe = LoraConfig(r=1, alpha=1.0, targets=tuple(targets), modules_to_save=tuple(modules_to_save))
    return [s.path for s in resolve_targets(model, probe.targets, probe.modules_to_save) if s.rows is not None]


class Pack:
    """K adapter slots over one frozen model: build it, :meth:`load` a config into a slot, train.

    Args:
        model: the base model; every parameter is frozen except the pack's.
        capacity: K, the number of slots.
        targets: every layer any slot may adapt (presets, names or patterns as in :class:`LoraConfig`).
        max_rank: R, the largest rank of any slot (and of any rank_pattern entry).
        modules_to_save: modules every slot trains in full (each its own copy), e.g. the classifier.

    Raises:
        LoraError: K or R below 1, targets that match nothing or name a fused q/k/v layer, a model
        that already carries a pack.
    """

    def __init__(self, model: nn.Module, capacity: int, targets: Sequence[str] | str, max_rank: int,
                 modules_to_save: Sequence[str] = ()) -> None:
        for value, what in ((capacity, "capacity"), (max_rank, "max_rank")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LoraError(f"a pack's {what} must be an integer >= 1, got {value!r}")
        if any(isinstance(m, LoraLayerMixin) and PACKED_ATTR in m._modules for m in model.modules()):
            raise LoraError("this model already carries a pack", hint="call pack.remove() on the old one first")
        probe = LoraConfig(r=1, alpha=1.0, targets=cast(tuple[str, ...], targets), modules_to_save=tuple(modules_to_save))
        saved_paths = resolve_saved_modules(model, probe.modules_to_save)
        sites = [s for s in resolve_targets(model, probe.targets, probe.modules_to_save)
                 if not any(s.path == p or s.path.startswith(p + ".") for p in saved_paths)]
        fused = [s.path for s in sites if s.rows is not None]
        if fused:
            raise LoraError(f"packed trials cannot adapt fused q/k/v layers yet ({fused[0]})",
                            hint="train these trials one at a time (pack 1)")
        self.model, self.capacity, self.max_rank = model, capacity, max_rank
        device = weight_of(sites[0].module).device if sites else next(model.parameters()).device
        self._state = _PackState(capacity, device)
        for p in model.parameters():
            p.requires_grad_(False)
        self.branches: dict[str, PackedBranch] = {}
        for i, site in enumerate(sites):
            in_f, out_f = in_out_features(site.module)
            w = weight_of(site.module)
            dtype = w.dtype if w.dtype == torch.float64 else torch.float32
            branch = PackedBranch(self._state, i, in_f, out_f, max_rank, dtype)
            as_lora_layer(site.module).add_module(PACKED_ATTR, branch)
            self.branches[site.path] = branch
        self.saved: dict[str, PackedModule] = {}
        for path in saved_paths:
            parent_path, _, leaf = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            packed = PackedModule(self._state, parent.get_submodule(leaf))
            setattr(parent, leaf, packed)
            self.saved[path] = packed
        for p in self.parameters():
            p.requires_grad_(True)
        self.specs: list[SlotSpec | None] = [None] * capacity
        self._forwards = [0] * capacity
        self._dropouts: list[tuple[str, nn.Module]] = []  # (path, the nn.Dropout replace_dropout swapped out)
        self._attention_rates: list[tuple[nn.Module, float]] = []  # (module, its attention_dropout before)

    def parameters(self) -> list[nn.Parameter]:
        """The pack's trainable tensors, each with the slot as its first dimension."""
        out: list[nn.Parameter] = []
        for branch in self.branches.values():
            out += [branch.lora_A, branch.lora_B]
        for packed in self.saved.values():
            out += list(packed.stacked)
        return out

    def load(self, slot: int, config: LoraConfig, seed: int = 0, generator: torch.Generator | None = None,
             saved_values: dict[str, dict[str, torch.Tensor]] | None = None) -> SlotSpec:
        """Put a new adapter in ``slot`` (replacing what was there): A initialised as ``config.init`` says
        (from ``generator``, else torch's global one), B zero, saved modules at their original values or
        ``saved_values[path]``; ``seed`` keys its dropout masks. Its forward count starts at 0."""
        self._check_slot(slot)
        saved_paths = resolve_saved_modules(self.model, config.modules_to_save) if config.modules_to_save else []
        if sorted(saved_paths) != sorted(self.saved):
            raise LoraError(f"slot config saves {saved_paths or 'no modules'} but the pack saves "
                            f"{list(self.saved) or 'none'}", hint="give every slot the pack's modules_to_save")
        targeted = {site.path for site in resolve_targets(self.model, config.targets, config.modules_to_save)}
        paths = [p for p in self.branches if p in targeted]
        if not paths:
            raise LoraError(f"targets {','.join(config.targets)} match none of the pack's layers",
                            hint=f"the pack adapts: {', '.join(list(self.branches)[:4])}...")
        ranks = {p: config.rank_for(p) for p in paths}
        if max(ranks.values()) > self.max_rank:
            raise LoraError(f"rank {max(ranks.values())} is above the pack's max_rank {self.max_rank}",
                            hint="build the pack with the largest rank any trial will use")
        with torch.no_grad():
            for path, branch in self.branches.items():
                branch.lora_A[slot].zero_()
                branch.lora_B[slot].zero_()
                branch.scaling[slot] = 0.0
                if path not in ranks:
                    continue
                r = ranks[path]
                a = branch.lora_A[slot, :r]
                if config.init == "kaiming":  # as LoraWeights.reset_parameters: same values from the same RNG state
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
                else:
                    nn.init.normal_(a, std=1.0 / r, generator=generator)
                branch.scaling[slot] = config.scaling_for(path)
            for path, packed in self.saved.items():
                packed.load_slot(slot, (saved_values or {}).get(path))
        self._state.p[slot] = config.dropout
        spec = SlotSpec(config, int(seed), frozenset(paths))
        self.specs[slot] = spec
        self._forwards[slot] = 0
        return spec

    def clear(self, slot: int) -> None:
        """Empty ``slot``: its weights zero, nothing in it."""
        self._check_slot(slot)
        with torch.no_grad():
            for branch in self.branches.values():
                branch.lora_A[slot].zero_()
                branch.lora_B[slot].zero_()
                branch.scaling[slot] = 0.0
        self._state.p[slot] = 0.0
        self.specs[slot] = None

    @contextlib.contextmanager
    def batch(self, parts: Sequence[tuple[int, int]], positions: Sequence[int] | None = None) -> Iterator[Layout]:
        """Within this block the model's batch is ``parts``: ``(slot, rows)`` in batch order, each slot
        at most once, every slot loaded. In training mode each part's forward count goes up by one.

        ``positions``: each part's own sequence length before the batch was padded to its longest (so a
        part's dropout masks do not depend on the others' lengths); default: the batch's length."""
        seen: set[int] = set()
        for slot, rows in parts:
            self._check_slot(slot)
            if self.specs[slot] is None:
                raise LoraError(f"slot {slot} is empty", hint="load a config into it first (pack.load)")
            if slot in seen or rows < 1:
                raise LoraError(f"bad layout {list(parts)}: each slot once, with at least one row")
            seen.add(slot)
        if not parts:
            raise LoraError("an empty layout", hint="give at least one (slot, rows) part")
        train = self.model.training
        rates = tuple(self._state.p[s] for s, _ in parts)
        keys = tuple(_mix(cast(SlotSpec, self.specs[s]).seed, self._forwards[s]) for s, _ in parts) if train else None
        if positions is not None and len(positions) != len(parts):
            raise LoraError(f"{len(positions)} lengths for {len(parts)} parts")
        self._state.layout = Layout(tuple((int(s), int(n)) for s, n in parts), self.capacity,
                                    self._state.device, keys, rates,
                                    tuple(int(t) for t in positions) if positions is not None else None)
        try:
            yield self._state.layout
        finally:
            self._state.layout = None
            if train:
                for slot, _ in parts:
                    self._forwards[slot] += 1

    @contextlib.contextmanager
    def only(self, slot: int) -> Iterator[None]:
        """Within this block every row of every batch is ``slot``'s, whatever the batch size (for
        evaluation and generation, which run one trial at a time). No forward counts move."""
        self._spec(slot)
        previous = self._state.single
        self._state.single = slot
        try:
            yield
        finally:
            self._state.single = previous

    def replace_dropout(self) -> int:
        """Give each slot its own masks in the base model's dropout too: every ``nn.Dropout`` becomes a
        :class:`PackedDropout` of the same rate (called as a module; a rate only read, such as BERT's
        attention-probability dropout, becomes 0), and an ``attention_dropout`` rate attribute (Llama)
        becomes 0. Returns the number of modules changed. Without this, dropout in the base model draws
        from torch's global generator, and a slot's masks depend on the rest of the pack."""
        changed = 0
        for path, module in list(self.model.named_modules()):
            if isinstance(getattr(module, "attention_dropout", None), float) and module.attention_dropout:
                self._attention_rates.append((module, float(module.attention_dropout)))
                setattr(module, "attention_dropout", 0.0)  # noqa: B010
                changed += 1
            for leaf, child in list(module.named_children()):
                if type(child) is nn.Dropout:
                    site = 1_000_000 + changed
                    replacement = PackedDropout(self._state, site, child.p)
                    replacement.train(child.training)
                    setattr(module, leaf, replacement)
                    self._dropouts.append((f"{path}.{leaf}" if path else leaf, child))
                    changed += 1
        return changed

    def slot_weights(self, slot: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{path: (A, B)}`` of ``slot`` at its own ranks ((r, in) and (out, r)), copies."""
        spec = self._spec(slot)
        out = {}
        for path in sorted(spec.paths, key=list(self.branches).index):
            r, branch = spec.config.rank_for(path), self.branches[path]
            out[path] = (branch.lora_A[slot, :r].detach().clone(), branch.lora_B[slot, :, :r].detach().clone())
        return out

    def save_slot(self, slot: int, path: str | os.PathLike[str], name: str = "slot") -> Path:
        """Write ``slot``'s adapter (its saved modules included) to ``path`` as
        :func:`lora_core.save_adapter` does, so PEFT and :func:`lora_core.load_adapter` read it. The
        pack stays as it was (a temporary ordinary adapter ``name`` is added for the write, then deleted)."""
        with self._exported(slot, name):
            return save_adapter(self.model, path, name)

    def snapshot(self, slot: int) -> SlotSnapshot:
        """A copy of ``slot``'s adapter: its config, ``(A, B)`` per layer and saved modules' values."""
        spec = self._spec(slot)
        return SlotSnapshot(spec.config, self.slot_weights(slot),
                            {path: packed.slot_values(slot) for path, packed in self.saved.items()})

    @contextlib.contextmanager
    def _exported(self, slot: int, name: str) -> Iterator[None]:
        snap = self.snapshot(slot)
        self._swap_saved(packed=False)  # the ordinary adapter registers the original modules
        try:
            add_snapshot(self.model, snap, name)
            yield
        finally:
            if name in adapter_names(self.model):
                delete_adapter(self.model, name)
            self._swap_saved(packed=True)
            for p in self.model.parameters():
                p.requires_grad_(False)
            for p in self.parameters():
                p.requires_grad_(True)

    @contextlib.contextmanager
    def original_modules(self) -> Iterator[dict[str, nn.Module]]:
        """Within this block the saved modules' original (unpacked) modules are back in the model, e.g.
        to initialise a new trial's head the way the model does; ``{path: module}``."""
        self._swap_saved(packed=False)
        try:
            yield {path: packed.original for path, packed in self.saved.items()}
        finally:
            self._swap_saved(packed=True)

    def _swap_saved(self, packed: bool) -> None:
        for path, module in self.saved.items():
            parent_path, _, leaf = path.rpartition(".")
            setattr(self.model.get_submodule(parent_path), leaf, module if packed else module.original)

    def remove(self) -> None:
        """Take the pack off the model: its layers and saved modules as they were."""
        for path in self.branches:
            layer = lora_layer(self.model, path)
            del layer._modules[PACKED_ATTR]
            restore_if_bare(layer)
        self._swap_saved(packed=False)
        for path, original in self._dropouts:
            parent_path, _, leaf = path.rpartition(".")
            setattr(self.model.get_submodule(parent_path), leaf, original)
        for module, rate in self._attention_rates:
            setattr(module, "attention_dropout", rate)  # noqa: B010 (a plain float attribute, not declared)
        self.branches, self.saved, self._dropouts, self._attention_rates = {}, {}, [], []

    def _spec(self, slot: int) -> SlotSpec:
        self._check_slot(slot)
        spec = self.specs[slot]
        if spec is None:
            raise LoraError(f"slot {slot} is empty")
        return spec

    def _check_slot(self, slot: int) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.capacity:
            raise LoraError(f"slot {slot!r} is not one of this pack's 0..{self.capacity - 1}")

