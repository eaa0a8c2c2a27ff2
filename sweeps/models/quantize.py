"""A frozen base quantized with bitsandbytes (``model.quantize: 4bit | 8bit``): the checks that it can run here,
transformers' ``BitsAndBytesConfig`` for it, and what the loaded model needs before LoRA goes on.

- ``4bit``: QLoRA's NF4 with double quantization (the quantization constants quantized too), computing in
  bfloat16 (float16 on a GPU without bf16; an explicit ``model.dtype`` of float32/bfloat16/float16 picks it).
- ``8bit``: LLM.int8 (int8 rows with one scale each, outlier columns in float16).

transformers quantizes every ``nn.Linear`` but its default skips (the output embeddings, the module of the
last parameter): a BERT ``classifier`` (its last parameter is ``classifier.bias``) would be quantized. So the
task heads, every top-level module outside the backbone (``lm_head``, ``classifier``, ``score``,
``pre_classifier``: found on a meta-device build), are named as ``llm_int8_skip_modules`` and stay in
``model.dtype``, trainable as ``modules_to_save``.
bitsandbytes runs on CUDA and on the CPU (there in torch code when its optional ``kernels`` package is absent).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import warnings
from typing import Any, Literal

import torch
from torch import nn

from lora_core import LoraError
from lora_core.quantized import keep_training_layout
from sweeps.models.heads import head_modules
from sweeps.text import first_line

__all__ = ["INSTALL_HINT", "Quantize", "after_load", "compute_dtype", "dequantize_model", "merged_dtype",
           "quantization_kwargs", "require_bitsandbytes", "unquantized_heads"]

Quantize = Literal["none", "4bit", "8bit"]
INSTALL_HINT = "pip install 'lora-sweep[quantize]'"
_INT8_CAST = "MatMul8bitLt: inputs will be cast"


class _DropInt8Cast(logging.Filter):
    """bitsandbytes logs, at every 8-bit matmul, that inputs not in float16 are cast to float16 (LLM.int8
    always quantizes from float16): once per layer per step, nothing to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_INT8_CAST)


_INT8_FILTER = _DropInt8Cast()


def require_bitsandbytes(quantize: str, device: torch.device) -> None:
    """Raise `LoraError` (one line and a hint) unless bitsandbytes (and accelerate) are installed, bitsandbytes
    imports, and it has a backend for ``device``."""
    for package in ("bitsandbytes", "accelerate"):  # transformers' quantizer needs both
        if importlib.util.find_spec(package) is None:
            raise LoraError(f"model.quantize: {quantize} needs {package}, which is not installed", hint=INSTALL_HINT)
    try:
        import bitsandbytes
    except Exception as exc:  # a broken install or a missing native library: bitsandbytes raises many types
        raise LoraError(f"model.quantize: {quantize}: bitsandbytes does not import: {first_line(exc)}",
                        hint=f"reinstall it ({INSTALL_HINT}), or use model.quantize: none") from None
    supported = getattr(bitsandbytes, "supported_torch_devices", None)
    if supported is not None and device.type not in supported:
        raise LoraError(f"model.quantize: {quantize}: bitsandbytes {bitsandbytes.__version__} has no backend for "
                        f"the {device.type} device", hint=f"use model.quantize: none, or one of: {', '.join(sorted(supported))}")


def compute_dtype(setting: str | torch.dtype, resolved: torch.dtype, device: torch.device, bf16_ok: bool) -> torch.dtype:
    """The dtype 4-bit layers compute in: ``resolved`` when ``model.dtype`` names one, else bfloat16 (float16 on
    a CUDA device without bf16)."""
    if isinstance(setting, torch.dtype) or setting != "auto":
        return resolved
    return torch.float16 if device.type == "cuda" and not bf16_ok else torch.bfloat16


def unquantized_heads(auto_cls: Any, config: Any, trust_remote_code: bool = False) -> list[str]:
    """The top-level modules outside the backbone of the model ``auto_cls`` builds from ``config`` (its task
    head: ``lm_head``, ``classifier``, ``score``...), from a build on the meta device (no weights)."""
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = auto_cls.from_config(copy.deepcopy(config), trust_remote_code=trust_remote_code)
    return head_modules(model)


def quantization_kwargs(quantize: Quantize, compute: torch.dtype, device: torch.device,
                        skip: list[str]) -> dict[str, Any]:
    """``from_pretrained`` keywords for ``quantize``: a ``BitsAndBytesConfig`` leaving the modules ``skip``
    unquantized, and the whole model on ``device``."""
    from transformers import BitsAndBytesConfig

    skipped = {"llm_int8_skip_modules": list(skip)} if skip else {}
    if quantize == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=compute, **skipped)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, **skipped)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return {"quantization_config": config, "device_map": {"": str(device)}}


def after_load(model: nn.Module, quantize: Quantize) -> None:
    """Ready a freshly loaded quantized model: 4-bit layers keep their training layout
    (:func:`lora_core.quantized.keep_training_layout`), and bitsandbytes' per-matmul float16 notice is dropped."""
    keep_training_layout(model)
    if quantize == "8bit":
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_INT8_FILTER)  # idempotent


def merged_dtype(dtype: torch.dtype) -> torch.dtype:
    """The 16-bit dtype a quantized base is dequantized to for a merge: ``dtype`` (the loaded model's
    other modules) when it is 16-bit, else bfloat16."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Turn a quantized transformers model into a plain one, in place, for a merge: every bitsandbytes layer
    becomes an ``nn.Linear`` with the dequantized weight in ``dtype`` (bitsandbytes' own dequantization; the
    LoRA adapters stay on it, `lora_core.dequantize.dequantize`), and the model forgets its quantization
    config, so ``save_pretrained`` writes a plain checkpoint. The other modules keep their dtype until the
    caller casts the model (after merging, so that ``W0 + dW`` is computed from float32 LoRA weights).
    Returns the paths dequantized."""
    from lora_core.dequantize import dequantize

    swapped = dequantize(model, dtype)
    pretrained: Any = model
    quantizer = getattr(pretrained, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(pretrained)
    config = getattr(pretrained, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "quantization_method"):
        if flag in pretrained.__dict__:
            delattr(pretrained, flag)
    pretrained.is_quantized = False
    return swapped
