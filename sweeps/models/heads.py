"""Which modules of a model train in full beside LoRA: the one ``modules_to_save: auto`` rule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import nn


def head_modules(model: nn.Module) -> list[str]:
    """Top-level modules with parameters outside the backbone: the task head (classifier, score)."""
    prefix = getattr(model, "base_model_prefix", "")
    return [n for n, m in model.named_children() if n != prefix and any(True for _ in m.parameters())]


def saved_modules(model: nn.Module, task: str, modules_to_save: Literal["auto"] | Sequence[str]) -> tuple[str, ...]:
    """The modules a trial trains and saves in full: ``auto`` is the task head of a classification model
    (its random head must train) and nothing for a causal LM (its head is pretrained); a list is taken
    as written."""
    if modules_to_save == "auto":
        return tuple(head_modules(model)) if task == "classification" else ()
    return tuple(modules_to_save)
