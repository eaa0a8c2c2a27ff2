"""Fitting a trial into device memory: gradient checkpointing, and micro-batches halved after an
out-of-memory error.

Gradient checkpointing is transformers' own (``activation_checkpointing_enable``, formerly
``gradient_checkpointing_enable``), non-reentrant: each decoder/encoder layer keeps only its input in the
forward and runs again in the backward. torch's checkpoint restores the global RNG state for the
recompute (``preserve_rng_state``), so dropout drawn from it (the base model's, LoRA's in an ordinary
adapter) draws the same masks; a pack's dropout is keyed by its batch layout, which
:meth:`lora_core.packed.Pack.recompute_context` puts back for the recompute.

Micro-batches: ``train.batch_size`` stays the batch a step's loss is the mean over. With a micro-batch
of ``m`` rows, each batch is cut, in order, into parts of at most ``m`` rows (one forward and backward
each). A part's loss is its *summed* loss divided by the whole batch's count (its rows for
classification, its supervised tokens for a causal LM), so the parts' losses and gradients add up to the
batch's mean: the same rows, the same order, the same loss up to float rounding. (Averaging the parts'
own means would weight a causal LM's tokens unequally.)

An out-of-memory error in a training step (:class:`StepOutOfMemory`) before the trial's first evaluation
makes :func:`sweeps.training.trainer.run_trial` start the trial again from step 0 with half the
micro-batch (:func:`next_micro_batch`), down to one row; nothing has been reported to a sweep by then.
"""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from lora_core import LoraError
from sweeps.config.trial import TrainConfig, TrialConfig

__all__ = ["StepOutOfMemory", "first_micro_batch", "is_checkpointing", "loss_count", "next_micro_batch",
           "release_memory", "set_checkpointing", "split_batch", "summed_loss"]

T = TypeVar("T")
ContextFn = Callable[[], tuple[AbstractContextManager[Any], AbstractContextManager[Any]]]


class StepOutOfMemory(torch.OutOfMemoryError):
    """A training step ran out of device memory: after ``steps_done`` steps, at micro-batch ``micro``.
    Raised from the loops in place of torch's error (``from None``), so that nothing of the failed step's
    tensors is held once it is handled."""

    def __init__(self, steps_done: int, micro: int) -> None:
        super().__init__(f"out of device memory in training step {steps_done + 1} at micro-batch {micro}")
        self.steps_done, self.micro = steps_done, micro


def set_checkpointing(model: nn.Module, enabled: bool, context_fn: ContextFn | None = None) -> None:
    """Turn gradient checkpointing on ``model`` on (non-reentrant; ``context_fn`` as in
    ``torch.utils.checkpoint``) or off. Raises LoraError when the model does not support it."""
    if not enabled:
        if is_checkpointing(model):
            disable = getattr(model, "activation_checkpointing_disable", None) or \
                getattr(model, "gradient_checkpointing_disable")  # noqa: B009 (an nn.Module attribute: Any)
            disable()
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise LoraError(f"{type(model).__name__} does not support gradient checkpointing",
                        hint="set train.gradient_checkpointing: false (a smaller train.micro_batch_size "
                             "or data.max_length also saves memory)")
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if context_fn is not None:
        kwargs["context_fn"] = context_fn
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        getattr(model, "gradient_checkpointing_enable")(gradient_checkpointing_kwargs=kwargs)  # noqa: B009
    # transformers also makes the embeddings' output require grad (for reentrant checkpointing and
    # PEFT); non-reentrant checkpointing does not need it, and it would run a head-only trial's
    # backward through the whole frozen model.
    if getattr(model, "_require_grads_hook", None) is not None:
        getattr(model, "disable_input_require_grads")()  # noqa: B009


def is_checkpointing(model: nn.Module) -> bool:
    """Whether gradient checkpointing is on (transformers 5 renamed the property; the old name warns)."""
    on = getattr(model, "is_activation_checkpointing", None)
    return bool(on if on is not None else getattr(model, "is_gradient_checkpointing", False))


def first_micro_batch(train: TrainConfig) -> int:
    """The micro-batch a trial starts with: ``train.micro_batch_size``, else (or when larger) the batch."""
    return min(train.micro_batch_size or train.batch_size, train.batch_size)


def split_batch(rows: Sequence[T], micro: int) -> list[list[T]]:
    """``rows`` cut, in order, into parts of at most ``micro`` rows (the last one may be smaller)."""
    return [list(rows[i:i + micro]) for i in range(0, len(rows), micro)]


def loss_count(rows: Sequence[dict[str, Any]], task: str) -> int:
    """What a batch's mean loss divides by: its rows (classification), or its supervised tokens, the
    labels after the first position that are not -100 (causal LM: position t predicts label t + 1)."""
    if task == "classification":
        return len(rows)
    return sum(sum(1 for label in row["labels"][1:] if label != -100) for row in rows)


def summed_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """The cross-entropy summed over a part's rows (classification) or supervised next tokens (causal
    LM), in float32: the numerator of the batch's mean that :func:`loss_count` is the denominator of."""
    if task == "classification":
        return F.cross_entropy(logits.float(), labels, reduction="sum")
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def next_micro_batch(oom: StepOutOfMemory, config: TrialConfig) -> int:
    """The micro-batch to start the trial again with after ``oom``: half of it, when the trial has not
    been evaluated yet and the micro-batch is above one row. Otherwise a LoraError that says why."""
    tr = config.train
    if oom.steps_done >= min(tr.eval_every, tr.steps):
        raise LoraError(f"out of device memory in training step {oom.steps_done + 1} at micro-batch {oom.micro}, "
                        "after the trial's first evaluation (only an earlier one restarts it)",
                        hint=f"set train.micro_batch_size: {max(1, oom.micro // 2)}, or "
                             "train.gradient_checkpointing: true")
    if oom.micro <= 1:
        raise LoraError(f"out of device memory at micro-batch 1: one row of train.batch_size {tr.batch_size} "
                        f"(up to data.max_length {config.data.max_length} tokens) does not fit",
                        hint="set train.gradient_checkpointing: true, lower data.max_length, or use a smaller model")
    micro = oom.micro // 2
    print(f"out of device memory in training step {oom.steps_done + 1} at micro-batch {oom.micro}: "
          f"starting the trial again from step 0 with micro-batch {micro} "
          f"({-(-tr.batch_size // micro)} per batch of {tr.batch_size})", file=sys.stderr, flush=True)
    return micro


def release_memory() -> None:
    """Free what a failed attempt left: unreachable tensors, and CUDA's cached blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_libc: Any = None


def trim_host_memory() -> None:
    """Give the heap memory freed by earlier trials back to the kernel (glibc ``malloc_trim``; elsewhere
    nothing). torch's CPU tensors come from malloc, and a trial's activations of many sizes leave the
    heap fragmented: without this, a sweep process on a CPU kept about 340 MiB more resident between
    trials of the built-in demo (1,073 against 730 MiB), and each trial's peak grew with the ones
    before it."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)
