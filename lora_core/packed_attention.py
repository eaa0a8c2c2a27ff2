"""Attention-probability dropout per slot of a pack (BERT's ``attention_probs_dropout_prob``, Llama's
``attention_dropout``), each slot's masks from its own stream.

A transformers model computes attention through the function its ``config._attn_implementation``
names in ``transformers.AttentionInterface``; SDPA draws the attention dropout inside its kernel from
torch's one global generator, so a slot's masks there would depend on the rest of the pack. A pack
registers :func:`keyed_attention` under :data:`ATTENTION` and switches the model to it
(:func:`install`). In training, with a dropout rate above 0, it computes attention as the model's own
eager attention does (scores, mask, softmax in float32, dropout, values) and drops each part's
probabilities with that part's masks, keyed like every other packed dropout by (slot seed, the slot's
forward count, the attention module's path): on the CPU a ``bernoulli_`` per part from a generator
seeded by that key over the part's own rows and positions, on CUDA the counter hash of
:func:`lora_core.packed_layers.keep_mask`. Elsewhere (evaluation, generation, rate 0) it is SDPA as
the model uses it by default, with SDPA's masks. A trial alone (a pack of one) thus draws dropout
where the model's own attention does, at its rate, and gets the same masks in any pack.

transformers is imported here only when a pack installs the function (lora_core itself needs torch alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lora_core.errors import LoraError
from lora_core.packed_layers import Layout, PackState, keep_mask, mix

__all__ = ["ATTENTION", "AttentionSite", "attention_dropout", "attention_rate", "install", "keyed_attention",
           "uninstall"]

ATTENTION = "lora_keyed_dropout"  # the name in transformers' AttentionInterface (no "sdpa" in it: see below)
SITE_ATTR = "_lora_pack_attention"  # on each module that may call the attention function: its AttentionSite


@dataclass(frozen=True)
class AttentionSite:
    """What :func:`keyed_attention` needs of the module that calls it: the pack's state and its site."""

    state: PackState
    site: int
    path: str


def attention_rate(config: Any) -> float:
    """The attention-probability dropout rate a transformers config sets (0.0 when it names none)."""
    for name in ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop"):
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return 0.0


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, keyed_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # SDPA's masks: boolean (True = attend) or None


def install(model: nn.Module, state: PackState, site_of: Any) -> str | None:
    """Switch ``model`` to :func:`keyed_attention`, giving every module that may call it its site
    (``site_of(path)``). Returns the implementation it replaced (for :func:`uninstall`), or None when the
    model is not a transformers model with an attention interface and sets no attention dropout.

    Raises:
        LoraError: the model sets an attention dropout rate but cannot take an attention function
            (it does not compute attention through transformers' AttentionInterface), or it uses an
            implementation other than SDPA or eager (flash attention: its kernel draws the dropout).
    """
    config: Any = getattr(model, "config", None)
    settable = config is not None and hasattr(model, "set_attn_implementation") and bool(
        getattr(model, "_can_set_attn_implementation", lambda: False)())
    if not settable:
        if config is not None and attention_rate(config) > 0:
            raise LoraError(f"{type(model).__name__} has attention dropout {attention_rate(config):g} but does not "
                            "compute attention through transformers' AttentionInterface, so a pack cannot give each "
                            "trial its own attention masks", hint="set the model's attention dropout to 0 in its config")
        return None
    original = str(config._attn_implementation)
    if original not in ("sdpa", "eager"):
        raise LoraError(f"packed trials need SDPA or eager attention, the model uses {original}",
                        hint="load the model with attn_implementation='sdpa'")
    _register()
    model.set_attn_implementation(ATTENTION)  # type: ignore[operator]
    if config._attn_implementation != ATTENTION:
        raise LoraError(f"{type(model).__name__} did not take the keyed attention function "
                        f"(it uses {config._attn_implementation})", hint="this is a bug in lora_core.packed_attention")
    from transformers import PreTrainedModel

    for path, module in model.named_modules():
        if getattr(module, "config", None) is not None and not isinstance(module, PreTrainedModel):
            object.__setattr__(module, SITE_ATTR, AttentionSite(state, site_of(path), path))
    return original


def uninstall(model: nn.Module, original: str) -> None:
    """Undo :func:`install`: the model's attention implementation back to ``original``, the sites gone."""
    for module in model.modules():
        if SITE_ATTR in module.__dict__:
            object.__delattr__(module, SITE_ATTR)
    model.set_attn_implementation(original)  # type: ignore[operator]


def keyed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention-function signature: ``query`` (batch, heads, q, dim), ``key`` and
    ``value`` (batch, kv heads, k, dim); returns ``(output (batch, q, heads, dim), probabilities or None)``.
    With ``dropout`` above 0 in training mode: eager attention with each slot's own dropout masks;
    otherwise transformers' SDPA function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if dropout <= 0.0 or not module.training:
        out: tuple[torch.Tensor, torch.Tensor | None] = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=0.0, scaling=scaling, **kwargs)
        return out
    owner: AttentionSite | None = module.__dict__.get(SITE_ATTR)
    if owner is None:
        raise LoraError(f"{type(module).__name__} called the keyed attention with dropout {dropout:g} but has no "
                        "dropout site", hint="this is a bug in lora_core.packed_attention")
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise LoraError(f"{type(module).__name__}: the keyed attention supports neither softcap nor a position bias")
    if key.shape[1] != query.shape[1]:  # grouped-query attention: each kv head serves several query heads
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    q_len, k_len = query.shape[2], key.shape[2]
    scores = torch.matmul(query, key.transpose(2, 3)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :k_len]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    else:
        is_causal = kwargs.get("is_causal")
        if (is_causal if is_causal is not None else getattr(module, "is_causal", True)) and q_len > 1:
            future = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).triu(k_len - q_len + 1)
            scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    lay = owner.state.current(query.shape[0])
    probs = attention_dropout(lay, owner.site, probs, float(dropout))
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def attention_dropout(lay: Layout, site: int, probs: torch.Tensor, rate: float,
                      hashed: bool | None = None) -> torch.Tensor:
    """``probs`` (batch, heads, q, k) in batch order with each part's own dropout at ``rate``.

    Part i's mask depends only on its key, ``site``, its own rows, the heads and its own positions:
    ``hashed`` (default: on CUDA) :func:`keep_mask` of (row, head, q, k), one set of kernels for every
    part, which does not depend on the padded length; otherwise (the CPU, where the hash measured 8x
    slower than torch's own dropout) a block (rows, heads, t, t) with ``t`` the part's own length
    (``lay.positions``), drawn with ``bernoulli_`` from a generator seeded by (key, site) and placed in
    its rows (the padded positions, which carry no probability, keep 1)."""
    keys = lay.keys
    if keys is None or lay.seed_keys is None:
        raise LoraError("packed attention dropout ran without dropout keys", hint="this is a bug in lora_core.packed")
    n, heads, q_len, k_len = probs.shape
    if hashed if hashed is not None else probs.device.type == "cuda":
        rates = torch.full((len(lay.parts),), rate, dtype=torch.float32, device=probs.device)
        grouped = lay.group(probs.reshape(n, -1)).view(len(lay.parts), lay.rows, heads, q_len, k_len)
        keep = keep_mask(lay.seed_keys, site, (lay.rows, heads, q_len, k_len), rates)
        return lay.ungroup((grouped * keep.to(probs.dtype)).reshape(len(lay.parts), lay.rows, -1)).view(probs.shape)
    if q_len != k_len:
        raise LoraError(f"packed attention dropout needs self-attention over the batch (q {q_len}, k {k_len})",
                        hint="attention dropout applies in training, which has no cache")
    mask: torch.Tensor | None = None
    start = 0
    for i, (_, rows) in enumerate(lay.parts):
        t = min(q_len, lay.positions[i]) if lay.positions is not None else q_len
        gen = torch.Generator(device=probs.device).manual_seed(mix(keys[i], site))
        block = torch.empty(rows, heads, t, t, dtype=probs.dtype, device=probs.device).bernoulli_(1.0 - rate,
                                                                                                 generator=gen)
        block.mul_(1.0 / (1.0 - rate))
        if len(lay.parts) == 1 and t == q_len:  # one part, nothing padded: the block is the mask
            return probs * block
        if mask is None:
            mask = torch.ones_like(probs)
        mask[start:start + rows, :, :t, :t] = block
        start += rows
    assert mask is not None
    return probs * mask
