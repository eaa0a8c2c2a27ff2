"""A trial's optimizer and learning-rate schedule: AdamW over its trainable parameters (the task head
at its own lr when ``train.head_lr`` is set), warm-up then linear, cosine or constant."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import nn

from sweeps.config.trial import TrainConfig


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """The lr multiplier at each step: linear warm-up over ``warmup`` steps, then the schedule."""
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


def param_groups(model: nn.Module, train: TrainConfig, head_names: Collection[str]) -> list[dict[str, Any]]:
    """The trainable parameters in optimizer groups: all at ``train.lr``, or, with ``train.head_lr``,
    the top-level modules in ``head_names`` in a second group at that lr. Empty groups are left out."""
    def in_head(name: str) -> bool:
        return bool(train.head_lr) and name.split(".")[0] in head_names

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": [p for n, p in named if not in_head(n)], "lr": train.lr}]
    if train.head_lr:
        groups.append({"params": [p for n, p in named if in_head(n)], "lr": train.head_lr})
    return [g for g in groups if g["params"]]


def optimizer_and_schedule(groups: list[dict[str, Any]],
                           train: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``groups`` and its per-step schedule (warm-up over ``warmup_ratio`` of the steps)."""
    opt = torch.optim.AdamW(groups, weight_decay=train.weight_decay)
    warmup = int(train.warmup_ratio * train.steps)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train.schedule, warmup, train.steps))
