"""One LoRA trial end to end: prepare the data, build the model (lora_core.inject), set up its training
slot (AdamW, schedule, batch stream), run the training loop and measure the result.

The loop never synchronises with the device inside a step: losses stay on the device and are read
back every ``READBACK_EVERY`` steps (and at evaluations), where NaN/inf is also checked. A trial that runs
out of device memory before its first evaluation starts again with half the micro-batch
(:mod:`sweeps.training.memory`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import nn

import lora_core
from lora_core.analysis import parameter_count
from lora_core.packed import SlotSnapshot, add_snapshot, fused_sites
from sweeps.config.trial import TrialConfig, objective_of
from sweeps.data.prepare import PreparedData, prepare_data
from sweeps.models.cache import BaseModelCache, reinit_fresh
from sweeps.models.heads import head_modules, saved_modules
from sweeps.models.load import LoadedModel, load_model, load_tokenizer
from sweeps.training.loop import train_loop
from sweeps.training.memory import (
    StepOutOfMemory,
    first_micro_batch,
    next_micro_batch,
    release_memory,
    set_checkpointing,
    trim_host_memory,
)
from sweeps.training.optim import lr_lambda, optimizer_and_schedule, param_groups
from sweeps.training.packed import PackedTrainer, Waiting
from sweeps.training.result import State, TrialResult
from sweeps.training.runtime import peak_memory, reset_peak_memory, seed_everything
from sweeps.training.state import READBACK_EVERY, ProgressHook, ReportHook, RngState, TrialSlot
from sweeps.training.stream import GROUP_BATCHES, batches

__all__ = [
    "GROUP_BATCHES", "READBACK_EVERY", "ProgressHook", "ReportHook", "State", "Trial", "TrialResult", "batches",
    "build_model", "head_modules", "lr_lambda", "measure_costs", "new_slot", "peak_memory", "run_trial",
    "seed_everything", "start_trial",
]


@dataclass
class Trial:
    """A trained (or partly trained) trial: the model with its adapter, and what was measured."""

    config: TrialConfig
    result: TrialResult
    model: nn.Module
    loaded: LoadedModel | None = None
    data: PreparedData | None = None


def build_model(config: TrialConfig, data: PreparedData, loaded: LoadedModel | None = None,
                models: BaseModelCache | None = None) -> tuple[LoadedModel, nn.Module]:
    """Load the base model (or take a fresh copy from ``models``), initialise its new modules (a
    classification head) from the trial seed, and inject LoRA (or, with ``lora.enabled: false``,
    make only the head trainable). The seed sequence is the same with and without a cache, so a
    sweep trial reproduces ``lora-sweep train`` with the same config."""
    if loaded is None:
        loaded = load_base(config, data, models)
        reinit_fresh(loaded.model, loaded.fresh_modules, config.seed)
    model = loaded.model
    saved = saved_modules(model, config.model.task, config.lora.modules_to_save)
    if config.lora.enabled:
        lora_core.inject(model, config.lora_config(modules_to_save=saved))
    else:
        if not saved:
            raise lora_core.LoraError("lora.enabled is false and nothing else is trainable",
                                      hint="the head-only baseline needs a classification task")
        for p in model.parameters():
            p.requires_grad_(False)
        for name in saved:
            model.get_submodule(name).requires_grad_(True)
    return loaded, model


def new_slot(config: TrialConfig, loaded: LoadedModel, data: PreparedData, report: ReportHook | None = None,
             progress: ProgressHook | None = None, micro_batch: int | None = None) -> TrialSlot:
    """The training slot of a built model: AdamW over what requires grad (the head at ``head_lr``),
    its schedule, a batch stream seeded by the trial seed, and an empty result. ``micro_batch``: rows
    per forward in place of the config's; gradient checkpointing on the model as the config says."""
    model, tr = loaded.model, config.train
    set_checkpointing(model, tr.gradient_checkpointing)
    micro = micro_batch or first_micro_batch(tr)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = optimizer_and_schedule(param_groups(model, tr, set(head_modules(model))), tr)
    objective, direction = objective_of(config.model.task)
    adapter = lora_core.active_adapter(model) if config.lora.enabled else None
    return TrialSlot(config=config, model=model, adapter=adapter, data=data, tokenizer=loaded.tokenizer,
                     device=loaded.device, params=params, optimizer=opt, schedule=sched,
                     stream=batches(data.train, tr.batch_size, config.seed),
                     result=TrialResult("COMPLETE", None, objective, direction, {}, {}, 0, 0, micro_batch_size=micro),
                     report=report, progress=progress, rng=RngState.capture(loaded.device), micro_batch=micro)


def start_trial(config: TrialConfig, report: ReportHook | None = None, progress: ProgressHook | None = None,
                data: PreparedData | None = None, models: BaseModelCache | None = None) -> tuple[TrialSlot, LoadedModel]:
    """Everything before the first step: the data (unless given), the model with its adapter, and the
    trial's slot, in the seed sequence that makes a trial reproducible with or without ``models``."""
    seed_everything(config.seed)
    if data is None:
        tokenizer = load_tokenizer(config.model.name, trust_remote_code=config.model.trust_remote_code)
        data = prepare_data(config.data, config.model.task, tokenizer, seed=config.seed)
    seed_everything(config.seed)
    loaded, _ = build_model(config, data, models=models)
    return new_slot(config, loaded, data, report=report, progress=progress), loaded


def measure_costs(slot: TrialSlot) -> None:
    """The slot's peak memory and parameter counts, into its result (after training)."""
    result, model = slot.result, slot.model
    result.peak_memory_bytes, result.memory_kind = peak_memory(slot.device)
    if slot.adapter is not None:
        counts = parameter_count(model, slot.adapter)
        result.trainable_params, result.lora_params = counts.trainable, counts.lora
        result.trainable_fraction = counts.fraction
        result.adapter_bytes = lora_core.analysis.adapter_nbytes(model, slot.adapter)
    else:
        result.trainable_params = sum(p.numel() for p in slot.params)
        result.trainable_fraction = result.trainable_params / sum(p.numel() for p in model.parameters())
        result.adapter_bytes = sum(p.numel() * p.element_size() for p in slot.params)


def run_trial(config: TrialConfig, report: ReportHook | None = None, progress: ProgressHook | None = None,
              data: PreparedData | None = None, models: BaseModelCache | None = None) -> Trial:
    """Train one trial as configured. ``report(step, metrics)`` is called after every evaluation and
    returns a reason to stop (the trial is then PRUNED with that reason) or None to go on;
    ``progress(step, total, loss)`` is called at every readback. A non-finite loss ends the trial
    FAILED. ``data`` and ``models`` let a sweep prepare the data and load the base model once.

    A LoRA trial runs as a pack of one (:class:`sweeps.training.packed.PackedTrainer`), so it gives the
    numbers it gives inside any pack; the returned model then carries its adapter as an ordinary
    adapter named ``default``. A head-only trial, or one that adapts a fused q/k/v layer (which packs do
    not support), trains alone (:func:`start_trial`).

    Out of device memory in a training step before the first evaluation: the trial starts again from
    step 0 (model, adapter, optimizer, schedule and batch stream rebuilt from the seed) with half the
    micro-batch, the same rows in the same order; at one row, or after an evaluation, a LoraError.
    ``result.micro_batch_size`` is the micro-batch it trained with."""
    t_start = time.perf_counter()
    seed_everything(config.seed)
    if data is None:
        tokenizer = load_tokenizer(config.model.name, trust_remote_code=config.model.trust_remote_code)
        data = prepare_data(config.data, config.model.task, tokenizer, seed=config.seed)
    micro = first_micro_batch(config.train)
    while True:
        try:
            trial = _train(config, data, models, report, progress, micro)
        except StepOutOfMemory as exc:
            oom = StepOutOfMemory(exc.steps_done, exc.micro)  # not the caught one: its traceback holds the tensors
        else:
            trial.result.wall_s = time.perf_counter() - t_start
            return trial
        micro = next_micro_batch(oom, config)  # (or a LoraError)
        release_memory()


def _train(config: TrialConfig, data: PreparedData, models: BaseModelCache | None, report: ReportHook | None,
           progress: ProgressHook | None, micro: int) -> Trial:
    """One attempt at the trial, from its seed, at micro-batch ``micro`` (run_trial's body)."""
    trim_host_memory()  # what earlier trials of this process freed goes back to the kernel first
    seed_everything(config.seed)
    loaded = load_base(config, data, models)
    if config.lora.enabled and not fused_sites(
            loaded.model, config.lora.targets, saved_modules(loaded.model, config.model.task, config.lora.modules_to_save)):
        result = _run_packed_alone(config, loaded, data, report, progress, micro)
        return Trial(config, result, loaded.model, loaded, data)
    reinit_fresh(loaded.model, loaded.fresh_modules, config.seed)
    build_model(config, data, loaded=loaded)
    slot = new_slot(config, loaded, data, report=report, progress=progress, micro_batch=micro)
    reset_peak_memory(slot.device)
    train_loop([slot])
    set_checkpointing(slot.model, False)  # the returned model as loaded (evaluation, export)
    measure_costs(slot)
    return Trial(config, slot.result, slot.model, loaded, slot.data)


def load_base(config: TrialConfig, data: PreparedData, models: BaseModelCache | None = None) -> LoadedModel:
    """The trial's base model as loaded (or a fresh copy from ``models``): nothing initialised or injected."""
    m = config.model
    if models is not None:
        return models.get(m.name, m.task, num_labels=data.num_labels, dtype=m.dtype, device=m.device,
                          trust_remote_code=m.trust_remote_code, quantize=m.quantize)
    return load_model(m.name, m.task, num_labels=data.num_labels, dtype=m.dtype, device=m.device,
                      trust_remote_code=m.trust_remote_code, quantize=m.quantize)


def _run_packed_alone(config: TrialConfig, loaded: LoadedModel, data: PreparedData, report: ReportHook | None,
                      progress: ProgressHook | None, micro: int | None = None) -> TrialResult:
    """A pack of one; afterwards the model carries the trained adapter as ``default`` (no pack)."""
    lo = config.lora
    trainer = PackedTrainer(loaded, data, 1, lo.targets, lo.r,
                            lo.modules_to_save, config.model.task)
    snapshots: list[SlotSnapshot] = []
    reset_peak_memory(loaded.device)
    members = trainer.run([Waiting(config, report, progress, micro_batch=micro)],
                          on_done=lambda member: snapshots.append(trainer.pack.snapshot(member.slot)))
    set_checkpointing(loaded.model, False)  # the returned model as loaded (evaluation, export)
    trainer.pack.remove()
    add_snapshot(loaded.model, snapshots[0], "default")
    loaded.model.eval()
    return members[0].result
