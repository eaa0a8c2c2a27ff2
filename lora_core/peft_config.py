"""PEFT's ``adapter_config.json`` rules, applied to a concrete model.

Which layers ``target_modules`` / ``exclude_modules`` select, which modules a file's extra tensors
belong to (``modules_to_save``), per-layer rank and alpha from ``rank_pattern`` / ``alpha_pattern``,
the options lora_core refuses, and, for writing, the ``task_type`` and short ``target_modules`` names
PEFT needs to load the adapter back exactly.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_core.errors import LoraError
from lora_core.files import PREFIX, WEIGHTS_NAME
from lora_core.targets import is_linear_like, output_embeddings

# PEFT options whose values other than these change what the adapter computes: refused on load.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "use_dora": (False, None), "lora_bias": (False, None), "layers_to_transform": (None, []),
    "target_parameters": (None, []), "bias": ("none",), "trainable_token_indices": (None,),
    # PEFT variants whose forward pass is not plain LoRA (they would load "fine" and compute something else).
    "layer_replication": (None, []), "use_qalora": (False, None), "alora_invocation_tokens": (None, []),
    "use_bdlora": (None, False), "arrow_config": (None,), "kasa_config": (None,), "monteclora_config": (None,),
}

# Heads PEFT adds to modules_to_save for these task types (and then requires in the file).
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}


def check_supported(pcfg: dict[str, Any], path: Path) -> None:
    """Raise LoraError for a non-LoRA adapter or a PEFT option lora_core does not implement."""
    if pcfg.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{path} holds a {pcfg.get('peft_type')} adapter; lora_core reads LoRA adapters only")
    for key, allowed in UNSUPPORTED.items():
        if key in pcfg and pcfg[key] not in allowed:
            raise LoraError(f"{path}: PEFT option {key}={pcfg[key]!r} is not supported by lora_core")


def pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's rule for rank_pattern / alpha_pattern keys: the key matches a dotted suffix of the path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def task_type(model: nn.Module) -> str | None:
    """PEFT's task type for a transformers model class (``LlamaForCausalLM`` -> ``CAUSAL_LM``), if any."""
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM")):
        if name.endswith(suffix):
            return task
    return None


def peft_task_type(model: nn.Module, saved_paths: list[str]) -> str | None:
    """The task type to write: None when PEFT would wrap a head whose tensors the file does not hold."""
    task = task_type(model)
    heads = TASK_HEADS.get(task or "", ())
    for mpath, _ in model.named_modules():
        if mpath and any(mpath.endswith(h) for h in heads) and not any(
            mpath == s or mpath.startswith(s + ".") for s in saved_paths
        ):
            return None
    return task


def target_names(model: nn.Module, paths: list[str]) -> list[str]:
    """Short suffix names (``q_proj``) if they select exactly ``paths`` under PEFT's rule, else full paths."""
    chosen = set(paths)
    linear = [p for p, m in model.named_modules() if p and is_linear_like(m)]
    for depth in (1, 2, 3):
        names = sorted({".".join(p.split(".")[-depth:]) for p in paths})
        selected = {p for p in linear if any(p == n or p.endswith("." + n) for n in names)}
        if selected == chosen:
            return names
    return sorted(chosen)


def expected_targets(model: nn.Module, pcfg: dict[str, Any], saved_paths: list[str]) -> list[str]:
    """Module paths the config's target_modules select, by PEFT's rules, in model order."""
    targets = pcfg.get("target_modules")
    exclude = pcfg.get("exclude_modules")
    linear = [(p, m) for p, m in model.named_modules() if p and is_linear_like(m)]
    if targets is None:
        raise LoraError("adapter_config.json has no target_modules")
    head = output_embeddings(model)

    def selected(p: str, m: nn.Module) -> bool:
        if any(p == s or p.startswith(s + ".") for s in saved_paths):
            return False
        if exclude and (re.fullmatch(exclude, p) if isinstance(exclude, str)
                        else any(p == e or p.endswith("." + e) for e in exclude)):
            return False
        if targets == "all-linear":
            return m is not head
        if isinstance(targets, str):
            return re.fullmatch(targets, p) is not None
        return any(p == t or p.endswith("." + t) for t in targets)

    return [p for p, m in linear if selected(p, m)]


def saved_paths_for_load(model: nn.Module, pcfg: dict[str, Any], other: dict[str, torch.Tensor],
                         path: Path) -> list[str]:
    """Which modules the file's non-LoRA keys belong to; any key that fits none is an error.

    ``other`` holds those keys without their ``base_model.model.`` prefix.
    """
    modules = dict(model.named_modules())
    names = list(pcfg.get("modules_to_save") or [])
    if pcfg.get("task_type") == "SEQ_CLS":  # PEFT adds the classifier head for this task
        names += [n for n in ("classifier", "score") if n not in names]
    saved: list[str] = []
    for key in other:
        owner = None
        for mpath in sorted(modules, key=len, reverse=True):
            if mpath and key.startswith(mpath + ".") and any(mpath == n or mpath.endswith("." + n) for n in names):
                owner = mpath
                break
        if owner is None:
            raise LoraError(f"unexpected key {PREFIX}{key} in {path / WEIGHTS_NAME}",
                            hint="it is neither a LoRA matrix nor part of a module in modules_to_save")
        if owner not in saved:
            saved.append(owner)
    for spath in saved:
        for pname, _ in modules[spath].named_parameters():
            if f"{spath}.{pname}" not in other:
                raise LoraError(f"adapter is missing {spath}.{pname} (modules_to_save)")
    # A module the config lists in modules_to_save but whose tensors the file lacks (PEFT refuses these too).
    for n in pcfg.get("modules_to_save") or []:
        for mpath, module in modules.items():
            if (mpath == n or mpath.endswith("." + n)) and not any(
                    mpath == s or mpath.startswith(s + ".") or s.startswith(mpath + ".") for s in saved):
                first = next((pname for pname, _ in module.named_parameters()), None)
                if first is not None:
                    raise LoraError(f"adapter is missing {mpath}.{first} (modules_to_save)",
                                    hint="the file is incomplete or was made for another base model")
    return saved
