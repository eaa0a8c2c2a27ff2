"""Resolving ``LoraConfig.targets`` to the linear layers of a concrete model.

Presets (``q``, ``k``, ``v``, ``o``, ``attn``, ``mlp``, ``all-linear``) are defined per architecture
family. Families whose attention keeps q, k and v in one fused matrix (GPT-2 ``c_attn``, GPT-NeoX
``query_key_value``, Phi-3 ``qkv_proj``) resolve ``q`` / ``k`` / ``v`` to *rows* of that matrix, so
``targets=["q", "v"]`` adapts only the q and v slices of the fused output.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lora_core.config import pattern_matches
from lora_core.errors import LoraError

ROLES = ("q", "k", "v", "o", "mlp")
PRESETS = {"q": ("q",), "k": ("k",), "v": ("v",), "o": ("o",), "attn": ("q", "k", "v", "o"), "mlp": ("mlp",)}
ALL_LINEAR = "all-linear"

# Output rows of a fused projection: (module, the model's transformers config) -> {role: LongTensor of rows}.
FusedRows = Callable[[nn.Module, Any], dict[str, torch.Tensor]]


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored as (in, out)."""
    return (any(cls.__name__ == "Conv1D" for cls in type(module).__mro__)
            and hasattr(module, "nf") and getattr(module, "weight", None) is not None)


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_of(module: nn.Module) -> torch.Tensor:
    """A linear-like module's ``weight`` tensor ((out, in); (in, out) for Conv1D)."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return w


def output_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's output head (``lm_head``) by transformers' ``get_output_embeddings``; None if it has none."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like module (an ``nn.Linear``'s own attributes: a
    quantized subclass stores its weight packed, see :mod:`lora_core.quantized`)."""
    if isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features)
    w = weight_of(module)
    return (int(w.shape[0]), int(w.shape[1])) if is_conv1d(module) else (int(w.shape[1]), int(w.shape[0]))


def _contiguous_rows(sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for role, size in sizes.items():
        out[role] = torch.arange(start, start + size)
        start += size
    return out


def _gpt2_rows(module: nn.Module, config: Any) -> dict[str, torch.Tensor]:
    _, out = in_out_features(module)
    if out % 3:
        raise LoraError(f"fused q/k/v layer has {out} outputs, not a multiple of 3")
    return _contiguous_rows({"q": out // 3, "k": out // 3, "v": out // 3})


def _neox_rows(module: nn.Module, config: Any) -> dict[str, torch.Tensor]:
    # GPT-NeoX views the output as [heads, 3 * head_dim]: q, k, v are interleaved per head.
    _, out = in_out_features(module)
    heads = int(config.num_attention_heads)
    head_dim = out // (3 * heads)
    base = torch.arange(heads) * 3 * head_dim
    offsets = torch.arange(head_dim)
    return {role: (base[:, None] + i * head_dim + offsets[None, :]).reshape(-1) for i, role in enumerate("qkv")}


def _phi3_rows(module: nn.Module, config: Any) -> dict[str, torch.Tensor]:
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return _contiguous_rows({"q": heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * head_dim})


@dataclass(frozen=True)
class Family:
    """Where q, k, v, o and the MLP live in one architecture family.

    ``roles`` maps each role to regexes searched at the end of a module path (``(^|\\.)`` is
    prepended and ``$`` appended). ``fused`` maps the regex of a fused q/k/v layer to a function
    giving each role's output rows.
    """

    name: str
    model_types: tuple[str, ...]
    roles: dict[str, tuple[str, ...]]
    fused: dict[str, FusedRows] = field(default_factory=dict)


FAMILIES: tuple[Family, ...] = (
    Family(
        "llama",
        ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2",
         "granite", "smollm3", "cohere", "starcoder2", "phi"),
        {"q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("o_proj", "dense"),
         "mlp": ("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "c_proj")},
    ),
    Family(
        "opt",
        ("opt", "bart", "mbart", "whisper", "m2m_100"),
        {"q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("out_proj",), "mlp": ("fc1", "fc2")},
    ),
    Family(
        "bert",
        ("bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie", "mpnet"),
        {"q": (r"attention\.self\.query", r"attention\.attn\.q"), "k": (r"attention\.self\.key", r"attention\.attn\.k"),
         "v": (r"attention\.self\.value", r"attention\.attn\.v"), "o": (r"attention\.output\.dense", r"attention\.attn\.o"),
         "mlp": (r"intermediate\.dense", r"layer\.\d+\.output\.dense")},
    ),
    Family(
        "distilbert",
        ("distilbert",),
        {"q": ("q_lin",), "k": ("k_lin",), "v": ("v_lin",), "o": ("out_lin",), "mlp": (r"ffn\.lin1", r"ffn\.lin2")},
    ),
    Family(
        "gpt2",
        ("gpt2",),
        {"o": (r"attn\.c_proj",), "mlp": (r"mlp\.c_fc", r"mlp\.c_proj")},
        {r"attn\.c_attn": _gpt2_rows},
    ),
    Family(
        "gpt_neox",
        ("gpt_neox",),
        {"o": (r"attention\.dense",), "mlp": (r"mlp\.dense_h_to_4h", r"mlp\.dense_4h_to_h")},
        {r"attention\.query_key_value": _neox_rows},
    ),
    Family(
        "phi3",
        ("phi3",),
        {"o": ("o_proj",), "mlp": ("gate_up_proj", "down_proj")},
        {"qkv_proj": _phi3_rows},
    ),
)


def _ends_with(regex: str, path: str) -> bool:
    return re.search(rf"(^|\.)(?:{regex})$", path) is not None


@dataclass
class TargetSite:
    """One linear layer to adapt. ``rows`` is None for the whole output, else the rows per role."""

    path: str
    module: nn.Module
    rows: dict[str, torch.Tensor] | None = None

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.rows) if self.rows is not None else ()


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name and is_linear_like(m)}


def family_of(model: nn.Module) -> Family | None:
    """The preset family for ``model``: by ``config.model_type``, else the first whose names fit."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    paths = list(linear_layers(model))
    for fam in FAMILIES:
        q_like = fam.roles.get("q", ()) + tuple(fam.fused)
        if any(_ends_with(rx, p) for rx in q_like for p in paths):
            return fam
    return None


def _backbone_prefix(model: nn.Module) -> str | None:
    prefix = getattr(model, "base_model_prefix", None)
    if isinstance(prefix, str) and prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return prefix
    return None


def _excluded_from_all_linear(model: nn.Module, modules_to_save: Iterable[str]) -> Callable[[str], bool]:
    head = output_embeddings(model)
    prefix = _backbone_prefix(model)
    saved = tuple(modules_to_save)

    def excluded(path: str) -> bool:
        module = model.get_submodule(path)
        if head is not None and module is head:
            return True
        if any(pattern_matches(s, path) or path.startswith(s + ".") for s in saved):
            return True
        # Heads live outside the backbone (classifier, score, lm_head, cls.predictions...).
        return prefix is not None and not (path == prefix or path.startswith(prefix + "."))

    return excluded


def resolve_targets(
    model: nn.Module, targets: Iterable[str], modules_to_save: Iterable[str] = ()
) -> list[TargetSite]:
    """Turn target names into the concrete layers (and fused rows) to adapt, in model order.

    Raises:
        LoraError: a target names no linear layer (the message lists the model's linear layers), or
            a preset is not defined for this architecture.
    """
    layers = linear_layers(model)
    fam = family_of(model)
    whole: set[str] = set()
    fused_roles: dict[str, set[str]] = {}
    fused_fn: dict[str, FusedRows] = {}
    for target in targets:
        hits: set[str] = set()
        if target == ALL_LINEAR:
            excluded = _excluded_from_all_linear(model, modules_to_save)
            hits = {p for p in layers if not excluded(p)}
            whole |= hits
        elif target in PRESETS:
            if fam is None:
                raise LoraError(
                    f"preset {target!r} is not defined for this model (model_type="
                    f"{getattr(getattr(model, 'config', None), 'model_type', None)!r})",
                    hint=f"name the layers instead; linear layers: {_summarise(layers)}",
                )
            for role in PRESETS[target]:
                for rx in fam.roles.get(role, ()):
                    found = {p for p in layers if _ends_with(rx, p)}
                    hits |= found
                    whole |= found
                if role in ("q", "k", "v"):
                    for rx, fn in fam.fused.items():
                        for p in layers:
                            if _ends_with(rx, p):
                                hits.add(p)
                                fused_roles.setdefault(p, set()).add(role)
                                fused_fn[p] = fn
        else:
            hits = {p for p in layers if pattern_matches(target, p)}
            whole |= hits
        if not hits:
            raise LoraError(
                f"target {target!r} matches no linear layer of this model",
                hint=f"use a preset (q, k, v, o, attn, mlp, all-linear) or one of: {_summarise(layers)}",
            )
    sites = []
    config = getattr(model, "config", None)
    for path, module in layers.items():
        if path in whole:
            sites.append(TargetSite(path, module))
        elif path in fused_roles:
            all_rows = fused_fn[path](module, config)
            roles = [r for r in ("q", "k", "v") if r in fused_roles[path]]
            sites.append(TargetSite(path, module, {r: all_rows[r] for r in roles}))
    return sites


def _summarise(layers: dict[str, nn.Module], limit: int = 12) -> str:
    """Distinct layer names with layer numbers collapsed (``model.layers.*.self_attn.q_proj``)."""
    seen: list[str] = []
    for path in layers:
        generic = re.sub(r"\.\d+\.", ".*.", path)
        if generic not in seen:
            seen.append(generic)
    more = f" ... ({len(seen) - limit} more)" if len(seen) > limit else ""
    return ", ".join(seen[:limit]) + more
