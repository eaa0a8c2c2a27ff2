"""One LoRA trial: model + lora_core.inject + AdamW + schedule + evaluation, returning measured numbers.

The loop never synchronises with the device inside a step: losses stay on the device and are read
back every ``READBACK_EVERY`` steps (and at evaluations), where NaN/inf is also checked.
"""

from __future__ import annotations

import math
import random
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

import lora_core
from lora_core.analysis import parameter_count
from sweeps.config.trial import TrialConfig
from sweeps.data.prepare import PreparedData, prepare_data
from sweeps.models.load import BaseModelCache, LoadedModel, load_model, load_tokenizer, reinit_fresh
from sweeps.training.evaluate import evaluate, objective_of

READBACK_EVERY = 10
State = Literal["COMPLETE", "PRUNED", "FAILED"]
ReportHook = Callable[[int, dict[str, float]], None]


class StopTrial(Exception):
    """Raised by a report hook (e.g. Optuna pruning) to end a trial early."""

    def __init__(self, reason: str, state: State = "PRUNED") -> None:
        super().__init__(reason)
        self.reason, self.state = reason, state


class NonFiniteLoss(Exception):
    pass


@dataclass
class TrialResult:
    """What one trial measured. Times in seconds, memory in bytes."""

    state: State
    reason: str | None
    objective: str
    direction: Literal["maximize", "minimize"]
    final_metrics: dict[str, float]
    best_metrics: dict[str, float]
    best_step: int
    steps_done: int
    history: list[dict[str, float]] = field(default_factory=list)  # evaluations: step + metrics
    train_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, train loss)
    tokens_per_s: float = 0.0
    step_time_s: float = 0.0
    peak_memory_bytes: int = 0
    memory_kind: str = ""
    trainable_params: int = 0
    lora_params: int = 0
    trainable_fraction: float = 0.0
    adapter_bytes: int = 0
    train_s: float = 0.0
    eval_s: float = 0.0
    wall_s: float = 0.0

    @property
    def value(self) -> float | None:
        return self.final_metrics.get(self.objective)

    def summary(self) -> dict[str, float]:
        out = {f"final_{k}": v for k, v in self.final_metrics.items()}
        out.update({f"best_{k}": v for k, v in self.best_metrics.items()})
        out.update(best_step=self.best_step, steps_done=self.steps_done, tokens_per_s=self.tokens_per_s,
                   step_time_s=self.step_time_s, peak_memory_bytes=self.peak_memory_bytes,
                   trainable_params=self.trainable_params, lora_params=self.lora_params,
                   trainable_fraction=self.trainable_fraction, adapter_bytes=self.adapter_bytes,
                   train_s=self.train_s, eval_s=self.eval_s, wall_s=self.wall_s)
        return out


@dataclass
class Trial:
    """A trained (or partly trained) trial: the model with its adapter, and what was measured."""

    config: TrialConfig
    result: TrialResult
    model: nn.Module
    loaded: LoadedModel | None = None
    data: PreparedData | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def head_modules(model: nn.Module) -> list[str]:
    """Top-level modules with parameters outside the backbone: the task head (classifier, score)."""
    prefix = getattr(model, "base_model_prefix", "")
    return [n for n, m in model.named_children() if n != prefix and any(True for _ in m.parameters())]


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)
    return f


GROUP_BATCHES = 16  # batches per length-sorted group


def batches(examples: list[dict[str, Any]], batch_size: int, seed: int) -> Iterator[list[dict[str, Any]]]:
    """Endless shuffled batches of similar length; each epoch is a new seeded permutation.

    Each run of ``GROUP_BATCHES`` batches' worth of shuffled examples is sorted by length and cut
    into batches, whose order is then shuffled again: batches stay random but carry little padding
    (dynamic padding pads to the longest example in the batch).
    """
    g = torch.Generator().manual_seed(seed)
    if len(examples) < batch_size:
        while True:
            yield [examples[j] for j in torch.randperm(len(examples), generator=g).tolist()]
    group = batch_size * GROUP_BATCHES
    while True:
        order = torch.randperm(len(examples), generator=g).tolist()
        usable = len(order) - len(order) % batch_size
        for start in range(0, usable, group):
            chunk = sorted(order[start:min(start + group, usable)], key=lambda j: len(examples[j]["input_ids"]))
            cut = [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
            for k in torch.randperm(len(cut), generator=g).tolist():
                yield [examples[j] for j in cut[k]]


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_peak_rss"


def build_model(config: TrialConfig, data: PreparedData, loaded: LoadedModel | None = None,
                models: BaseModelCache | None = None) -> tuple[LoadedModel, nn.Module]:
    """Load the base model (or take a fresh copy from ``models``), initialise its new modules (a
    classification head) from the trial seed, and inject LoRA (or, with ``lora.enabled: false``,
    make only the head trainable). The seed sequence is the same with and without a cache, so a
    sweep trial reproduces ``lora-sweep train`` with the same config."""
    if loaded is None:
        kwargs = dict(num_labels=data.num_labels, dtype=config.model.dtype, device=config.model.device,
                      trust_remote_code=config.model.trust_remote_code)
        loaded = (models.get(config.model.name, config.model.task, **kwargs) if models is not None
                  else load_model(config.model.name, config.model.task, **kwargs))
        reinit_fresh(loaded.model, loaded.fresh_modules, config.seed)
    model = loaded.model
    saved: tuple[str, ...]
    if config.lora.modules_to_save == "auto":
        saved = tuple(head_modules(model)) if config.model.task == "classification" else ()
    else:
        saved = tuple(config.lora.modules_to_save)
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


def run_trial(config: TrialConfig, report: ReportHook | None = None, progress: Callable[[int, int, float | None], None] | None = None,
              data: PreparedData | None = None, models: BaseModelCache | None = None) -> Trial:
    """Train one trial as configured. ``report(step, metrics)`` is called after every evaluation and
    may raise :class:`StopTrial`; ``progress(step, total, loss)`` is called at every readback.
    ``data`` and ``models`` let a sweep prepare the data and load the base model once."""
    t_start = time.perf_counter()
    seed_everything(config.seed)
    if data is None:
        tokenizer = load_tokenizer(config.model.name, trust_remote_code=config.model.trust_remote_code)
        data = prepare_data(config.data, config.model.task, tokenizer, seed=config.seed)
    seed_everything(config.seed)
    loaded, model = build_model(config, data, models=models)
    device = loaded.device
    tr = config.train
    trainable = [p for p in model.parameters() if p.requires_grad]
    head_names = set(head_modules(model))
    groups = [{"params": [p for n, p in model.named_parameters() if p.requires_grad
                          and not (tr.head_lr and n.split(".")[0] in head_names)], "lr": tr.lr}]
    if tr.head_lr:
        groups.append({"params": [p for n, p in model.named_parameters() if p.requires_grad
                                  and n.split(".")[0] in head_names], "lr": tr.head_lr})
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=tr.weight_decay)
    warmup = int(tr.warmup_ratio * tr.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tr.schedule, warmup, tr.steps))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    objective, direction = objective_of(config.model.task)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    result = TrialResult("COMPLETE", None, objective, direction, {}, {}, 0, 0)
    stream = batches(data.train, tr.batch_size, config.seed)
    pending: list[torch.Tensor] = []
    step_times: list[float] = []
    tokens = 0
    train_s = eval_s = 0.0
    best: float | None = None

    def run_eval(step: int) -> dict[str, float]:
        nonlocal eval_s, best
        t0 = time.perf_counter()
        metrics = evaluate(model, data, "validation", config, loaded.tokenizer, generate=step == tr.steps)
        eval_s += time.perf_counter() - t0
        result.history.append({"step": step, **metrics})
        value = metrics[objective]
        if best is None or (value > best if direction == "maximize" else value < best):
            best = value
            result.best_metrics, result.best_step = dict(metrics), step
        result.final_metrics = metrics
        return metrics

    def readback(step: int) -> float:
        losses = torch.stack(pending).float().cpu().tolist()
        pending.clear()
        first = step - len(losses) + 1
        for i, loss in enumerate(losses):
            if not math.isfinite(loss):
                raise NonFiniteLoss(f"loss became {loss} at step {first + i}")
            result.train_curve.append((first + i, loss))
        return losses[-1]

    t_loop: float | None = None  # start of the training time not yet added to train_s; None while evaluating
    try:
        model.train()
        t_loop = time.perf_counter()
        for step in range(1, tr.steps + 1):
            t0 = time.perf_counter()
            total = None
            for _ in range(tr.grad_accum):
                batch = data.collate(next(stream))
                tokens += int(batch["attention_mask"].sum())
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with amp:
                    loss = model(**batch).loss / tr.grad_accum
                loss.backward()
                total = loss.detach() if total is None else total + loss.detach()
            if tr.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, tr.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            pending.append(total)
            step_times.append(time.perf_counter() - t0)
            result.steps_done = step
            if step % READBACK_EVERY == 0 or step % tr.eval_every == 0 or step == tr.steps:
                last = readback(step)
                if progress:
                    progress(step, tr.steps, last)
            if step % tr.eval_every == 0 or step == tr.steps:
                train_s += time.perf_counter() - t_loop
                t_loop = None
                metrics = run_eval(step)
                model.train()
                if report:
                    report(step, metrics)
                t_loop = time.perf_counter()
    except StopTrial as stop:
        result.state, result.reason = stop.state, stop.reason
    except NonFiniteLoss as exc:
        result.state, result.reason = "FAILED", str(exc)
    finally:
        if t_loop is not None:  # the steps since the last evaluation (all of them when a NaN stops the loop)
            train_s += time.perf_counter() - t_loop
        model.eval()

    result.train_s = train_s
    result.eval_s = eval_s
    result.tokens_per_s = tokens / train_s if train_s > 0 else 0.0
    result.step_time_s = statistics.median(step_times) if step_times else 0.0
    result.peak_memory_bytes, result.memory_kind = peak_memory(device)
    if config.lora.enabled:
        counts = parameter_count(model)
        result.trainable_params, result.lora_params = counts.trainable, counts.lora
        result.trainable_fraction = counts.fraction
        result.adapter_bytes = lora_core.analysis.adapter_nbytes(model)
    else:
        result.trainable_params = sum(p.numel() for p in trainable)
        result.trainable_fraction = result.trainable_params / sum(p.numel() for p in model.parameters())
        result.adapter_bytes = sum(p.numel() * p.element_size() for p in trainable)
    result.wall_s = time.perf_counter() - t_start
    return Trial(config, result, model, loaded, data)
