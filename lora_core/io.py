"""Saving a model's adapter to PEFT-format files and loading such files into a model.

:func:`save_adapter` writes ``adapter_config.json`` + ``adapter_model.safetensors`` that
``peft.PeftModel.from_pretrained`` loads with no missing or unexpected keys; :func:`load_adapter`
reads files written by it or by PEFT's ``save_pretrained``. Tensor keys are
``base_model.model.<module path>.lora_A.weight`` (``r x in``) and ``.lora_B.weight`` (``out x r``); a
module in ``modules_to_save`` is stored under ``base_model.model.<path>.<param>``. A fused q/k/v layer
adapted on some of its roles is written as one LoRA of rank ``blocks * r`` whose B is block structured
(exact: ``B_full @ A_full`` equals the sum of the per-role updates), with the per-role layout recorded
in the safetensors metadata so that lora_core reads it back compactly.

Loading is strict: a missing key, an unexpected key, or a shape that does not fit the model is an
error naming the module, raised before the model is touched. Reading and writing the files
themselves (atomic writes, safetensors only) is :mod:`lora_core.files`; PEFT's config rules are
:mod:`lora_core.peft_config`. Their public names are importable from here too.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_core.config import LoraConfig
from lora_core.errors import LoraError
from lora_core.files import (
    CONFIG_NAME,
    FORMAT_VERSION,
    META_KEY,
    PREFIX,
    WEIGHTS_NAME,
    AdapterFiles,
    current_umask,
    read_adapter_files,
    rows_from_runs,
    rows_to_runs,
    write_adapter_files,
)
from lora_core.layer import LoraWeights, attach, new_weights_for
from lora_core.model import (
    AdapterInfo,
    adapter_info,
    adapter_names,
    check_adapter_name,
    check_not_merged,
    lora_layer,
    prepare_quantized,
    register_adapter,
    registry,
    registry_or_new,
    set_active_adapter,
)
from lora_core.peft_config import (
    check_supported,
    expected_targets,
    pattern_value,
    peft_task_type,
    saved_paths_for_load,
    target_names,
)
from lora_core.targets import in_out_features, is_conv1d

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "META_KEY",
    "PREFIX",
    "WEIGHTS_NAME",
    "AdapterFiles",
    "current_umask",
    "load_adapter",
    "read_adapter_files",
    "save_adapter",
]


def save_adapter(model: nn.Module, path: str | os.PathLike[str], name: str | None = None) -> Path:
    """Write adapter ``name`` (default: the active one) to directory ``path`` in PEFT's format.

    ``peft.PeftModel.from_pretrained(base_model, path)`` loads the result with no missing or
    unexpected keys. Files are written to temporary names and renamed into place, so an interrupted
    save never leaves a half-written adapter behind.

    ``task_type`` is PEFT's (``SEQ_CLS``, ``CAUSAL_LM``...) except for a classification model whose
    head is not in ``modules_to_save``: PEFT would then add the head to ``modules_to_save`` and fail to
    find its tensors, so the task type is written as null.

    Returns:
        The directory written.
    """
    info = adapter_info(model, name)
    reg = registry(model)
    cfg = info.config
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise LoraError(f"cannot save adapter: {out} exists and is not a directory")
    tensors: dict[str, torch.Tensor] = {}
    site_r: dict[str, int] = {}
    site_alpha: dict[str, float] = {}
    fused_meta: dict[str, Any] = {}
    conv1d = False
    for mpath in info.paths:
        module = lora_layer(model, mpath)
        w = module.adapter_weights(info.name)
        conv1d = conv1d or is_conv1d(module)
        blocks = len(w.roles) or 1
        peft_r = blocks * w.r
        alpha = cfg.alpha_for(mpath)
        # PEFT scales by alpha/r (or alpha/sqrt(r)); keep our scaling when r grows by `blocks`.
        peft_alpha = alpha * (math.sqrt(blocks) if cfg.rslora else blocks)
        site_r[mpath], site_alpha[mpath] = peft_r, peft_alpha
        if w.fused:
            fused_meta[mpath] = {"r": w.r, "roles": {role: rows_to_runs(w.rows(role).cpu()) for role in w.roles}}
        tensors[f"{PREFIX}{mpath}.lora_A.weight"] = w.lora_A.detach().cpu().contiguous()
        tensors[f"{PREFIX}{mpath}.lora_B.weight"] = w.expanded_B().detach().cpu().contiguous()
    for spath in info.saved_paths:
        values = reg.saved[spath].values(model.get_submodule(spath), info.name)
        for key, value in values.items():
            tensors[f"{PREFIX}{spath}.{key}"] = value.detach().cpu().contiguous().clone()
    # PEFT's r / lora_alpha are the most common per-layer values; the rest go to its patterns.
    r_default = Counter(site_r.values()).most_common(1)[0][0] if site_r else cfg.r
    alpha_default = Counter(site_alpha.values()).most_common(1)[0][0] if site_alpha else cfg.alpha
    rank_pattern = {re.escape(p): v for p, v in site_r.items() if v != r_default}
    alpha_pattern = {re.escape(p): v for p, v in site_alpha.items() if v != alpha_default}
    model_config = getattr(model, "config", None)
    peft_config = {
        "peft_type": "LORA",
        "task_type": peft_task_type(model, info.saved_paths),
        "base_model_name_or_path": getattr(model_config, "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "r": r_default,
        "lora_alpha": alpha_default,
        "lora_dropout": cfg.dropout,
        "target_modules": target_names(model, info.paths),
        "exclude_modules": None,
        "fan_in_fan_out": conv1d,
        "bias": "none",
        "use_rslora": cfg.rslora,
        "modules_to_save": list(info.saved_paths) or None,
        "init_lora_weights": True if cfg.init == "kaiming" else "gaussian",
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_dora": False,
        "lora_bias": False,
    }
    metadata = {
        "format": "pt",
        META_KEY: json.dumps({"version": FORMAT_VERSION, "config": cfg.to_dict(), "fused": fused_meta,
                              "paths": info.paths}),
    }
    write_adapter_files(out, tensors, metadata, peft_config)
    return out


def load_adapter(model: nn.Module, path: str | os.PathLike[str], name: str = "default", activate: bool = True,
                 trainable: bool = False) -> nn.Module:
    """Load an adapter written by :func:`save_adapter` or by PEFT's ``save_pretrained``.

    Several adapters can be loaded under different names; the one loaded last is active unless
    ``activate=False``, which keeps the active adapter active (a model with none active, such as one
    without adapters, gets this one). Parameters stay frozen unless ``trainable=True``.

    Raises:
        LoraError: missing files, a pickled file, unsupported PEFT options, missing or unexpected
            keys, or shapes that do not fit this model (an adapter made for another base model).
    """
    check_adapter_name(name)
    if name in adapter_names(model):
        raise LoraError(f"adapter {name!r} already exists on this model", hint="load it under another name")
    if activate:
        check_not_merged(model)  # activating it would fail after attaching: fail before touching the model
    path = Path(path)
    files = read_adapter_files(path)
    pcfg = files.config
    check_supported(pcfg, path)
    ours = files.lora_core_meta()
    fused_meta: dict[str, Any] = (ours or {}).get("fused") or {}
    lora_keys, other = _split_keys(files)

    modules = dict(model.named_modules())
    saved_paths = saved_paths_for_load(model, pcfg, other, path)
    expected = expected_targets(model, pcfg, saved_paths)
    for mpath in lora_keys:
        if mpath not in modules:
            raise LoraError(f"adapter has weights for {mpath}, which this model does not have",
                            hint="the adapter was probably made for another base model")
        if mpath not in expected:
            raise LoraError(f"adapter has weights for {mpath}, which its target_modules do not select",
                            hint="the adapter_config.json does not match adapter_model.safetensors")
    for mpath in expected:
        got = lora_keys.get(mpath, {})
        for part in "AB":
            if part not in got:
                raise LoraError(f"adapter is missing lora_{part} for {mpath}",
                                hint="the file is incomplete or was made for another base model")

    try:
        r_default, alpha_default = int(pcfg.get("r", 8)), float(pcfg.get("lora_alpha", 8))
    except (TypeError, ValueError):
        raise LoraError(f"{path / CONFIG_NAME}: r and lora_alpha must be numbers, got "
                        f"{pcfg.get('r')!r} and {pcfg.get('lora_alpha')!r}") from None
    rslora = bool(pcfg.get("use_rslora", False))
    rank_pattern, alpha_pattern = pcfg.get("rank_pattern") or {}, pcfg.get("alpha_pattern") or {}
    new: list[tuple[nn.Module, LoraWeights]] = []
    site_r: dict[str, int] = {}
    site_alpha: dict[str, float] = {}
    for mpath in expected:
        module = modules[mpath]
        a, b = lora_keys[mpath]["A"], lora_keys[mpath]["B"]
        in_f, out_f = in_out_features(module)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            raise LoraError(
                f"shape mismatch at {mpath}: adapter has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                f"the model's layer has in={in_f}, out={out_f}",
                hint="the adapter was made for another base model",
            )
        peft_r = int(pattern_value(rank_pattern, mpath, r_default))
        if a.shape[0] != peft_r:
            raise LoraError(f"rank mismatch at {mpath}: weights have rank {a.shape[0]}, the config says {peft_r}")
        peft_alpha = float(pattern_value(alpha_pattern, mpath, alpha_default))
        site_r[mpath], site_alpha[mpath] = peft_r, peft_alpha
        scale = peft_alpha / math.sqrt(peft_r) if rslora else peft_alpha / peft_r
        weights = _weights_from_file(module, mpath, a, b, scale, float(pcfg.get("lora_dropout", 0.0)),
                                     fused_meta.get(mpath))
        new.append((module, weights))
    for spath in saved_paths:
        for pname, param in modules[spath].named_parameters():
            value = other[f"{spath}.{pname}"]
            if value.shape != param.shape:
                raise LoraError(f"shape mismatch at {spath}.{pname}: adapter has {tuple(value.shape)}, "
                                f"model has {tuple(param.shape)}", hint="the adapter was made for another base model")
    # Everything that can fail happens before the model is touched: no half-loaded adapter.
    if ours is not None:
        try:
            config = LoraConfig.from_dict(ours["config"])
        except (LoraError, KeyError, TypeError) as exc:
            raise LoraError(f"{path / WEIGHTS_NAME} has an invalid lora_core config: {exc}") from None
    else:
        # Keep PEFT's per-layer ranks and alphas (exact-path patterns) so that save_adapter writes them back.
        config = LoraConfig(
            r=r_default, alpha=alpha_default, targets=tuple(expected) or ("<none>",),
            dropout=float(pcfg.get("lora_dropout", 0.0)), rslora=rslora,
            init="gaussian" if pcfg.get("init_lora_weights") == "gaussian" else "kaiming",
            modules_to_save=tuple(saved_paths),
            rank_pattern={f"re:{re.escape(p)}": v for p, v in site_r.items() if v != r_default},
            alpha_pattern={f"re:{re.escape(p)}": v for p, v in site_alpha.items() if v != alpha_default},
        )
    prepare_quantized(model, saved_paths)
    reg = registry_or_new(model)
    for module, weights in new:
        attach(module, name, weights)
    register_adapter(model, reg, AdapterInfo(name, config, list(expected), saved_paths))
    for spath in saved_paths:
        for key, target in reg.saved[spath].per_adapter[name].items():
            target.copy_(other[f"{spath}.{key}"])
    previous = reg.active
    if activate or previous is None:
        set_active_adapter(model, name)
    else:
        set_active_adapter(model, previous)
    for _, weights in new:
        weights.requires_grad_(trainable)
    return model


def _split_keys(files: AdapterFiles) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``({module path: {"A": A, "B": B}}, {other key: tensor})``, keys without the ``base_model.model.`` prefix."""
    bad = [k for k in files.tensors if not k.startswith(PREFIX)]
    if bad:
        raise LoraError(f"unexpected key {bad[0]!r} in {files.path / WEIGHTS_NAME}",
                        hint=f"PEFT adapter keys start with {PREFIX!r}")
    lora_keys: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    for key, value in files.tensors.items():
        key = key[len(PREFIX):]
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
        if m:
            lora_keys.setdefault(m.group(1), {})[m.group(2)] = value
        else:
            other[key] = value
    return lora_keys, other


def _weights_from_file(module: nn.Module, mpath: str, a: torch.Tensor, b: torch.Tensor, scale: float,
                       dropout: float, fused: dict[str, Any] | None) -> LoraWeights:
    rows = None
    r = a.shape[0]
    if fused is not None:
        rows = {role: rows_from_runs(runs) for role, runs in fused["roles"].items()}
        r = int(fused["r"])
        if r * len(rows) != a.shape[0]:
            raise LoraError(f"fused layout of {mpath} does not match its weights (rank {a.shape[0]})")
        # PEFT's scaling used blocks*r; ours uses the per-role rank and gives the same product.
    weights = new_weights_for(module, r, scale, dropout, None, rows)  # no init: values come from the file
    with torch.no_grad():
        weights.lora_A.copy_(a)
        if rows is None:
            weights.lora_B.copy_(b)
        else:
            compact = []
            for i, role in enumerate(weights.roles):
                compact.append(b[rows[role].to(b.device), i * r:(i + 1) * r])
            weights.lora_B.copy_(torch.cat(compact))
            if not torch.equal(weights.expanded_B().to(b.dtype).cpu(), b.cpu()):
                raise LoraError(f"fused lora_B of {mpath} has values outside its q/k/v blocks",
                                hint="it was changed after saving; load it with PEFT, which treats it as one layer")
    return weights
