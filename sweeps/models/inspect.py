"""A model's layout without its weights: built from its config on the meta device, its linear layers
grouped, the target presets that resolve on it, and the check that a config's target sets do.

    >>> shape = inspect_model("smollm2-135m", "causal-lm")
    >>> shape.model_class, shape.params, shape.presets   # 'LlamaForCausalLM', 134515008, ('q', 'k', ..., 'all-linear')
    >>> check_targets(sweep_config)   # LoraError naming a target that adapts nothing, before anything is created

The model is built with the class `sweeps.models.load.load_model` uses for the task
(AutoModelForSequenceClassification or AutoModelForCausalLM) under ``torch.device("meta")``: no weight
is read or allocated, so inspecting a 7B model costs about as little as a tiny one. Targets resolve with
``lora_core.targets.resolve_targets`` and the trials' own ``modules_to_save`` rule, exactly as a trial
resolves them.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, get_args

import torch
from torch import nn

from lora_core import LoraError
from lora_core.targets import (
    ALL_LINEAR,
    PRESETS,
    in_out_features,
    linear_layers,
    output_embeddings,
    resolve_targets,
)
from sweeps.config.sweep import SweepConfig
from sweeps.config.trial import TrialConfig
from sweeps.models.heads import saved_modules
from sweeps.models.load import Task, load_config, model_class, resolve_device
from sweeps.models.quantize import require_bitsandbytes

__all__ = ["LayerGroup", "ModelShape", "build_on_meta", "check_targets", "infer_task", "inspect_model",
           "supported_presets"]

logger = logging.getLogger(__name__)

PRESET_CHOICES: tuple[str, ...] = (*PRESETS, ALL_LINEAR)  # q, k, v, o, attn, mlp, all-linear
_ROLES = ("q", "k", "v", "o", "mlp")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass(frozen=True)
class LayerGroup:
    """Linear layers that differ only by their layer number (``model.layers.*.self_attn.q_proj``)."""

    name: str
    count: int
    in_features: int
    out_features: int
    role: str  # q, k, v, o, mlp, "q,k,v fused", "head" (never in all-linear), or "" (all-linear only)


@dataclass(frozen=True)
class ModelShape:
    """What `inspect_model` found."""

    source: str
    task: str
    model_class: str
    model_type: str
    params: int
    layers: tuple[LayerGroup, ...]
    presets: tuple[str, ...]          # the presets that resolve on this model, in PRESET_CHOICES order
    max_positions: int | None         # the config's max_position_embeddings, when it has one


def infer_task(config: Any) -> Task | None:
    """The task a model's config suggests: causal-lm for a ``...ForCausalLM`` / ``...LMHeadModel``
    architecture, classification for any other named architecture (encoders, classifiers), else None."""
    architectures = [str(a) for a in getattr(config, "architectures", None) or ()]
    if any(a.endswith(_CAUSAL_SUFFIXES) for a in architectures):
        return "causal-lm"
    return "classification" if architectures else None


def build_on_meta(name_or_path: str, task: Task, num_labels: int = 2, trust_remote_code: bool = False,
                  config: Any = None) -> nn.Module:
    """The model ``load_model`` would build for ``task``, on the meta device (no weights read or allocated).

    Raises:
        LoraError: the model cannot be resolved (as `load_model`), or has no head for ``task``.
        Exception: transformers could not build the class on the meta device (rare; callers decide).
    """
    if task not in get_args(Task):
        raise LoraError(f"unknown task {task!r}", hint=f"use one of: {', '.join(get_args(Task))}")
    if config is None:
        config = load_config(name_or_path, trust_remote_code=trust_remote_code)
    auto_cls = model_class(config, task, name_or_path, trust_remote_code)
    if task == "classification":
        config.num_labels = num_labels
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model: nn.Module = auto_cls.from_config(config, trust_remote_code=trust_remote_code)
    return model


def supported_presets(model: nn.Module, saved: Sequence[str] = ()) -> tuple[str, ...]:
    """The presets of `PRESET_CHOICES` that resolve to at least one layer of ``model``."""
    out = []
    for preset in PRESET_CHOICES:
        try:
            resolve_targets(model, [preset], saved)
        except LoraError:
            continue
        out.append(preset)
    return tuple(out)


def inspect_model(name_or_path: str, task: Task, modules_to_save: Any = "auto", trust_remote_code: bool = False,
                  config: Any = None) -> ModelShape:
    """Build ``name_or_path`` for ``task`` on the meta device and describe it (see `ModelShape`)."""
    model = build_on_meta(name_or_path, task, trust_remote_code=trust_remote_code, config=config)
    saved = saved_modules(model, task, modules_to_save)
    cfg = getattr(model, "config", None)
    max_positions = getattr(cfg, "max_position_embeddings", None)
    return ModelShape(source=name_or_path, task=task, model_class=type(model).__name__,
                      model_type=str(getattr(cfg, "model_type", "") or ""),
                      params=sum(p.numel() for p in model.parameters()), layers=_layer_groups(model, saved),
                      presets=supported_presets(model, saved),
                      max_positions=int(max_positions) if isinstance(max_positions, int) else None)


def check_targets(config: TrialConfig) -> None:
    """Every target set a trial or a sweep would train must adapt a layer of its model.

    A `SweepConfig` is checked for each set of ``search.ladder.targets`` (ladder) or ``search.targets``;
    a trial config for ``lora.targets``. Nothing is checked when LoRA is off (``lora.enabled: false``).
    The model is built on the meta device, so this costs a config read, not a model load.

    A quantized base (``model.quantize``) is checked to be loadable here too: bitsandbytes installed, with
    a backend for the device.

    Raises:
        LoraError: one line naming the set and the target that matches nothing, with the presets this
            model supports as the hint; or the model cannot be resolved (as `load_model`); or
            bitsandbytes is missing or cannot run on the device.
    """
    if config.model.quantize != "none":
        require_bitsandbytes(config.model.quantize, resolve_device(config.model.device))
    if isinstance(config, SweepConfig):
        search = config.search
        entries = search.ladder.targets if search.strategy == "ladder" else search.target_choices()
        key = "search.ladder.targets" if search.strategy == "ladder" else "search.targets"
        sets = [(f"{key} {entry!r}", [t.strip() for t in entry.split(",")]) for entry in entries]
    else:
        sets = [("lora.targets", list(config.lora.targets))]
    m = config.model
    try:
        model = build_on_meta(m.name, m.task, trust_remote_code=m.trust_remote_code)
    except LoraError:
        raise
    except Exception as exc:  # transformers could not build it on meta: the trial's own load checks instead
        logger.warning("targets not checked: %s could not be built on the meta device (%s)", m.name, exc)
        return
    _check_positions(config, model)
    if not config.lora.enabled:
        return
    saved = saved_modules(model, m.task, config.lora.modules_to_save)
    resolved = []
    for where, targets in sets:
        try:
            resolved.append((where, resolve_targets(model, targets, saved)))
        except LoraError as exc:
            presets = ", ".join(supported_presets(model, saved)) or "none (name the layers)"
            example = next(iter(_layer_groups(model, saved)), None)
            raise LoraError(f"{where}: {exc.message} ({m.name}, {type(model).__name__})",
                            hint=f"presets this model supports: {presets}"
                                 + (f"; or a layer name such as {example.name}" if example else "")) from None
    rank, rank_key = _largest_rank(config)
    for where, sites in resolved:
        smallest, path = min((_site_dim(site), site.path) for site in sites)
        if rank > smallest:
            raise LoraError(f"{rank_key} {rank} is above the dimension of a layer {where} adapts ({path}: "
                            f"{smallest}) of {m.name}",
                            hint=f"a LoRA rank is at most min(in, out) of its layer: use ranks <= {smallest}")


def _largest_rank(config: TrialConfig) -> tuple[int, str]:
    """The largest rank a trial or a sweep surely trains, and the key that sets it (the ladder: its first
    rung, ``r_start``; it climbs towards ``r_max`` only while a rank pays)."""
    if isinstance(config, SweepConfig):
        if config.search.strategy == "ladder":
            return config.search.ladder.r_start, "search.ladder.r_start"
        return max(config.search.rank), "search.rank"
    return config.lora.r, "lora.r"


def _site_dim(site: Any) -> int:
    """The largest rank a target site can take: min(in, out) of its layer (out: a fused role's rows)."""
    fan_in, fan_out = in_out_features(site.module)
    if site.rows is not None:
        fan_out = min(int(rows.numel()) for rows in site.rows.values())
    return min(fan_in, fan_out)


def _check_positions(config: TrialConfig, model: nn.Module) -> None:
    """``data.max_length`` (and a causal model's generated tokens) within the model's positions."""
    cfg = getattr(model, "config", None)
    positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if not isinstance(positions, int) or positions < 1:
        return
    length = config.data.max_length
    if length > positions:
        raise LoraError(f"data.max_length {length} is above the {positions} positions of {config.model.name}",
                        hint=f"set data.max_length <= {positions}")
    if config.model.task == "causal-lm" and config.train.generate_samples and config.train.max_new_tokens > positions:
        raise LoraError(f"train.max_new_tokens {config.train.max_new_tokens} is above the {positions} positions "
                        f"of {config.model.name}", hint=f"set train.max_new_tokens <= {positions}")


# ----------------------------------------------------------------------------------------------
# internals


def _layer_groups(model: nn.Module, saved: Sequence[str]) -> tuple[LayerGroup, ...]:
    layers = linear_layers(model)
    roles: dict[str, set[str]] = {}
    fused: set[str] = set()
    for role in _ROLES:
        try:
            sites = resolve_targets(model, [role], saved)
        except LoraError:
            continue
        for site in sites:
            roles.setdefault(site.path, set()).add(role)
            if site.rows is not None:
                fused.add(site.path)
    try:
        in_all = {site.path for site in resolve_targets(model, [ALL_LINEAR], saved)}
    except LoraError:
        in_all = set()
    head = output_embeddings(model)
    groups: dict[str, list[Any]] = {}
    for path, module in layers.items():
        generic = re.sub(r"\.\d+(?=\.|$)", ".*", path)
        if path in fused:
            role = ",".join(r for r in ("q", "k", "v") if r in roles[path]) + " fused"
        elif path in roles:
            role = ",".join(sorted(roles[path], key=_ROLES.index))
        elif path not in in_all or module is head:
            role = "head"
        else:
            role = ""
        fan_in, fan_out = in_out_features(module)
        group = groups.setdefault(f"{generic}\0{fan_in}\0{fan_out}\0{role}", [generic, 0, fan_in, fan_out, role])
        group[1] += 1
    return tuple(LayerGroup(*g) for g in groups.values())
