"""Quantized base layers under LoRA: bitsandbytes' 4-bit (``Linear4bit``, NF4/FP4) and 8-bit (``Linear8bitLt``,
LLM.int8) linear layers, as transformers' ``BitsAndBytesConfig`` builds them (QLoRA).

Both are ``nn.Linear`` subclasses, so :func:`lora_core.inject` and :class:`lora_core.packed.Pack` wrap them
as they wrap ``nn.Linear``: the base forward is the quantized layer's own (it computes in its compute dtype
and returns the input's dtype), and the LoRA branch adds ``scaling * B @ A @ x`` in the LoRA weights'
dtype (the autocast dtype under autocast), as for a plain layer. Their shapes come from ``in_features``
and ``out_features``: a 4-bit weight is stored packed, two values a byte, as ``(out * in / 2, 1)``.

A quantized weight cannot take ``W0 + dW`` in place (the sum is not on the quantization grid):
:func:`lora_core.merge` refuses such a layer with a ``LoraError``. :func:`lora_core.dequantize.dequantize`
instead swaps every quantized layer for a plain ``nn.Linear`` holding the dequantized weight in a 16-bit
dtype, adapters kept, which then merges as usual.

bitsandbytes is optional: nothing here imports it. A model can only hold its layers once something
imported it, so it is looked up in ``sys.modules``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any, Literal, cast

import torch
from torch import nn

from lora_core.errors import LoraError

__all__ = ["QuantKind", "dequantized_weight", "is_quantized", "keep_training_layout", "quant_kind",
           "quantized_layers"]

QuantKind = Literal["4bit", "8bit"]


def _bnb() -> ModuleType | None:
    """bitsandbytes if something imported it already (no layer of it can exist otherwise), else None."""
    return sys.modules.get("bitsandbytes")


def quant_kind(module: nn.Module) -> QuantKind | None:
    """``"4bit"`` for a bitsandbytes ``Linear4bit``, ``"8bit"`` for a ``Linear8bitLt``, None for anything else."""
    bnb = _bnb()
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "8bit"
    return None


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized linear layer (a LoRA layer on one included)."""
    return quant_kind(module) is not None


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path, module)`` of every quantized linear layer of ``model``, in model order."""
    for path, module in model.named_modules():
        if is_quantized(module):
            yield path, module


def keep_training_layout(model: nn.Module) -> int:
    """Keep every 4-bit layer of ``model`` in the layout it trains in; returns how many it touched.

    On a CPU with AVX512-BF16, bitsandbytes (0.49 to at least 0.50) repacks a ``Linear4bit``'s weight
    for a faster inference kernel at its first forward in eval mode without gradients, and keeps it
    so. That kernel has no backward: a model trained after an evaluation would get no gradient through
    the layer to anything before it (PyTorch only warns), and it rounds differently from the training
    kernel. Turning the repacking off keeps training correct and evaluation equal to what a trial
    measured; a layer already repacked is converted back (bitsandbytes' own inverse).
    """
    bnb = _bnb()
    if bnb is None:
        return 0
    touched = 0
    for _, module in quantized_layers(model):
        if quant_kind(module) != "4bit":
            continue
        layer: Any = module
        layer.support_avx512bf16_for_cpu = False
        weight: Any = layer.weight
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            inverse = bnb.functional._convert_weight_packed_for_cpu_inverse
            weight.data, weight.quant_state = inverse(weight.data, state)
        touched += 1
    return touched


def dequantized_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The ``(out, in)`` weight a quantized layer computes with, dequantized with bitsandbytes' functions.

    4-bit: ``bitsandbytes.functional.dequantize_4bit`` with the layer's quant state (the values its
    forward multiplies by). 8-bit: the int8 rows times their scale, ``CB * SCB / 127``. ``dtype``
    defaults to float32.
    """
    kind = quant_kind(module)
    if kind is None:
        raise LoraError(f"{type(module).__name__} is not a quantized linear layer")
    bnb = cast(ModuleType, _bnb())
    layer: Any = module
    out_dtype = dtype or torch.float32
    with torch.no_grad():
        if kind == "4bit":
            keep_training_layout(module)  # the canonical layout dequantize_4bit reads
            weight = layer.weight
            w = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        else:
            state = layer.state
            cb = state.CB if state.CB is not None else layer.weight.data
            scb = state.SCB if state.SCB is not None else getattr(layer.weight, "SCB", None)
            if scb is None:
                raise LoraError(f"{type(module).__name__} has no int8 scales (SCB)",
                                hint="the layer was not quantized (move the model to its device first)")
            w = cb.to(torch.float32) * (scb.to(torch.float32).view(-1, 1) / 127.0)
    result = cast(torch.Tensor, w).to(out_dtype)
    shape = (int(layer.out_features), int(layer.in_features))
    if tuple(result.shape) != shape:
        result = result.reshape(shape)
    return result
