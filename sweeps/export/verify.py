"""Checking an exported adapter: it loads strictly, matches the trial's layout and reproduces the logged metric.

The trial's LoRA config is injected into the base model as a reference adapter; the downloaded one is
loaded beside it with ``lora_core.load_adapter`` (strict about keys and shapes against its own config)
and must adapt the same modules with the same shapes and scaling and save the same modules (the
classification head). The validation split is then re-evaluated and must match the run's logged
``final_*`` metrics within :data:`TOLERANCE`. With ``--merged``, the adapter is folded into the base
weights and the merged model is checked (and saved) too; a quantized base (``model.quantize``) is loaded
quantized the same way for the check, and merged into a dequantized 16-bit copy of itself.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_core import LoraError
from sweeps.export import Echo

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sweeps.config.trial import TrialConfig
    from sweeps.data.prepare import PreparedData
    from sweeps.models.load import LoadedModel

__all__ = ["TOLERANCE", "compare", "counts", "evaluate", "load_checked", "merged_dtype_of", "write_merged"]

TOLERANCE = 1e-4            # absolute: reproduced vs logged validation metric
_REF, _LOADED = "reference", "export"   # adapter names on the model while checking


def load_checked(cfg: TrialConfig, data: PreparedData, adapter_dir: Path, run_id: str,
                 number: int) -> tuple[LoadedModel, nn.Module]:
    """The base model with the downloaded adapter loaded strictly and checked against the trial's layout.

    The trial's LoRA config is injected (with the modules_to_save ``trainer.build_model`` picks) as a
    reference adapter; the downloaded one is loaded beside it with ``lora_core.load_adapter`` (strict
    about keys and shapes against its own config) and must adapt the same modules with the same
    shapes and scaling and save the same modules (the classification head). The reference is then
    deleted.
    """
    import lora_core
    from sweeps.models.heads import saved_modules
    from sweeps.models.load import load_model

    loaded = load_model(cfg.model.name, cfg.model.task, num_labels=data.num_labels, dtype=cfg.model.dtype,
                        device=cfg.model.device, trust_remote_code=cfg.model.trust_remote_code,
                        quantize=cfg.model.quantize)
    model = loaded.model
    saved = saved_modules(model, cfg.model.task, cfg.lora.modules_to_save)  # as the trainer chooses them
    lora_core.inject(model, cfg.lora_config(modules_to_save=saved), name=_REF)
    lora_core.load_adapter(model, adapter_dir, name=_LOADED)
    ref, got = lora_core.adapter_info(model, _REF), lora_core.adapter_info(model, _LOADED)
    where = f"the adapter of run {run_id} does not match trial {number}'s config"
    for kind, want, have in (("LoRA on", ref.paths, got.paths), ("modules_to_save", ref.saved_paths, got.saved_paths)):
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        if missing or extra:
            detail = "; ".join(part for part in (f"missing {kind} {', '.join(missing)}" if missing else "",
                                                 f"unexpected {kind} {', '.join(extra)}" if extra else "") if part)
            raise LoraError(f"{where}: {detail}", hint="the artifact was changed or belongs to another trial")
    ref_w, got_w = lora_core.lora_weights(model, _REF), lora_core.lora_weights(model, _LOADED)
    for path, w in ref_w.items():
        g = got_w[path]
        if (g.lora_A.shape, g.lora_B.shape, g.roles) != (w.lora_A.shape, w.lora_B.shape, w.roles):
            raise LoraError(f"{where}: {path} has A {tuple(g.lora_A.shape)}, B {tuple(g.lora_B.shape)}; the trial's "
                            f"r={w.r} needs A {tuple(w.lora_A.shape)}, B {tuple(w.lora_B.shape)}",
                            hint="the artifact was changed or belongs to another trial")
        if not math.isclose(g.scaling, w.scaling, rel_tol=1e-6):
            raise LoraError(f"{where}: {path} scales by {g.scaling:g}, the trial's alpha/r gives {w.scaling:g}",
                            hint="the artifact's adapter_config.json was changed")
    lora_core.delete_adapter(model, _REF)
    lora_core.set_active_adapter(model, _LOADED)
    return loaded, model


def evaluate(model: nn.Module, data: PreparedData, cfg: TrialConfig, tokenizer: Any, generate: bool) -> dict[str, float]:
    """The validation metrics of ``model`` (as the trial computed them)."""
    from sweeps.training.evaluate import evaluate as evaluate_split

    return evaluate_split(model, data, "validation", cfg, tokenizer, generate=generate)


def compare(reproduced: dict[str, float], logged: dict[str, float], number: int, what: str, echo: Echo,
            tolerance: float = TOLERANCE) -> None:
    """Echo each reproduced metric against the logged one; refuse (``LoraError``) when one is off by
    more than ``tolerance``."""
    worst = None
    for key, want in logged.items():
        got = reproduced.get(key, math.nan)
        diff = abs(got - want) if math.isfinite(got) else math.inf
        echo(f"validation {key} ({what}): reproduced {got:.6f}, logged {want:.6f} (|diff| {diff:.1e})")
        if diff > tolerance and worst is None:
            worst = (key, got, want, diff)
    if worst is not None:
        key, got, want, diff = worst
        raise LoraError(f"the {what} of trial {number} gives validation {key} {got:.6f}, its run logged {want:.6f} "
                        f"(|diff| {diff:.2g} > {tolerance:g}); refusing to export",
                        hint="the artifact was changed, or the base model, data, device or library versions differ "
                             "from the sweep's; nothing was written")


def counts(model: nn.Module) -> dict[str, Any]:
    """The loaded adapter's parameter counts and adapted / saved modules (for the model card)."""
    import lora_core
    from lora_core.analysis import parameter_count

    c = parameter_count(model, _LOADED)
    info = lora_core.adapter_info(model, _LOADED)
    return {"trainable": c.trainable, "lora": c.lora, "saved": c.saved_modules, "base": c.base,
            "fraction": c.fraction, "modules": list(info.paths), "saved_paths": list(info.saved_paths)}


def merged_dtype_of(loaded: LoadedModel) -> torch.dtype | None:
    """The 16-bit dtype ``--merged`` dequantizes a quantized base to; None for a base that is not quantized."""
    from sweeps.models.quantize import merged_dtype

    return None if loaded.quantize == "none" else merged_dtype(loaded.dtype)


def write_merged(model: nn.Module, loaded: LoadedModel, data: PreparedData, cfg: TrialConfig, folder: Path,
                 logged: dict[str, float], number: int, generate: bool, echo: Echo) -> dict[str, float]:
    """Merge the adapter into the base weights, check the metric, and save_pretrained (safetensors) + tokenizer.

    A quantized base (``model.quantize``) cannot take ``W0 + dW`` in place: its layers are dequantized into a
    16-bit copy first (:func:`sweeps.models.quantize.dequantize_model`, dtype :func:`merged_dtype_of`), the
    adapter is merged into that, and the whole merged model is saved in that dtype. Its metric is reported,
    not checked: it is not the quantized model the adapter was trained on."""
    import torch

    import lora_core
    from sweeps.models.quantize import dequantize_model

    half = merged_dtype_of(loaded)
    if half is not None:
        swapped = dequantize_model(model, half)
        echo(f"merging into a {str(half).removeprefix('torch.')} copy of the {loaded.quantize} base "
             f"({len(swapped)} layers dequantized with bitsandbytes)")
    lora_core.merge_and_unload(model, _LOADED)
    pretrained: Any = model  # a transformers PreTrainedModel: its config and save_pretrained
    if half is not None:
        model.to(half)
        pretrained.config.dtype = half  # what save_pretrained records
    if data.task == "classification" and data.label_names:
        pretrained.config.id2label = dict(enumerate(data.label_names))
        pretrained.config.label2id = {n: i for i, n in enumerate(data.label_names)}
    metrics = evaluate(model, data, cfg, loaded.tokenizer, generate)
    exact = next(model.parameters()).dtype in (torch.float32, torch.float64)
    if exact:
        compare(metrics, logged, number, "merged model", echo)
    else:  # merged into 16-bit weights: rounding moves the numbers a little; report, do not refuse
        weights = str(next(model.parameters()).dtype).removeprefix("torch.")
        for key, want in logged.items():
            echo(f"validation {key} (merged model, {weights} weights): "
                 f"{metrics.get(key, math.nan):.6f}, logged {want:.6f}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pretrained.save_pretrained(str(folder), safe_serialization=True)
        loaded.tokenizer.save_pretrained(str(folder))
    return metrics
