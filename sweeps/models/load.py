"""Load a base model and its tokenizer for a sweep: built-in alias, local directory or hub id.

    >>> loaded = load_model("minilm-l6", "classification", num_labels=3)
    >>> loaded.model, loaded.tokenizer, loaded.path, loaded.dtype, loaded.device
    >>> model, tokenizer = load_model("smollm2-135m", "causal-lm")   # also unpacks as a pair

Resolution of ``name_or_path``, in this order:

1. a built-in alias (`builtin_aliases()`): the converted directory in the cache, fetched on first use
   (see `sweeps.models.builtin`); ``./minilm-l6`` names a local directory instead;
2. an existing local directory: used as is; it must contain ``config.json``;
3. anything else: a Hugging Face Hub id, loaded by transformers (network or its local hub cache).

Built-in and local models are loaded with ``local_files_only=True``: no network is attempted. A name
that cannot be resolved is an error (`lora_core.LoraError`); there is never a fallback to another
model. Weights are read from safetensors only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import nn

from lora_core import LoraError
from sweeps.models.builtin import BUILTIN_MODELS, builtin_aliases
from sweeps.models.compat import dtype_kwarg
from sweeps.models.quantize import (
    Quantize,
    after_load,
    compute_dtype,
    quantization_kwargs,
    require_bitsandbytes,
    unquantized_heads,
)
from sweeps.models.resolve import (
    DTypeName,
    alias_list,
    cuda_supports_bf16,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)
from sweeps.text import first_line

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DTypeName",
    "LoadedModel",
    "Quantize",
    "Task",
    "builtin_aliases",
    "load_config",
    "load_model",
    "load_tokenizer",
    "model_class",
    "resolve_device",
    "resolve_dtype",
    "resolve_model_path",
]

logger = logging.getLogger(__name__)

Task = Literal["classification", "causal-lm"]

@dataclass(frozen=True)
class LoadedModel:
    """A loaded base model with what it was resolved from.

    Unpacks as ``model, tokenizer = load_model(...)``.

    Attributes:
        model: The transformers model, on ``device`` in ``dtype``, in eval mode.
        tokenizer: Its tokenizer; always has a pad token.
        source: The ``name_or_path`` the caller passed.
        path: The local directory loaded from, or the hub id.
        alias: The built-in alias, or None.
        task: ``"classification"`` or ``"causal-lm"``.
        dtype: The parameters' dtype.
        device: The parameters' device.
        fresh_modules: Modules whose weights were missing from the checkpoint (or of another
            shape) and were initialised at random, e.g. ``("classifier",)``. A trial re-initialises
            them from its own seed (`reinit_fresh`), so a model copied from a cache trains exactly
            like one loaded for the trial.
        quantize: ``"none"``, or ``"4bit"`` / ``"8bit"``: the linear layers (not the heads) are
            bitsandbytes layers (`sweeps.models.quantize`); ``dtype`` is then the other modules' dtype.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    path: Path | str
    alias: str | None
    task: Task
    dtype: torch.dtype
    device: torch.device
    fresh_modules: tuple[str, ...] = ()
    quantize: Quantize = "none"

    def __iter__(self) -> Iterator[Any]:
        yield self.model
        yield self.tokenizer


def load_model(
    name_or_path: str | os.PathLike[str],
    task: Task,
    num_labels: int | None = None,
    dtype: DTypeName | torch.dtype = "auto",
    device: str | torch.device = "auto",
    trust_remote_code: bool = False,
    quantize: Quantize = "none",
) -> LoadedModel:
    """Load a model and tokenizer for ``task``.

    Args:
        name_or_path: A built-in alias, a local model directory or a Hugging Face Hub id (see the
            module docstring for the order).
        task: ``"classification"`` (AutoModelForSequenceClassification with a freshly initialised
            head of ``num_labels`` outputs) or ``"causal-lm"`` (AutoModelForCausalLM).
        num_labels: Number of classes; required for classification, not allowed for causal-lm.
        dtype: ``"auto"`` (bfloat16 on bf16-capable CUDA, else float32), ``"float32"``,
            ``"bfloat16"`` or ``"float16"``.
        device: ``"auto"`` (cuda if available, else cpu), or a device such as ``"cpu"``, ``"cuda:1"``.
        trust_remote_code: Passed to transformers; off unless the user asks.
        quantize: ``"4bit"`` (NF4, double quantization, bf16 compute) or ``"8bit"`` (LLM.int8): the frozen
            linear layers are quantized by transformers' ``BitsAndBytesConfig`` while loading (the heads
            are not); needs bitsandbytes (`sweeps.models.quantize`).

    Returns:
        A `LoadedModel`. The tokenizer always has a pad token: one without gets ``pad = eos``, and
        ``model.config.pad_token_id`` is set to the tokenizer's pad id (sequence classification on
        decoder models finds the last real token with it).

    Raises:
        LoraError: a bad argument, a path or hub id that cannot be resolved or reached, a model type
            without a head for ``task``, a failed built-in fetch, or a quantized load without bitsandbytes
            or its backend for the device.
    """
    source = os.fspath(name_or_path)
    if task not in get_args(Task):
        raise LoraError(f"unknown task {task!r}", hint=f"use one of: {', '.join(get_args(Task))}")
    if task == "classification":
        if (
            num_labels is None
            or isinstance(num_labels, bool)
            or not isinstance(num_labels, int)
            or num_labels < 1
        ):
            raise LoraError(
                f"classification needs num_labels >= 1, got {num_labels!r}",
                hint="set num_labels to the number of classes in the dataset",
            )
    elif num_labels is not None:
        raise LoraError(
            "num_labels only applies to task 'classification'", hint="drop num_labels for causal-lm"
        )
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    if quantize not in get_args(Quantize):
        raise LoraError(f"unknown quantize {quantize!r}", hint=f"use one of: {', '.join(get_args(Quantize))}")
    if quantize != "none":
        require_bitsandbytes(quantize, resolved_device)

    alias = source if source in BUILTIN_MODELS else None
    path = resolve_model_path(source)
    local = isinstance(path, Path)
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if local:
        common["local_files_only"] = True

    from transformers import AutoConfig, AutoTokenizer

    config_kwargs: dict[str, Any] = {"num_labels": num_labels} if task == "classification" else {}
    config = _from_pretrained(AutoConfig, path, source, local, **common, **config_kwargs)
    auto_cls = model_class(config, task, source, trust_remote_code)
    tokenizer = _from_pretrained(AutoTokenizer, path, source, local, **common)
    quant_kwargs: dict[str, Any] = {}
    if quantize != "none":  # the task heads stay unquantized (sweeps.models.quantize)
        compute = compute_dtype(dtype, resolved_dtype, resolved_device, cuda_supports_bf16(resolved_device))
        heads = unquantized_heads(auto_cls, config, trust_remote_code)
        quant_kwargs = quantization_kwargs(quantize, compute, resolved_device, heads)
    try:
        model, info = _from_pretrained(
            auto_cls,
            path,
            source,
            local,
            config=config,
            use_safetensors=True,
            output_loading_info=True,
            # A checkpoint fine-tuned with another number of labels gets a fresh head of the right size.
            **({"ignore_mismatched_sizes": True} if task == "classification" else {}),
            **common,
            **dtype_kwarg(resolved_dtype),
            **quant_kwargs,
        )
    except (RuntimeError, ImportError, ValueError, NotImplementedError) as exc:
        if quantize == "none" or isinstance(exc, LoraError):
            raise
        raise LoraError(f"could not load {source!r} quantized to {quantize} on {resolved_device}: {first_line(exc)}",
                        hint="bitsandbytes cannot run this model here; use model.quantize: none") from exc
    _ensure_pad_token(model, tokenizer, source)
    if quantize == "none":
        model.to(resolved_device)  # dtype was applied by from_pretrained (keeping any fp32-pinned modules)
    else:
        after_load(model, quantize)  # placed by device_map; quantized weights are not moved with .to
    model.eval()
    logger.info(
        "loaded %s (%s) for %s on %s in %s%s",
        source,
        type(model).__name__,
        task,
        resolved_device,
        resolved_dtype,
        "" if quantize == "none" else f", linear layers in {quantize}",
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=source,
        path=path,
        alias=alias,
        task=task,
        dtype=resolved_dtype,
        device=resolved_device,
        fresh_modules=_fresh_modules(model, info),
        quantize=quantize,
    )


def load_config(name_or_path: str | os.PathLike[str], trust_remote_code: bool = False) -> Any:
    """The model's transformers config alone (same resolution and errors as `load_model`; no weights read)."""
    source = os.fspath(name_or_path)
    path = resolve_model_path(source)
    local = isinstance(path, Path)
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, path, source, local, trust_remote_code=trust_remote_code,
                            **({"local_files_only": True} if local else {}))


def model_class(config: Any, task: Task, source: str, trust_remote_code: bool = False) -> Any:
    """The Auto class `load_model` builds ``config`` with for ``task``: AutoModelForSequenceClassification
    or AutoModelForCausalLM. Raises `LoraError` when transformers has no such head for the model type."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto_cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    _check_has_head(auto_cls, config, source, task, trust_remote_code)
    return auto_cls


def _fresh_modules(model: nn.Module, info: dict[str, Any]) -> tuple[str, ...]:
    """The modules owning the parameters from_pretrained initialised at random (missing or mismatched)."""
    keys = set(info.get("missing_keys") or ()) | {k[0] if isinstance(k, tuple) else k
                                                   for k in info.get("mismatched_keys") or ()}
    names = {n for n, _ in model.named_modules()}
    fresh = set()
    for key in keys:
        owner = key.rsplit(".", 1)[0] if "." in key else ""
        if owner in names:
            fresh.add(owner)
    return tuple(sorted(fresh))


def load_tokenizer(name_or_path: str | os.PathLike[str], trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer alone (same resolution as `load_model`), with a pad token guaranteed."""
    source = os.fspath(name_or_path)
    path = resolve_model_path(source)
    local = isinstance(path, Path)
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if local:
        common["local_files_only"] = True
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, path, source, local, **common)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LoraError(f"the tokenizer of {source!r} has neither a pad nor an eos token",
                            hint="use a model whose tokenizer defines a pad or eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ----------------------------------------------------------------------------------------------
# internals


def _from_pretrained(factory: Any, path: Path | str, source: str, local: bool, **kwargs: Any) -> Any:
    """``factory.from_pretrained(path, **kwargs)`` with transformers' lookup errors as `LoraError`."""
    from huggingface_hub.errors import HFValidationError

    try:
        return factory.from_pretrained(path, **kwargs)
    except (OSError, HFValidationError) as exc:
        reason = first_line(exc)
        if local:
            raise LoraError(
                f"could not load {factory.__name__} from {path}: {reason}",
                hint="the directory should hold a model saved with save_pretrained: config.json, "
                "model.safetensors and tokenizer files",
            ) from exc
        raise LoraError(
            f"could not find or reach model {source!r} on the Hugging Face Hub: {reason}",
            hint="check the id and your network (or HF_TOKEN for gated models); or pass a local "
            f"model directory, or a built-in alias that needs no hub: {alias_list()}",
        ) from exc


def _check_has_head(auto_cls: Any, config: Any, source: str, task: str, trust_remote_code: bool) -> None:
    """Raise `LoraError` if transformers has no ``auto_cls`` class for ``config``'s model type."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    )

    mapping = (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING if task == "classification" else MODEL_FOR_CAUSAL_LM_MAPPING
    )
    if type(config) in mapping:
        return
    if trust_remote_code and auto_cls.__name__ in (getattr(config, "auto_map", None) or {}):
        return
    other = "causal-lm" if task == "classification" else "classification"
    raise LoraError(
        f"model {source!r} (model_type {config.model_type!r}) has no {auto_cls.__name__} head in transformers",
        hint=f"use task {other!r} if the model supports it, or another model",
    )


def _ensure_pad_token(model: Any, tokenizer: Any, source: str) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LoraError(
                f"the tokenizer of {source!r} has neither a pad nor an eos token",
                hint="use a model whose tokenizer defines a pad or eos token",
            )
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer of %s has no pad token; using eos %r", source, tokenizer.eos_token)
    if model.config.pad_token_id != tokenizer.pad_token_id:
        model.config.pad_token_id = tokenizer.pad_token_id
