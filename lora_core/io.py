"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are ``base_model.model.<module path>.lora_A.weight`` (``r x in``) and ``.lora_B.weight``
(``out x r``); a module in ``modules_to_save`` is stored under ``base_model.model.<path>.<param>``.
A fused q/k/v layer adapted on some of its roles is written as one LoRA of rank ``blocks * r`` whose
B is block structured (exact: ``B_full @ A_full`` equals the sum of the per-role updates), with the
per-role layout recorded in the safetensors metadata so that lora_core reads it back compactly.

Loading is strict: a missing key, an unexpected key, or a shape that does not fit the model is an
error naming the module. Only safetensors is read; pickled ``.bin`` files are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lora_core.config import LoraConfig
from lora_core.errors import LoraError
from lora_core.layer import LoraWeights, attach, new_weights_for
from lora_core.model import (
    AdapterInfo,
    _check_name,
    _check_not_merged,
    _register,
    _registry_or_new,
    adapter_info,
    adapter_names,
    registry,
    set_active_adapter,
)
from lora_core.targets import in_out_features, is_conv1d, is_linear_like

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
META_KEY = "lora_core"
FORMAT_VERSION = 1


def _runs(idx: torch.Tensor) -> list[list[int]]:
    """Sorted row indices as ``[start, end)`` runs (compact for contiguous and per-head layouts)."""
    values = idx.tolist()
    runs: list[list[int]] = []
    for v in values:
        if runs and runs[-1][1] == v:
            runs[-1][1] = v + 1
        else:
            runs.append([v, v + 1])
    return runs


def _from_runs(runs: list[list[int]]) -> torch.Tensor:
    return torch.cat([torch.arange(a, b) for a, b in runs]) if runs else torch.zeros(0, dtype=torch.long)


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM")):
        if name.endswith(suffix):
            return task
    return None


# Heads PEFT adds to modules_to_save for these task types (and then requires in the file).
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
               "QUESTION_ANS": ("qa_outputs",)}


def _peft_task_type(model: nn.Module, saved_paths: list[str]) -> str | None:
    """The task type to write: None when PEFT would wrap a head whose tensors the file does not hold."""
    task = _task_type(model)
    heads = _TASK_HEADS.get(task or "", ())
    for mpath, _ in model.named_modules():
        if mpath and any(mpath.endswith(h) for h in heads) and not any(
            mpath == s or mpath.startswith(s + ".") for s in saved_paths
        ):
            return None
    return task


def _target_names(model: nn.Module, paths: list[str]) -> list[str]:
    """Short suffix names (``q_proj``) if they select exactly ``paths`` under PEFT's rule, else full paths."""
    chosen = set(paths)
    linear = [p for p, m in model.named_modules() if p and is_linear_like(m)]
    for depth in (1, 2, 3):
        names = sorted({".".join(p.split(".")[-depth:]) for p in paths})
        selected = {p for p in linear if any(p == n or p.endswith("." + n) for n in names)}
        if selected == chosen:
            return names
    return sorted(chosen)


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> Path:
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
        module = model.get_submodule(mpath)
        w: LoraWeights = module.lora[info.name]
        conv1d = conv1d or is_conv1d(module)
        blocks = len(w.roles) or 1
        peft_r = blocks * w.r
        alpha = cfg.alpha_for(mpath)
        # PEFT scales by alpha/r (or alpha/sqrt(r)); keep our scaling when r grows by `blocks`.
        peft_alpha = alpha * (math.sqrt(blocks) if cfg.rslora else blocks)
        site_r[mpath], site_alpha[mpath] = peft_r, peft_alpha
        if w.fused:
            fused_meta[mpath] = {"r": w.r, "roles": {role: _runs(w.rows(role).cpu()) for role in w.roles}}
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
        "task_type": _peft_task_type(model, info.saved_paths),
        "base_model_name_or_path": getattr(model_config, "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "r": r_default,
        "lora_alpha": alpha_default,
        "lora_dropout": cfg.dropout,
        "target_modules": _target_names(model, info.paths),
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
    _write_adapter_dir(out, tensors, metadata, peft_config)
    return out


def _write_adapter_dir(out: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                       peft_config: dict[str, Any]) -> None:
    """Write both files so that no reader ever sees a half-written adapter.

    A new directory is built beside its destination and renamed into place in one step. Into an
    existing directory each file is replaced atomically, weights first.
    """
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            save_file(tensors, str(staging / WEIGHTS_NAME), metadata=metadata)
            (staging / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2) + "\n")
            staging.chmod(0o777 & ~current_umask())
            for f in staging.iterdir():
                f.chmod(0o666 & ~current_umask())
            os.rename(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return
    _atomic_write(out / WEIGHTS_NAME, lambda f: save_file(tensors, f, metadata=metadata))
    _atomic_write(out / CONFIG_NAME, lambda f: Path(f).write_text(json.dumps(peft_config, indent=2) + "\n"))


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; an adapter is meant to be shared
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process umask, read without changing it (Linux); 0o022 where it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _read_files(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_dir():
        raise LoraError(f"adapter directory {path} does not exist", hint="pass the directory that holds adapter_config.json")
    cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not weights_file.exists():
        if (path / "adapter_model.bin").exists():
            raise LoraError(f"{path} holds a pickled adapter_model.bin; lora_core reads only safetensors",
                            hint="re-save it with PEFT's save_pretrained(safe_serialization=True)")
        raise LoraError(f"{weights_file} is missing", hint="an adapter directory holds adapter_model.safetensors")
    if not cfg_file.exists():
        raise LoraError(f"{cfg_file} is missing", hint="an adapter directory holds adapter_config.json")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise LoraError(f"{cfg_file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise LoraError(f"{cfg_file} holds a JSON {type(config).__name__}, not an object")
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            metadata = f.metadata() or {}
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensors[key] = f.get_tensor(key)
    except Exception as exc:  # safetensors raises its own error types
        raise LoraError(f"cannot read {weights_file}: {exc}") from None
    return config, tensors, metadata


_UNSUPPORTED = {
    "use_dora": (False, None), "lora_bias": (False, None), "layers_to_transform": (None, [],),
    "target_parameters": (None, []), "bias": ("none",), "trainable_token_indices": (None,),
    # PEFT variants whose forward pass is not plain LoRA (they would load "fine" and compute something else).
    "layer_replication": (None, []), "use_qalora": (False, None), "alora_invocation_tokens": (None, []),
    "use_bdlora": (None, False), "arrow_config": (None,), "kasa_config": (None,), "monteclora_config": (None,),
}


def _pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's rule for rank_pattern / alpha_pattern keys: the key matches a dotted suffix of the path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", activate: bool = True,
                 trainable: bool = False) -> nn.Module:
    """Load an adapter written by :func:`save_adapter` or by PEFT's ``save_pretrained``.

    Several adapters can be loaded under different names; the one loaded last is active unless
    ``activate=False``. Parameters stay frozen unless ``trainable=True``.

    Raises:
        LoraError: missing files, a pickled file, unsupported PEFT options, missing or unexpected
            keys, or shapes that do not fit this model (an adapter made for another base model).
    """
    _check_name(name)
    if name in adapter_names(model):
        raise LoraError(f"adapter {name!r} already exists on this model", hint="load it under another name")
    if activate:
        _check_not_merged(model)  # activating it would fail after attaching: fail before touching the model
    path = Path(path)
    pcfg, tensors, metadata = _read_files(path)
    if pcfg.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{path} holds a {pcfg.get('peft_type')} adapter; lora_core reads LoRA adapters only")
    for key, allowed in _UNSUPPORTED.items():
        if key in pcfg and pcfg[key] not in allowed:
            raise LoraError(f"{path}: PEFT option {key}={pcfg[key]!r} is not supported by lora_core")
    try:
        ours = json.loads(metadata[META_KEY]) if META_KEY in metadata else None
        fused_meta: dict[str, Any] = (ours or {}).get("fused", {})
    except (ValueError, AttributeError):
        raise LoraError(f"{path / WEIGHTS_NAME} has unreadable lora_core metadata",
                        hint="the file was edited or truncated; save the adapter again") from None

    bad = [k for k in tensors if not k.startswith(PREFIX)]
    if bad:
        raise LoraError(f"unexpected key {bad[0]!r} in {path / WEIGHTS_NAME}",
                        hint=f"PEFT adapter keys start with {PREFIX!r}")
    lora_keys: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        key = key[len(PREFIX):]
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
        if m:
            lora_keys.setdefault(m.group(1), {})[m.group(2)] = value
        else:
            other[key] = value

    modules = dict(model.named_modules())
    saved_paths = _saved_paths_for_load(model, pcfg, other, path)
    expected = _expected_targets(model, pcfg, saved_paths)
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
        peft_r = int(_pattern_value(rank_pattern, mpath, r_default))
        if a.shape[0] != peft_r:
            raise LoraError(f"rank mismatch at {mpath}: weights have rank {a.shape[0]}, the config says {peft_r}")
        peft_alpha = float(_pattern_value(alpha_pattern, mpath, alpha_default))
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
    reg = _registry_or_new(model)
    for module, weights in new:
        attach(module, name, weights)
    _register(model, reg, AdapterInfo(name, config, list(expected), saved_paths))
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


def _weights_from_file(module: nn.Module, mpath: str, a: torch.Tensor, b: torch.Tensor, scale: float,
                       dropout: float, fused: dict[str, Any] | None) -> LoraWeights:
    rows = None
    r = a.shape[0]
    if fused is not None:
        rows = {role: _from_runs(runs) for role, runs in fused["roles"].items()}
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


def _saved_paths_for_load(model: nn.Module, pcfg: dict[str, Any], other: dict[str, torch.Tensor],
                          path: Path) -> list[str]:
    """Which modules the file's non-LoRA keys belong to; any key that fits none is an error."""
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


def _expected_targets(model: nn.Module, pcfg: dict[str, Any], saved_paths: list[str]) -> list[str]:
    """Module paths the config's target_modules select, by PEFT's rules, in model order."""
    targets = pcfg.get("target_modules")
    exclude = pcfg.get("exclude_modules")
    linear = [(p, m) for p, m in model.named_modules() if p and is_linear_like(m)]
    if targets is None:
        raise LoraError("adapter_config.json has no target_modules")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

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
