"""One trial's training state, advanced one step at a time by the loop: its optimizer, schedule, batch
stream and RNG, the losses not yet read back from the device, its step, best metrics, curve, costs
and finally its outcome (COMPLETE / PRUNED / FAILED with a reason).

Nothing here raises to end a trial: a non-finite loss or a stop request becomes the slot's outcome.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import lora_core
from sweeps.config.trial import TrialConfig
from sweeps.data.prepare import PreparedData
from sweeps.training.evaluate import evaluate
from sweeps.training.memory import StepOutOfMemory, loss_count, split_batch, summed_loss
from sweeps.training.result import State, TrialResult

READBACK_EVERY = 10  # steps between reads of the pending losses (a device sync)

ReportHook = Callable[[int, dict[str, float]], str | None]
"""``report(step, metrics)`` after each evaluation: a reason to stop the trial (it is PRUNED), or None."""
ProgressHook = Callable[[int, int, float | None], None]
"""``progress(step, total, loss)`` at each read-back of the losses."""


@dataclass
class RngState:
    """The global torch RNG state (CPU, and the device's for CUDA) that dropout draws from."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None = None

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        return cls(torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)

    def restore(self, device: torch.device) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, device)


@dataclass(kw_only=True)
class TrialBook:
    """What the loop keeps for one trial, however it is stepped: its step, losses not yet read back,
    best metrics, curve, times and outcome. :class:`TrialSlot` steps a trial alone (its own optimizer);
    :class:`sweeps.training.packed.PackMember` steps it inside a pack."""

    config: TrialConfig
    model: nn.Module
    data: PreparedData
    tokenizer: Any
    device: torch.device
    result: TrialResult
    report: ReportHook | None = None
    progress: ProgressHook | None = None
    steps: int = 0
    pending: list[torch.Tensor] = field(default_factory=list)  # losses of steps not yet read back
    best: float | None = None
    tokens: int = 0
    step_times: list[float] = field(default_factory=list)
    train_s: float = 0.0
    eval_s: float = 0.0
    done: bool = False
    micro_batch: int = 0  # rows per forward and backward (sweeps.training.memory); 0: the whole batch

    @property
    def total_steps(self) -> int:
        return self.config.train.steps

    @property
    def outcome(self) -> tuple[State, str | None]:
        return self.result.state, self.result.reason

    def should_eval(self) -> bool:
        return self.steps % self.config.train.eval_every == 0 or self.steps == self.total_steps

    def should_sync(self) -> bool:
        return self.steps % READBACK_EVERY == 0 or self.should_eval()

    def sync(self) -> float | None:
        """Read the pending losses back into the curve; the last one, or None when one is not finite
        (the slot is then FAILED, its curve ending before that step)."""
        losses = torch.stack(self.pending).float().cpu().tolist()
        self.pending.clear()
        first = self.steps - len(losses) + 1
        for i, loss in enumerate(losses):
            if not math.isfinite(loss):
                self.finish("FAILED", f"loss became {loss} at step {first + i}")
                return None
            self.result.train_curve.append((first + i, loss))
        return float(losses[-1])

    def evaluate(self) -> dict[str, float]:
        """Validation metrics now (with generation at the last step), recorded; the model is left training."""
        t0 = time.perf_counter()
        metrics = evaluate(self.model, self.data, "validation", self.config, self.tokenizer,
                           generate=self.steps == self.total_steps)
        self.eval_s += time.perf_counter() - t0
        self.model.train()
        self.record_eval(metrics)
        return metrics

    def record_eval(self, metrics: dict[str, float]) -> None:
        """Add an evaluation at the current step to the history; keep it as best if it beats the best."""
        r = self.result
        r.history.append({"step": self.steps, **metrics})
        value = metrics[r.objective]
        if self.best is None or (value > self.best if r.direction == "maximize" else value < self.best):
            self.best = value
            r.best_metrics, r.best_step = dict(metrics), self.steps
        r.final_metrics = metrics

    def finish(self, state: State = "COMPLETE", reason: str | None = None) -> None:
        """End the trial with this outcome: the loop takes no more steps for it."""
        self.done = True
        self.result.state, self.result.reason = state, reason

    def close(self) -> None:
        """Write the time spent (training and evaluating) and throughput into the result."""
        r = self.result
        r.train_s, r.eval_s = self.train_s, self.eval_s
        r.tokens_per_s = self.tokens / self.train_s if self.train_s > 0 else 0.0
        r.step_time_s = statistics.median(self.step_times) if self.step_times else 0.0


@dataclass(kw_only=True)
class TrialSlot(TrialBook):
    """One trial trained on its own: ``adapter`` is its LoRA adapter on ``model`` (None when only the
    head trains); ``params`` the parameters it updates (and clips), ``stream`` its own batch order."""

    adapter: str | None
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    stream: Iterator[list[dict[str, Any]]]
    rng: RngState | None = None  # its global RNG state while another slot's step runs

    def step(self) -> None:
        """One optimizer step (``grad_accum`` batches, each in micro-batches of ``micro_batch`` rows).
        The loss stays on the device, in ``pending``. Out of device memory: :class:`StepOutOfMemory`."""
        tr = self.config.train
        t0 = time.perf_counter()
        total: torch.Tensor | None = None
        try:
            for _ in range(tr.grad_accum):
                rows = next(self.stream)
                parts = split_batch(rows, self.micro_batch or len(rows))
                count = loss_count(rows, self.data.task) if len(parts) > 1 else 0
                for part in parts:
                    loss = self._forward_backward(part, count)
                    total = loss if total is None else total + loss
            if tr.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.params, tr.max_grad_norm)
            self.optimizer.step()  # (AdamW allocates its state at the first step)
        except torch.OutOfMemoryError:
            raise StepOutOfMemory(self.steps, self.micro_batch or tr.batch_size) from None
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        assert total is not None  # grad_accum >= 1
        self.pending.append(total)
        self.step_times.append(time.perf_counter() - t0)
        self.steps += 1
        self.result.steps_done = self.steps

    def _forward_backward(self, rows: list[dict[str, Any]], count: int) -> torch.Tensor:
        """Forward and backward over ``rows``: the model's mean loss (a whole batch, ``count`` 0) or, for
        a part of a batch, its summed loss over the batch's ``count``; scaled for accumulation, detached."""
        accum = self.config.train.grad_accum
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        batch = self.data.collate(rows)
        self.tokens += int(batch["attention_mask"].sum())
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with amp:
            if count:
                labels = batch.pop("labels")
                loss = summed_loss(self.model(**batch).logits, labels, self.data.task) / count / accum
            else:
                loss = self.model(**batch).loss / accum
        loss.backward()
        return loss.detach()

    @contextmanager
    def turn(self, switching: bool) -> Iterator[None]:
        """This slot's turn in a loop over several: its RNG state and adapter in, its RNG state saved
        afterwards. With one slot (``switching`` false) nothing changes hands."""
        if not switching:
            yield
            return
        if self.rng is not None:
            self.rng.restore(self.device)
        if self.adapter is not None:
            lora_core.set_active_adapter(self.model, self.adapter)
        try:
            yield
        finally:
            self.rng = RngState.capture(self.device)
