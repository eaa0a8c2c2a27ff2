"""The pieces a pack puts into a model (see :mod:`lora_core.packed`): the batch layout, the stacked LoRA
branch of one layer, a packed ``modules_to_save`` module and a packed dropout, and how their dropout
masks are drawn (per slot, independent of the rest of the pack)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from lora_core.errors import LoraError

__all__ = ["Layout", "PackState", "PackedBranch", "PackedDropout", "PackedModule", "apply_dropout", "dropout_keep",
           "keep_mask", "mix", "site_key"]

_M32 = 0xFFFFFFFF


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


class PackState:
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


def mix(*values: int) -> int:
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


def site_key(kind: str, path: str) -> int:
    """The dropout site of a layer: a 32-bit hash of what draws there (``kind``: ``"lora"``, ``"dropout"``,
    ``"attention"``) and the module's path in the model. A slot's masks on a layer therefore depend on
    that layer alone, not on which other layers the pack holds (a pack built for q,v and one built for
    all-linear key the q,v trial's masks the same way)."""
    return mix(zlib.crc32(f"{kind}:{path}".encode()))


_INDEX_MULTIPLIERS = (0x165667B1, 0x1B873593, 0x3C6EF372, 0x2F0B3A49, 0x4CF5AD43)  # odd, one per index


def keep_mask(keys: torch.Tensor, site: int, shape: Sequence[int], p: torch.Tensor) -> torch.Tensor:
    """Keep-mask times ``1 / (1 - p)`` for each part: ``(parts, *shape)``, float32 (up to 5 dimensions).

    ``keys`` (parts,) int64 are the parts' per-forward keys, ``site`` the layer's dropout site, ``p``
    (parts,) the rates. Element (i, j0, j1, ...) depends only on (keys[i], site, j0, j1, ...): not on
    ``shape`` itself, so not on how many rows or positions the other parts have.
    """
    if not 1 <= len(shape) <= len(_INDEX_MULTIPLIERS):
        raise LoraError(f"keep_mask takes 1 to {len(_INDEX_MULTIPLIERS)} dimensions, got {tuple(shape)}")
    dev = keys.device
    base = (keys.view(-1, *([1] * len(shape))) + site * 0x27D4EB2F) & _M32
    for d, (size, factor) in enumerate(zip(shape, _INDEX_MULTIPLIERS, strict=False)):
        view = [1] * (len(shape) + 1)
        view[d + 1] = size
        base = base + torch.arange(size, device=dev, dtype=torch.int64).view(view) * factor
    h = _fmix32(base & _M32)
    u = (h >> 8).to(torch.float32) * (1.0 / (1 << 24))
    keep_p = p.view(-1, *([1] * len(shape))).to(torch.float32)
    return (u >= keep_p).to(torch.float32) / (1.0 - keep_p)


def dropout_keep(keys: torch.Tensor, site: int, shape: tuple[int, int, int], p: torch.Tensor) -> torch.Tensor:
    """:func:`keep_mask` of ``(parts, rows, positions, features)``: element (i, r, t, f) depends only on
    (keys[i], site, r, t, f)."""
    return keep_mask(keys, site, shape, p)


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
        gen = torch.Generator(device=xg.device).manual_seed(mix(keys[i], site))
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

    def __init__(self, state: PackState, site: int, in_f: int, out_f: int, rank: int, dtype: torch.dtype) -> None:
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

    def __init__(self, state: PackState, module: nn.Module) -> None:
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
    the same keyed streams as the LoRA dropout (so they do not depend on the other parts).

    ``p`` is the rate, as on ``nn.Dropout``: code that only reads it to pass it on (BERT hands its
    attention-probability dropout's ``p`` to the attention function) passes the real rate, and a pack's
    attention function (:mod:`lora_core.packed_attention`) applies it per slot.
    """

    def __init__(self, state: PackState, site: int, rate: float) -> None:
        super().__init__()
        self._state, self.site, self.p = state, site, float(rate)

    @property
    def rate(self) -> float:
        return self.p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        lay = self._state.current(x.shape[0])
        xg = lay.group(x.reshape(x.shape[0], -1, x.shape[-1]))
        return lay.ungroup(apply_dropout(lay, self.site, xg, (self.p,) * len(lay.parts))).view(x.shape)

    def extra_repr(self) -> str:
        return f"p={self.p:g} (per slot)"
