"""Attention-probability dropout per slot of a pack (lora_core.packed_attention): on in training, each
slot's masks from its own stream, the same alone and in a pack; SDPA, unchanged, in evaluation."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import lora_core.packed_attention as packed_attention
from lora_core import LoraConfig
from lora_core.packed import Pack

RATE = 0.3


def _model(tiny: Any, kind: str) -> nn.Module:
    """A tiny BERT or Llama with attention dropout RATE and no other base dropout (so the logits differ
    only through attention masks and LoRA)."""
    model = tiny.bert(seed=0, layers=2) if kind == "bert" else tiny.llama(seed=0)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    if kind == "bert":
        for m in model.modules():
            if type(m).__name__ == "BertSelfAttention":
                m.dropout.p = RATE
    else:
        for m in model.modules():
            if hasattr(m, "attention_dropout"):
                m.attention_dropout = RATE
    return model


def _pack(model: nn.Module, kind: str, seeds: list[int]) -> Pack:
    saved = ("classifier",) if kind == "bert" else ()
    pack = Pack(model, len(seeds), ["all-linear"], max_rank=4, modules_to_save=saved)
    assert pack.replace_dropout() > 0
    assert model.config._attn_implementation == packed_attention.ATTENTION
    for slot, seed in enumerate(seeds):
        pack.load(slot, LoraConfig(r=4, alpha=8, targets=["q", "v"], modules_to_save=list(saved)), seed=seed,
                  generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():  # B non-zero, so the adapter changes the logits
            for branch in pack.branches.values():
                branch.lora_B[slot].normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + 7))
    return pack


class Recorder:
    """Wraps ``attention_dropout`` to keep, per call (one per layer and forward), which probabilities it
    dropped (a bool tensor (batch, heads, q, k): above 0 before, 0 after), which were above 0, and what
    the kept ones were multiplied by."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, hashed: bool | None = None) -> None:
        self.masks: list[torch.Tensor] = []
        self.live: list[torch.Tensor] = []
        self.scales: list[torch.Tensor] = []
        original = packed_attention.attention_dropout

        def wrapped(lay: Any, site: int, probs: torch.Tensor, rate: float) -> torch.Tensor:
            out = original(lay, site, probs, rate, hashed=hashed)
            live = probs > 0
            self.masks.append((live & (out == 0)).detach())
            self.live.append(live.detach())
            kept = live & (out != 0)
            self.scales.append((out[kept] / probs[kept]).detach())
            return out

        monkeypatch.setattr(packed_attention, "attention_dropout", wrapped)

    def take(self) -> list[torch.Tensor]:
        out, self.masks = self.masks, []
        return out


def _forward(model: nn.Module, pack: Pack, layout: list[tuple[int, int]], ids: torch.Tensor,
             mask: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    with torch.no_grad(), pack.batch(layout, lengths):
        return model(input_ids=ids, attention_mask=mask).logits


def _batch(tiny: Any, rows: list[int], lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows per part, each part's rows of its own length, right-padded to the longest (as the collator)."""
    width = max(lengths)
    ids = tiny.ids(batch=sum(rows), length=width, seed=3)
    mask = torch.zeros_like(ids)
    start = 0
    for n, t in zip(rows, lengths, strict=True):
        mask[start:start + n, :t] = 1
        start += n
    return ids, mask


# "drawn": the CPU's per-part generators; "hashed": CUDA's counter hash (keep_mask), run here on the CPU.
WAYS = pytest.mark.parametrize("hashed", [False, True], ids=["drawn", "hashed"])


@WAYS
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_two_seeds_draw_different_attention_masks_at_the_rate(tiny, kind, hashed, monkeypatch) -> None:
    rec = Recorder(monkeypatch, hashed)
    ids, mask = _batch(tiny, [8], [12])
    masks = {}
    for seed in (0, 1):
        model = _model(tiny, kind).train()
        pack = _pack(model, kind, [seed])
        _forward(model, pack, [(0, 8)], ids, mask, [12])
        masks[seed] = rec.take()
        assert len(masks[seed]) == 2  # one per layer: attention dropout is on
    for a, b in zip(masks[0], masks[1], strict=True):
        assert not torch.equal(a, b)
    scales = torch.cat(rec.scales)
    assert torch.allclose(scales, torch.full_like(scales, 1 / (1 - RATE)), rtol=1e-5)  # inverted dropout
    dropped = sum(int(m.sum()) for m in masks[0] + masks[1]) / sum(int(v.sum()) for v in rec.live)
    # BERT: 2 seeds x 2 layers x 8 rows x 2 heads x 12 x 12 = 9,216 live probabilities (Llama: the causal
    # half, 4,992); 3 sigma of the dropped share is 0.014 (0.019).
    assert abs(dropped - RATE) < 0.03, dropped
    # The next forward of the same slot draws new masks (its forward count keys them).
    model = _model(tiny, kind).train()
    pack = _pack(model, kind, [0])
    _forward(model, pack, [(0, 8)], ids, mask, [12])
    first = rec.take()
    _forward(model, pack, [(0, 8)], ids, mask, [12])
    assert not torch.equal(first[0], rec.take()[0])


@WAYS
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_a_pack_of_two_gives_each_trial_the_masks_it_draws_alone(tiny, kind, hashed, monkeypatch) -> None:
    """Slots of unequal rows and lengths in one forward (right-padded to the longest): each part's
    masks over its own rows and positions, and its logits, are those of the same trial alone."""
    rec = Recorder(monkeypatch, hashed)
    rows, lengths, seeds = [3, 5], [9, 6], [11, 12]
    ids, mask = _batch(tiny, rows, lengths)
    model = _model(tiny, kind).train()
    pack = _pack(model, kind, seeds)
    packed = _forward(model, pack, [(0, 3), (1, 5)], ids, mask, lengths)
    packed_masks = rec.take()
    start = 0
    for slot, (n, t, seed) in enumerate(zip(rows, lengths, seeds, strict=True)):
        solo_model = _model(tiny, kind).train()
        solo = _pack(solo_model, kind, [seed])
        part = slice(start, start + n)
        logits = _forward(solo_model, solo, [(0, n)], ids[part, :t], mask[part, :t], [t])
        alone_masks = rec.take()
        assert len(alone_masks) == len(packed_masks) == 2
        for p, a in zip(packed_masks, alone_masks, strict=True):
            assert a.any() and torch.equal(p[part, :, :t, :t], a), f"slot {slot}"
        got = packed[part, :t] if kind == "llama" else packed[part]
        tiny.assert_f32_close(got, logits, msg=f"slot {slot}")
        start += n


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_evaluation_is_sdpa_unchanged_and_remove_restores_it(tiny, kind) -> None:
    ids, mask = _batch(tiny, [4], [10])
    reference = _model(tiny, kind).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
    model = _model(tiny, kind).eval()
    pack = Pack(model, 1, ["all-linear"], max_rank=2, modules_to_save=("classifier",) if kind == "bert" else ())
    pack.replace_dropout()
    pack.load(0, LoraConfig(r=2, alpha=2, targets=["q", "v"],
                            modules_to_save=["classifier"] if kind == "bert" else []))  # B = 0: the base model
    with torch.no_grad(), pack.only(0):
        got = model(input_ids=ids, attention_mask=mask).logits
    tiny.assert_f32_close(got, expected)
    pack.remove()
    assert model.config._attn_implementation == "sdpa"
    assert not any(packed_attention.SITE_ATTR in m.__dict__ for m in model.modules())
