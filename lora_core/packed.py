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
slot's forward count, the layer's path in the model) rather than drawn from torch's global generator, so
a slot's masks are the same whichever slots share its batch, however long their sequences are and
whichever layers the pack holds for them (see :func:`apply_dropout` and :func:`site_key`). Train a slot
alone (K = 1) and in any pack: the same masks.

Optimizer and clipping per slot: :mod:`lora_core.packed_optim`. :meth:`Pack.save_slot` writes a slot
as an ordinary adapter (PEFT's format, loadable by PEFT and :func:`lora_core.load_adapter`).
Fused q/k/v layers (GPT-2 ``c_attn``) cannot be packed yet: a pack that would target one is refused.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import nn

from lora_core.config import LoraConfig
from lora_core.errors import LoraError
from lora_core.io import save_adapter
from lora_core.layer import PACKED_ATTR, LoraLayerMixin, as_lora_layer, restore_if_bare
from lora_core.model import (
    adapter_names,
    delete_adapter,
    inject,
    lora_layer,
    prepare_quantized,
    registry,
    resolve_saved_modules,
    set_active_adapter,
)
from lora_core.packed_attention import SITE_ATTR, install, uninstall
from lora_core.packed_layers import (
    Layout,
    PackedBranch,
    PackedDropout,
    PackedModule,
    PackState,
    apply_dropout,
    dropout_keep,
    mix,
    site_key,
)
from lora_core.targets import in_out_features, resolve_targets, weight_of

# Re-exported: the pieces of a pack live in lora_core.packed_layers.
__all__ = ["Layout", "Pack", "PackedBranch", "PackedDropout", "PackedModule", "SlotSnapshot", "SlotSpec",
           "add_snapshot", "apply_dropout", "dropout_keep", "fused_sites"]


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
        prepare_quantized(model, saved_paths)  # 4-bit/8-bit base layers: wrapped like nn.Linear (lora_core.quantized)
        self.model, self.capacity, self.max_rank = model, capacity, max_rank
        device = weight_of(sites[0].module).device if sites else next(model.parameters()).device
        self._state = PackState(capacity, device)
        for p in model.parameters():
            p.requires_grad_(False)
        self.branches: dict[str, PackedBranch] = {}
        self._sites: dict[int, str] = {}  # dropout site -> what draws there (site_key: kind and path)
        for site in sites:
            in_f, out_f = in_out_features(site.module)
            w = weight_of(site.module)
            dtype = w.dtype if w.dtype == torch.float64 else torch.float32
            branch = PackedBranch(self._state, self._site("lora", site.path), in_f, out_f, max_rank, dtype)
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
        self._attention: str | None = None  # the attention implementation replace_dropout replaced

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
        self.clear(slot)  # every layer's A, B and scaling zero; then the slot's own layers
        with torch.no_grad():
            for path, branch in self.branches.items():
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
        keys = tuple(mix(cast(SlotSpec, self.specs[s]).seed, self._forwards[s]) for s, _ in parts) if train else None
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

    def recompute_context(self) -> tuple[contextlib.AbstractContextManager[None],
                                         contextlib.AbstractContextManager[None]]:
        """``context_fn`` for non-reentrant activation checkpointing (``torch.utils.checkpoint`` with
        ``use_reentrant=False``, e.g. transformers' ``gradient_checkpointing_kwargs``): called as a
        checkpointed layer runs forward, it captures the batch layout then in force (rows per slot, the
        forward's dropout keys) and puts it back while the backward recomputes that layer, which happens
        after the ``with pack.batch(...)`` block has closed. The recompute therefore draws the same dropout
        masks: they are a function of the layout's keys, the layer and the shapes, not of any generator
        state (:func:`apply_dropout`)."""
        captured = (self._state.layout, self._state.single)

        @contextlib.contextmanager
        def replayed() -> Iterator[None]:
            before = (self._state.layout, self._state.single)
            self._state.layout, self._state.single = captured
            try:
                yield
            finally:
                self._state.layout, self._state.single = before

        return contextlib.nullcontext(), replayed()

    def replace_dropout(self) -> int:
        """Give each slot its own masks in the base model's dropout too: every ``nn.Dropout`` becomes a
        :class:`PackedDropout` of the same rate, and the model's attention-probability dropout (BERT's
        ``attention_probs_dropout_prob``, Llama's ``attention_dropout``) is drawn per slot by the pack's
        attention function (:mod:`lora_core.packed_attention`), which the model is switched to. Every
        mask is keyed by (slot seed, the slot's forward count, the module's path). Returns the number of
        dropout modules replaced plus the number of modules given an attention site. Without this,
        dropout in the base model draws from torch's global generator, and a slot's masks depend on the
        rest of the pack.

        Raises:
            LoraError: the model sets attention dropout but does not compute attention through
            transformers' AttentionInterface (or uses flash attention), so its masks could not be keyed.
        """
        changed = 0
        for path, module in list(self.model.named_modules()):
            for leaf, child in list(module.named_children()):
                if type(child) is nn.Dropout:
                    site = self._site("dropout", f"{path}.{leaf}" if path else leaf)
                    replacement = PackedDropout(self._state, site, child.p)
                    replacement.train(child.training)
                    setattr(module, leaf, replacement)
                    self._dropouts.append((f"{path}.{leaf}" if path else leaf, child))
                    changed += 1
        if self._attention is None:
            self._attention = install(self.model, self._state, lambda path: self._site("attention", path))
            if self._attention is not None:
                changed += sum(1 for m in self.model.modules() if SITE_ATTR in m.__dict__)
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
        if self._attention is not None:
            uninstall(self.model, self._attention)
        self.branches, self.saved, self._dropouts, self._attention = {}, {}, [], None

    def _site(self, kind: str, path: str) -> int:
        """The dropout site of the module at ``path`` (:func:`site_key`: by its path, so a slot's masks do
        not depend on which other layers the pack holds); two sites with one key are refused."""
        key = site_key(kind, path)
        if self._sites.setdefault(key, f"{kind}:{path}") != f"{kind}:{path}":
            raise LoraError(f"the dropout sites {self._sites[key]} and {kind}:{path} hash to the same key",
                            hint="rename one of the modules; this is vanishingly rare (a 32-bit hash)")
        return key

    def _spec(self, slot: int) -> SlotSpec:
        self._check_slot(slot)
        spec = self.specs[slot]
        if spec is None:
            raise LoraError(f"slot {slot} is empty")
        return spec

    def _check_slot(self, slot: int) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.capacity:
            raise LoraError(f"slot {slot!r} is not one of this pack's 0..{self.capacity - 1}")

