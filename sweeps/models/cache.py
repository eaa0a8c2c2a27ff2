"""One base model per worker: deep copies per trial, the randomly initialised head re-made from the trial seed."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sweeps.models.load import LoadedModel, Quantize, Task, load_model


def reinit_fresh(model: nn.Module, names: tuple[str, ...] | list[str], seed: int) -> None:
    """Initialise the modules ``names`` again, with the model's own initialiser, from ``seed``.

    With the same seed this gives the weights from_pretrained gives them (checked by a test for the
    built-in models), whether ``model`` was just loaded or copied from a `BaseModelCache`.
    """
    torch.manual_seed(seed)
    for name in names:
        module = model.get_submodule(name)
        for sub in module.modules():  # transformers skips modules flagged as initialised
            if getattr(sub, "_is_hf_initialized", False):
                setattr(sub, "_is_hf_initialized", False)  # noqa: B010 (a transformers flag, not declared)
            for p in sub.parameters(recurse=False):
                if getattr(p, "_is_hf_initialized", False):
                    setattr(p, "_is_hf_initialized", False)  # noqa: B010
        init: Callable[[nn.Module], None] = getattr(model, "_init_weights")  # noqa: B009 (a PreTrainedModel method)
        with torch.no_grad():
            for sub in module.modules():
                init(sub)


class BaseModelCache:
    """Keeps one loaded base model per (model, task, labels, dtype, device) in a worker process and
    hands out deep copies, so a sweep loads its base model once instead of once per trial."""

    def __init__(self) -> None:
        self._models: dict[tuple[Any, ...], LoadedModel] = {}

    def get(self, name_or_path: str, task: Task, num_labels: int | None = None, dtype: str = "auto",
            device: str = "auto", trust_remote_code: bool = False, quantize: Quantize = "none") -> LoadedModel:
        key = (os.fspath(name_or_path), task, num_labels, str(dtype), str(device), trust_remote_code, quantize)
        pristine = self._models.get(key)
        if pristine is None:
            pristine = load_model(name_or_path, task, num_labels=num_labels, dtype=dtype, device=device,  # type: ignore[arg-type]
                                  trust_remote_code=trust_remote_code, quantize=quantize)
            self._models[key] = pristine
        return dataclasses.replace(pristine, model=copy.deepcopy(pristine.model))

    def clear(self) -> None:
        self._models.clear()
