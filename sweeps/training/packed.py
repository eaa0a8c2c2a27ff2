"""Packed trials: up to K trials trained together over one frozen base model (:mod:`lora_core.packed`).

Each step takes one batch from every trial in the pack (each trial's own seeded stream, exactly the
batches it would see alone), pads them to one length and runs one forward and one backward; the loss
is the sum of the trials' own mean losses, so no trial's gradient depends on another's rows. Each trial
has its own slot: learning rate and schedule (one rate for the adapter, one for the head when
``train.head_lr`` is set), gradient clipping, AdamW state and step count, head initialisation (from its
seed, as alone) and dropout masks (LoRA's and the base model's, attention probabilities included, each
keyed by its seed, its forward count and the layer's path: see :meth:`lora_core.packed.Pack.replace_dropout`).
Evaluation is per trial.

A trial that ends (complete, pruned, failed with a non-finite loss) leaves the pack at once and the next
waiting trial (``refill``) takes its slot from step 0 while the others go on.

Costs per trial: trainable parameters and adapter bytes exactly (its own ranks and layers); each step's
time is shared among the trials in it in proportion to their tokens; peak memory is the pack's peak
divided by the pack size, and ``pack_size`` (how many trials shared the pack, at most) is recorded
with every trial.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lora_core import LoraError
from lora_core.packed import Pack
from lora_core.packed_optim import PackedAdamW, clip_per_slot
from sweeps.config.trial import TrialConfig, objective_of
from sweeps.data.prepare import PreparedData
from sweeps.models.cache import reinit_fresh
from sweeps.models.heads import head_modules, saved_modules
from sweeps.models.load import LoadedModel
from sweeps.training.loop import evaluate_and_report, read_back
from sweeps.training.memory import (
    StepOutOfMemory,
    first_micro_batch,
    loss_count,
    set_checkpointing,
    split_batch,
    summed_loss,
)
from sweeps.training.optim import lr_lambda
from sweeps.training.result import TrialResult
from sweeps.training.runtime import peak_memory, seed_everything
from sweeps.training.state import ProgressHook, ReportHook, TrialBook
from sweeps.training.stream import batches

__all__ = ["PackMember", "PackedTrainer", "Waiting"]

@dataclass(kw_only=True)
class PackMember(TrialBook):
    """One trial inside a pack: its slot, batch stream, schedule and clipping threshold."""

    pack: Pack
    slot: int
    stream: Iterator[list[dict[str, Any]]]
    schedule: Callable[[int], float]
    pack_size: int = 1
    tag: Any = None  # the caller's, from its Waiting

    def evaluate(self) -> dict[str, float]:
        with self.pack.only(self.slot):
            return super().evaluate()


@dataclass
class Waiting:
    """A trial waiting for a slot: its config and hooks."""

    config: TrialConfig
    report: ReportHook | None = None
    progress: ProgressHook | None = None
    tag: Any = None  # handed to the PackMember (e.g. the Optuna trial number)
    micro_batch: int | None = None  # rows per forward, in place of the config's (run_trial's retry)


class PackedTrainer:
    """Trains up to ``capacity`` trials at a time over ``loaded``'s model (which becomes the pack's).

    Args:
        loaded: the base model (fresh: nothing injected), its tokenizer and device.
        data: the prepared data every trial trains on.
        capacity: K.
        targets: every layer any trial may adapt (e.g. ``["all-linear"]``).
        max_rank: the largest rank any trial may use.
        modules_to_save: ``auto`` or a list, as in the trial config (the same for every trial).
        task: the model's task.
        pad_waste: padding a forward may add over the trials' own lengths, as a fraction (default 0 on
            the CPU, unlimited on CUDA; see :func:`forward_groups`).
    """

    def __init__(self, loaded: LoadedModel, data: PreparedData, capacity: int, targets: Sequence[str],
                 max_rank: int, modules_to_save: Any, task: str, pad_waste: float | None = None) -> None:
        self.loaded, self.data, self.task = loaded, data, task
        # How much padding a forward may add to bring trials of different lengths together (see
        # forward_groups): none on the CPU, where every padded token costs compute (one forward over a
        # pack of 8 measured 1.46x the time per trial of one trial alone, all of it padding); any on
        # CUDA, where one small trial leaves the device idle and one launch for all is what pays.
        self.pad_waste = pad_waste if pad_waste is not None else (math.inf if loaded.device.type == "cuda" else 0.0)
        model = loaded.model
        self.saved = saved_modules(model, task, modules_to_save)
        self.heads = set(head_modules(model))
        self.pack = Pack(model, capacity, list(targets), max_rank, self.saved)
        self.pack.replace_dropout()
        params = self.pack.parameters()
        head_params = {id(p) for path, m in self.pack.saved.items() if path.split(".")[0] in self.heads
                       for p in m.stacked}
        self.opt = PackedAdamW(params, capacity, groups=[1 if id(p) in head_params else 0 for p in params], n_groups=2)
        self.members: list[PackMember | None] = [None] * capacity
        self.finished: list[PackMember] = []
        self.checkpointing = False  # gradient checkpointing on the model: while a live trial asks for it

    # ------------------------------------------------------------------ members
    def add(self, waiting: Waiting) -> PackMember:
        """Put a trial into a free slot, initialised as it would be alone (head and A from its seed)."""
        config = waiting.config
        free = [i for i, m in enumerate(self.members) if m is None]
        if not free:
            raise LoraError("the pack is full")
        if not config.lora.enabled:
            raise LoraError("a head-only trial (lora.enabled: false) cannot be packed", hint="use pack 1")
        checkpointing = config.train.gradient_checkpointing or any(m.config.train.gradient_checkpointing
                                                                   for m in self.live)
        if checkpointing != self.checkpointing:  # (the same numbers either way: it only saves memory)
            set_checkpointing(self.loaded.model, checkpointing, context_fn=self.pack.recompute_context)
            self.checkpointing = checkpointing
        slot = free[0]
        model = self.loaded.model
        # The trial's RNG sequence alone (trainer.start_trial): its seed, its head from the seed, then A.
        seed_everything(config.seed)
        saved_values = None
        if self.loaded.fresh_modules:  # on the original modules, which then get their own values back
            with self.pack.original_modules() as originals:
                base = {path: {k: v.detach().clone() for k, v in m.named_parameters()} for path, m in originals.items()}
                reinit_fresh(model, self.loaded.fresh_modules, config.seed)
                saved_values = {path: {k: v.detach().clone() for k, v in m.named_parameters()}
                                for path, m in originals.items()}
                with torch.no_grad():
                    for path, m in originals.items():
                        for k, v in m.named_parameters():
                            v.copy_(base[path][k])
        self.pack.load(slot, config.lora_config(modules_to_save=self.saved), seed=config.seed,
                       saved_values=saved_values)
        tr = config.train
        self.opt.reset_slot(slot, lr=[tr.lr, tr.head_lr or tr.lr], weight_decay=tr.weight_decay)
        objective, direction = objective_of(self.task)
        member = PackMember(config=config, model=model, data=self.data, tokenizer=self.loaded.tokenizer,
                            device=self.loaded.device, report=waiting.report, progress=waiting.progress,
                            result=TrialResult("COMPLETE", None, objective, direction, {}, {}, 0, 0),
                            pack=self.pack, slot=slot, stream=batches(self.data.train, tr.batch_size, config.seed),
                            schedule=lr_lambda(tr.schedule, int(tr.warmup_ratio * tr.steps), tr.steps),
                            tag=waiting.tag, micro_batch=waiting.micro_batch or first_micro_batch(tr))
        member.result.micro_batch_size = member.micro_batch
        self.members[slot] = member
        return member

    @property
    def live(self) -> list[PackMember]:
        return [m for m in self.members if m is not None]

    # ------------------------------------------------------------------ the loop
    def run(self, waiting: Iterable[Waiting] | Callable[[], Waiting | None] = (),
            on_done: Callable[[PackMember], None] | None = None) -> list[PackMember]:
        """Train until every trial (those added and those ``waiting``) has ended; a trial that ends
        leaves its slot to the next waiting one. ``waiting`` is a list, or a function asked for the next
        trial whenever a slot is free (None: none now). ``on_done(member)`` runs when a trial ends,
        while its slot still holds its adapter (to save it). Returns the members that ended, in order."""
        supply = waiting if callable(waiting) else _from(iter(waiting))
        finished_before = len(self.finished)
        self._fill(supply)
        self.loaded.model.train()
        try:
            while self.live:
                self._step()
                for member in list(self.live):
                    if member.done:
                        self._retire(member, on_done)
                self._fill(supply)
        finally:
            self.loaded.model.eval()
        return self.finished[finished_before:]

    def drop_all(self) -> None:
        """Empty every slot without finishing its trial (after an error or Ctrl-C)."""
        for member in self.live:
            self.pack.clear(member.slot)
            self.members[member.slot] = None

    def measure_trial_bytes(self, config: TrialConfig) -> int:
        """CUDA memory one trial of ``config`` adds to an empty pack, measured over one training step
        (its slot's tensors, gradients, AdamW state and activations); the slot is emptied again."""
        device = self.loaded.device
        if self.live or device.type != "cuda":
            raise LoraError("measure_trial_bytes needs an empty pack on a CUDA device")
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        self.add(Waiting(config))
        self.loaded.model.train()
        try:
            self._step()
            torch.cuda.synchronize(device)
            # The slot's share of the pack's stacked tensors (allocated for every slot) counts too.
            stacked = sum(p.numel() * p.element_size() for p in self.pack.parameters()) // self.pack.capacity
            return int(torch.cuda.max_memory_allocated(device) - base) + 3 * stacked
        finally:
            self.loaded.model.eval()
            self.drop_all()

    def _fill(self, supply: Callable[[], Waiting | None]) -> None:
        while any(m is None for m in self.members):
            nxt = supply()
            if nxt is None:
                return
            self.add(nxt)

    def _retire(self, member: PackMember, on_done: Callable[[PackMember], None] | None) -> None:
        member.pack_size = max(member.pack_size, len(self.live))
        member.close()
        self._measure(member)
        if on_done is not None:
            with self.pack.only(member.slot):
                on_done(member)
        self.pack.clear(member.slot)
        self.members[member.slot] = None
        self.finished.append(member)

    def _step(self) -> None:
        """One optimizer step for every live trial: per accumulated batch and micro-batch, one forward and
        backward over all of them (or over groups of similar length, see :func:`forward_groups`). Out of
        device memory: :class:`sweeps.training.memory.StepOutOfMemory`."""
        live = self.live
        for member in live:
            member.pack_size = max(member.pack_size, len(live))
        t0 = time.perf_counter()
        totals: dict[int, torch.Tensor] = {}
        tokens = dict.fromkeys((m.slot for m in live), 0)
        try:
            for accum in range(max(m.config.train.grad_accum for m in live)):
                here = [m for m in live if accum < m.config.train.grad_accum]
                rows = [next(m.stream) for m in here]
                parts = [split_batch(r, m.micro_batch or len(r)) for m, r in zip(here, rows, strict=True)]
                counts = [loss_count(r, self.task) if len(p) > 1 else 0 for r, p in zip(rows, parts, strict=True)]
                for j in range(max(len(p) for p in parts)):  # the j-th micro-batch of every trial that has one
                    now = [i for i, p in enumerate(parts) if j < len(p)]
                    examples = [parts[i][j] for i in now]
                    lengths = [max(len(e["input_ids"]) for e in g) for g in examples]  # each part's own length
                    for group in forward_groups(lengths, [len(g) for g in examples], self.pad_waste):
                        self._forward_backward([here[now[i]] for i in group], [examples[i] for i in group],
                                               [lengths[i] for i in group], [counts[now[i]] for i in group],
                                               totals, tokens)
            limits = torch.zeros(self.pack.capacity)
            for member in live:
                tr = member.config.train
                limits[member.slot] = tr.max_grad_norm or 0.0
                factor = member.schedule(member.steps)
                self.opt.set_lr(member.slot, [tr.lr * factor, (tr.head_lr or tr.lr) * factor])
            clip_per_slot(self.pack.parameters(), limits)
            self.opt.step([m.slot for m in live])
        except torch.OutOfMemoryError:
            raise StepOutOfMemory(max(m.steps for m in live),
                                  max(m.micro_batch or m.config.train.batch_size for m in live)) from None
        self.opt.zero_grad()
        dt = time.perf_counter() - t0
        all_tokens = sum(tokens.values()) or 1
        for member in live:
            share = dt * tokens[member.slot] / all_tokens
            member.tokens += tokens[member.slot]
            member.pending.append(totals[member.slot])
            member.step_times.append(share)
            member.steps += 1
            member.result.steps_done = member.steps
            t1 = time.perf_counter()
            ok = read_back(member)
            member.train_s += share + time.perf_counter() - t1
            if ok:
                evaluate_and_report(member)

    def _forward_backward(self, members: list[PackMember], examples: list[list[dict[str, Any]]], lengths: list[int],
                          counts: list[int], totals: dict[int, torch.Tensor], tokens: dict[int, int]) -> None:
        """One forward and backward over ``members``' batches, padded to the longest of them; each
        member's (accumulation-scaled) loss is added to ``totals`` and its real tokens to ``tokens``. A
        member whose ``counts`` entry is not 0 gives a micro-batch: its summed loss over its whole batch's
        count (:mod:`sweeps.training.memory`), so its micro-batches add up to the batch's mean loss."""
        device = self.loaded.device
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        batch = self.data.collate([e for g in examples for e in g])
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        labels = batch.pop("labels")
        layout = [(m.slot, len(g)) for m, g in zip(members, examples, strict=True)]
        with amp, self.pack.batch(layout, lengths):
            logits = self.loaded.model(**batch).logits
        total: torch.Tensor | None = None
        start = 0
        for member, (_, rows), count in zip(members, layout, counts, strict=True):
            part = slice(start, start + rows)
            start += rows
            mean = summed_loss(logits[part], labels[part], self.task) / count if count else \
                self._loss(logits[part], labels[part])
            loss = mean / member.config.train.grad_accum
            tokens[member.slot] += int(batch["attention_mask"][part].sum())
            total = loss if total is None else total + loss
            totals[member.slot] = loss.detach() + totals.get(member.slot, 0)
        assert total is not None
        total.backward()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A trial's mean loss on its rows, as the model computes it alone (cross-entropy; for a causal
        LM over the next tokens whose label is not -100)."""
        if self.task == "classification":
            return F.cross_entropy(logits.float(), labels)
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)

    def _measure(self, member: PackMember) -> None:
        """Costs into the member's result: exact parameter counts and bytes, apportioned memory."""
        result, slot = member.result, member.slot
        lora = sum(a.numel() + b.numel() for a, b in self.pack.slot_weights(slot).values())
        head = sum(v.numel() for packed in self.pack.saved.values() for v in packed.slot_values(slot).values())
        total = sum(p.numel() for p in self.loaded.model.parameters()) - sum(p.numel() for p in self.pack.parameters())
        result.lora_params, result.trainable_params = lora, lora + head
        result.trainable_fraction = result.trainable_params / total
        result.adapter_bytes = 4 * result.trainable_params  # float32 tensors in the adapter file
        peak, kind = peak_memory(member.device)
        result.pack_size = member.pack_size
        result.peak_memory_bytes = peak // member.pack_size
        result.memory_kind = kind if member.pack_size == 1 else f"{kind}_shared_by_{member.pack_size}"


def _from(items: Iterator[Waiting]) -> Callable[[], Waiting | None]:
    return lambda: next(items, None)


def forward_groups(lengths: Sequence[int], rows: Sequence[int], pad_waste: float) -> list[list[int]]:
    """The parts of a step (each ``rows[i]`` sequences padded to its own ``lengths[i]``) in groups that
    run one forward each: longest first, a part joins the current group while the group's padded
    tokens stay within ``1 + pad_waste`` times its parts' own. ``pad_waste`` 0 groups only parts of equal
    length; infinity puts every part in one forward. Results do not depend on the grouping."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    own = 0
    for i in order:
        if groups:
            group = groups[-1]
            width = lengths[group[0]]  # the longest in the group
            n = sum(rows[j] for j in group) + rows[i]
            if n * width <= (1 + pad_waste) * (own + rows[i] * lengths[i]):
                group.append(i)
                own += rows[i] * lengths[i]
                continue
        groups.append([i])
        own = rows[i] * lengths[i]
    return [sorted(g) for g in groups]
