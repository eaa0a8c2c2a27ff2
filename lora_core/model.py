"""Model-level LoRA operations: inject, switch, merge, unload.

The set of adapters on a model lives in an :class:`AdapterRegistry` stored on the model object
itself (``model._lora_registry``), so nothing is global and two models never share state.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from lora_core.config import LoraConfig, pattern_matches
from lora_core.errors import LoraError
from lora_core.layer import (
    LoraLayerMixin,
    LoraWeights,
    attach,
    check_mergeable,
    detach,
    new_weights_for,
    restore_base_class,
)
from lora_core.quantized import keep_training_layout, quantized_layers
from lora_core.targets import resolve_targets

_REGISTRY_ATTR = "_lora_registry"
_NAME_RE = re.compile(r"[A-Za-z0-9_\-]+")


@dataclass
class SavedModule:
    """A module trained in full alongside an adapter (``modules_to_save``), e.g. a classifier head.

    The module keeps its parameters and their names; each adapter owns its own copy of the values,
    swapped in when that adapter becomes active. ``base`` holds the original values for when no
    adapter (or one without this module) is active. ``live`` names whose values the module holds now.
    """

    path: str
    base: dict[str, torch.Tensor]
    per_adapter: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    live: str | None = None

    def show(self, module: nn.Module, name: str | None) -> None:
        """Put adapter ``name``'s values (or the base values, for None) into the module."""
        target = name if name in self.per_adapter else None
        if target == self.live:
            return
        params = dict(module.named_parameters())
        with torch.no_grad():
            if self.live is not None:
                for key, store in self.per_adapter[self.live].items():
                    store.copy_(params[key])
            source = self.base if target is None else self.per_adapter[target]
            for key, value in source.items():
                params[key].copy_(value)
        self.live = target

    def values(self, module: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s current values (read from the module if they are live)."""
        if self.live == name:
            return {k: p.detach() for k, p in module.named_parameters()}
        return self.per_adapter[name]


@dataclass
class AdapterInfo:
    name: str
    config: LoraConfig
    paths: list[str]
    saved_paths: list[str]


@dataclass
class AdapterRegistry:
    adapters: dict[str, AdapterInfo] = field(default_factory=dict)
    saved: dict[str, SavedModule] = field(default_factory=dict)
    active: str | None = None
    enabled: bool = True


def _stored_registry(model: nn.Module) -> AdapterRegistry | None:
    reg = model.__dict__.get(_REGISTRY_ATTR)
    return reg if isinstance(reg, AdapterRegistry) else None


def registry(model: nn.Module) -> AdapterRegistry:
    """The model's adapters. Raises LoraError if none were injected or loaded."""
    reg = _stored_registry(model)
    if reg is None or not reg.adapters:
        raise LoraError("this model has no LoRA adapter", hint="call lora_core.inject(model, config) or load_adapter first")
    return reg


def registry_or_new(model: nn.Module) -> AdapterRegistry:
    """The model's registry, created empty on first use (for code that is about to add an adapter)."""
    reg = _stored_registry(model)
    if reg is None:
        reg = AdapterRegistry()
        model.__dict__[_REGISTRY_ATTR] = reg
    return reg


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the model's adapters, in the order they were added."""
    reg = _stored_registry(model)
    return list(reg.adapters) if reg else []


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayerMixin]]:
    """``(path, layer)`` for every layer that carries LoRA adapters, in model order."""
    for path, module in model.named_modules():
        if isinstance(module, LoraLayerMixin):
            yield path, module


def lora_layer(model: nn.Module, path: str) -> LoraLayerMixin:
    """The LoRA layer at ``path`` (an adapter's registered path always holds one)."""
    module = model.get_submodule(path)
    if not isinstance(module, LoraLayerMixin):
        raise RuntimeError(f"{path} carries no LoRA adapter")
    return module


def resolve_saved_modules(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Paths of the modules named by ``modules_to_save`` (outermost matches only)."""
    paths: list[str] = []
    for pattern in patterns:
        hits = [p for p, _ in model.named_modules() if p and pattern_matches(pattern, p)]
        hits = [p for p in hits if not any(p.startswith(h + ".") for h in hits)]
        if not hits:
            raise LoraError(f"modules_to_save entry {pattern!r} matches no module of this model",
                            hint="name a module such as 'classifier' or 'score'")
        paths.extend(h for h in hits if h not in paths)
    return paths


def inject(model: nn.Module, config: LoraConfig, name: str = "default") -> nn.Module:
    """Add a LoRA adapter to ``model`` in place and make it the active, trainable one.

    The target modules stay where they are (same objects, same parameter names); everything except
    this adapter's A/B matrices and its ``modules_to_save`` is frozen. A is kaiming-uniform(a=sqrt(5))
    or Gaussian, B is zero, so the model's output is unchanged until B is trained.

    Returns:
        The same model object, for chaining.

    Raises:
        LoraError: bad adapter name, a name already in use, or targets that match nothing.
    """
    if not isinstance(config, LoraConfig):
        raise LoraError(f"config must be a LoraConfig, got {type(config).__name__}")
    check_adapter_name(name)
    if name in adapter_names(model):
        raise LoraError(f"adapter {name!r} already exists on this model", hint="pick another name")
    check_not_merged(model)  # the new adapter becomes the active one: fail before touching the model
    saved_paths = resolve_saved_modules(model, config.modules_to_save)
    sites = [s for s in resolve_targets(model, config.targets, config.modules_to_save)
             if not any(s.path == p or s.path.startswith(p + ".") for p in saved_paths)]
    prepare_quantized(model, saved_paths)
    reg = registry_or_new(model)  # only now: a failed inject leaves the model untouched
    for site in sites:
        r = config.rank_for(site.path)
        weights = new_weights_for(site.module, r, config.scaling_for(site.path), config.dropout, config.init, site.rows)
        attach(site.module, name, weights)
    register_adapter(model, reg, AdapterInfo(name, config, [s.path for s in sites], saved_paths))
    set_active_adapter(model, name)
    set_trainable(model, name)
    return model


def prepare_quantized(model: nn.Module, saved_paths: list[str]) -> None:
    """Before adapters go onto a model with quantized layers (:mod:`lora_core.quantized`): refuse a saved
    module that holds one (it is trained in full, a quantized weight cannot be), and keep the 4-bit
    layers in their training layout (:func:`~lora_core.quantized.keep_training_layout`)."""
    for path in saved_paths:
        inner = [p for p, _ in quantized_layers(model.get_submodule(path))]
        if inner:
            where = f"{path}.{inner[0]}" if inner[0] else path
            raise LoraError(f"modules_to_save {path!r} holds the quantized layer {where}, which cannot be trained in full",
                            hint="load the base with that module left unquantized (transformers: "
                                 "BitsAndBytesConfig(llm_int8_skip_modules=[...])), or do not save it")
    keep_training_layout(model)


def register_adapter(model: nn.Module, reg: AdapterRegistry, info: AdapterInfo) -> None:
    """Record adapter ``info`` (already attached to its layers) and give it its own copy of each saved module."""
    for path in info.saved_paths:
        module = model.get_submodule(path)
        if path not in reg.saved:
            base = {k: p.detach().clone() for k, p in module.named_parameters()}
            reg.saved[path] = SavedModule(path, base)
        saved = reg.saved[path]
        saved.per_adapter[info.name] = {k: v.clone() for k, v in saved.base.items()}
    reg.adapters[info.name] = info


def check_adapter_name(name: str) -> None:
    """Raise LoraError unless ``name`` is a valid adapter name (letters, digits, ``_``, ``-``)."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise LoraError(f"adapter name {name!r} is not valid", hint="use letters, digits, '_' or '-'")


def set_trainable(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze adapter ``name``'s LoRA matrices and saved modules.

    Returns the trainable parameters (what to hand to the optimizer).
    """
    reg = registry(model)
    name = resolve_name(reg, name)
    if reg.active != name or not reg.enabled:
        set_active_adapter(model, name)
    for p in model.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    info = reg.adapters[name]
    for path in info.paths:
        weights = lora_layer(model, path).adapter_weights(name)
        params += [weights.lora_A, weights.lora_B]
    for path in info.saved_paths:
        params += list(model.get_submodule(path).parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def set_active_adapter(model: nn.Module, name: str) -> None:
    """Make adapter ``name`` the one applied in forward (and re-enable adapters if disabled)."""
    reg = registry(model)
    if name not in reg.adapters:
        raise LoraError(f"no adapter named {name!r}", hint=f"adapters on this model: {', '.join(reg.adapters)}")
    check_not_merged(model, allow=name)
    reg.active = name
    reg.enabled = True
    _apply_state(model, reg)


def check_not_merged(model: nn.Module, allow: str | None = None) -> None:
    """Raise LoraError if an adapter other than ``allow`` is merged into any layer's weights."""
    for path, layer in lora_layers(model):
        merged = [n for n in layer.lora_merged if n != allow]
        if merged:
            raise LoraError(f"adapter {merged[0]!r} is merged into {path}",
                            hint="call lora_core.unmerge(model) before switching or disabling adapters")


def _apply_state(model: nn.Module, reg: AdapterRegistry) -> None:
    active = (reg.active,) if reg.active is not None else ()
    for _, layer in lora_layers(model):
        layer.lora_active = active
        layer.lora_enabled = reg.enabled
    shown = reg.active if reg.enabled else None
    for path, saved in reg.saved.items():
        saved.show(model.get_submodule(path), shown)


def disable_adapters(model: nn.Module) -> None:
    """Run the base model: no LoRA branch, original ``modules_to_save`` values."""
    reg = registry(model)
    check_not_merged(model)
    reg.enabled = False
    _apply_state(model, reg)


def enable_adapters(model: nn.Module) -> None:
    reg = registry(model)
    reg.enabled = True
    _apply_state(model, reg)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``with adapters_disabled(model): ...`` runs the base model, then restores the adapters."""
    reg = registry(model)
    was = reg.enabled
    disable_adapters(model)
    try:
        yield model
    finally:
        reg.enabled = was
        _apply_state(model, reg)


def active_adapter(model: nn.Module) -> str | None:
    """The active adapter's name; None for a model without adapters or after its active one was deleted."""
    reg = _stored_registry(model)
    return reg.active if reg else None


def adapter_info(model: nn.Module, name: str | None = None) -> AdapterInfo:
    """Adapter ``name``'s config and the paths it adapts (default: the active adapter)."""
    reg = registry(model)
    return reg.adapters[resolve_name(reg, name)]


def resolve_name(reg: AdapterRegistry, name: str | None) -> str:
    """``name``, or the active adapter's name when it is None; LoraError if there is no such adapter."""
    listed = f"adapters on this model: {', '.join(reg.adapters)}"
    if not name:
        if reg.active is None:
            raise LoraError("no adapter is active", hint=f"call lora_core.set_active_adapter(model, name); {listed}")
        name = reg.active
    if name not in reg.adapters:
        raise LoraError(f"no adapter named {name!r}", hint=listed)
    return name


def lora_weights(model: nn.Module, name: str | None = None) -> dict[str, LoraWeights]:
    """``{module path: LoraWeights}`` of adapter ``name`` (default: the active one)."""
    info = adapter_info(model, name)
    return {path: lora_layer(model, path).adapter_weights(info.name) for path in info.paths}


def merge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Fold adapter ``name`` (default: the active one) into the base weights: ``W <- W0 + dW``.

    Forward then costs exactly the base model's; :func:`unmerge` undoes it.

    Arithmetic: ``dW = scaling * B @ A`` and ``W0 + dW`` are computed in ``promote_types(W.dtype,
    float32)``, then cast to W's dtype once: float32 weights stay float32 and float64 weights float64
    (merge then unmerge gives W0 back up to that dtype's rounding), while bfloat16 and float16 weights
    are computed in float32 and rounded once per merge and once per unmerge. For bfloat16 the bound
    after merge then unmerge is, element by element, ``|W - W0| <= one bf16 ulp at |W0 + dW|
    <= 2**-7 * |W0 + dW|``: merge stores ``W1 = bf16(W0 + dW)``, off by ``|e|`` <= half an ulp there;
    unmerge rounds ``W1 - dW = W0 + e`` to the nearest bf16 number, and W0 is one at distance ``|e|``,
    so the result is within ``2|e|`` of W0 (float16: the same with ``2**-10``). Most elements come back
    bit-exact.

    Raises:
        LoraError: the adapter is on a quantized (4-bit / 8-bit) layer, whose weight cannot take ``W0 + dW``
            in place; :func:`lora_core.dequantize.dequantize` the model first and merge into that copy.
    """
    info = adapter_info(model, name)
    for path in info.paths:  # all checked before any layer changes
        check_mergeable(lora_layer(model, path), path)
    reg = registry(model)
    if reg.active != info.name or not reg.enabled:
        set_active_adapter(model, info.name)
    for path in info.paths:
        lora_layer(model, path).merge_adapter(info.name)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract every merged adapter from the base weights again (rounding as :func:`merge` describes)."""
    for _, layer in lora_layers(model):
        for name in list(layer.lora_merged):
            layer.unmerge_adapter(name)
    return model


def merge_and_unload(model: nn.Module, name: str | None = None) -> nn.Module:
    """Merge the active adapter and remove all LoRA machinery: a plain model with the adapted weights.

    The modules in ``modules_to_save`` keep the adapter's trained values.
    """
    info = adapter_info(model, name)
    merge(model, info.name)
    reg = registry(model)
    for path, saved in reg.saved.items():
        saved.show(model.get_submodule(path), info.name if info.name in saved.per_adapter else None)
    for _, layer in list(lora_layers(model)):
        layer.lora_merged.clear()
        restore_base_class(layer)
    del model.__dict__[_REGISTRY_ATTR]
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove all adapters without merging: the original model again."""
    unmerge(model)
    reg = _stored_registry(model)
    if reg is not None:
        for path, saved in reg.saved.items():
            saved.show(model.get_submodule(path), None)
    for _, layer in list(lora_layers(model)):
        restore_base_class(layer)
    model.__dict__.pop(_REGISTRY_ATTR, None)
    return model


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; the other adapters stay as they are.

    Deleting the active adapter leaves no adapter active: the model then computes the base model's
    output (with the base values of ``modules_to_save``) until :func:`set_active_adapter` picks one of
    the remaining adapters, and calls that default to the active adapter (``merge(model)``,
    ``save_adapter(model, path)``, ``set_trainable(model)``...) raise LoraError until then. Another
    adapter is never activated implicitly. Deleting the last adapter removes all LoRA machinery.

    Raises:
        LoraError: there is no adapter ``name``, or it is merged into the weights (unmerge it first).
    """
    info = adapter_info(model, name)
    reg = registry(model)
    for path in info.paths:
        if info.name in lora_layer(model, path).lora_merged:
            raise LoraError(f"adapter {info.name!r} is merged into {path}",
                            hint="call lora_core.unmerge(model) before deleting it")
    for path in info.paths:
        detach(lora_layer(model, path), name)
    for path in info.saved_paths:
        saved = reg.saved[path]
        if saved.live == name:
            saved.show(model.get_submodule(path), None)
        del saved.per_adapter[name]
    del reg.adapters[name]
    if reg.active == name:
        reg.active = None
        _apply_state(model, reg)
    if not reg.adapters:
        del model.__dict__[_REGISTRY_ATTR]
