"""Dequantizing a model for a merge: every bitsandbytes layer becomes an ``nn.Linear`` with the weight it
computes with (:func:`lora_core.quantized.dequantized_weight`), LoRA adapters kept; :func:`lora_core.merge`
then folds ``W0 + dW`` into that 16-bit (or float32) copy."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lora_core.layer import LoraLayerMixin, as_lora_layer
from lora_core.quantized import dequantized_weight, quantized_layers

__all__ = ["dequantize"]


def dequantize(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Swap every quantized linear layer of ``model`` for an ``nn.Linear`` holding its dequantized weight in
    ``dtype`` (the bias too), in place; LoRA adapters (and a pack's branch) move onto the new layer.
    Returns the paths swapped. The rest of the model is left as it is (cast it to ``dtype`` if wanted)."""
    swapped: list[str] = []
    for path, module in list(quantized_layers(model)):
        layer: Any = module
        bias = layer.bias
        plain = nn.Linear(int(layer.in_features), int(layer.out_features), bias=bias is not None,
                          device=bias.device if bias is not None else layer.weight.device, dtype=dtype)
        with torch.no_grad():
            plain.weight.copy_(dequantized_weight(module, dtype))
            if bias is not None:
                plain.bias.copy_(bias.to(dtype))
        plain.weight.requires_grad_(False)
        if plain.bias is not None:
            plain.bias.requires_grad_(bias.requires_grad)
        plain.train(module.training)
        if isinstance(module, LoraLayerMixin):
            new = as_lora_layer(plain)
            new.lora = module.lora
            new.lora_active, new.lora_enabled, new.lora_merged = module.lora_active, module.lora_enabled, []
            for name, sub in module._modules.items():
                if name != "lora" and sub is not None:
                    new.add_module(name, sub)
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, leaf, plain)
        swapped.append(path)
    return swapped
