"""Per-trial attention-probability dropout (issue 24) checked on a device: prints JSON, exits 1 if a check fails.

The tests check it on the CPU (tests/test_packed_attention.py, both ways of drawing: per-part generators
and the counter hash). This runs the same checks where the hash is the default, on CUDA, with the pack's
real attention function (``lora_core.packed_attention.keyed_attention``), for a BERT-style encoder and a
Llama-style decoder with grouped-query attention, both built from configs with random weights (no
download), float32:

* ``pack_vs_alone``: a pack of two slots (unequal rows and sequence lengths, right-padded to the longest)
  in training mode: each slot's attention masks (which probabilities were dropped, over its own rows and
  positions) are those it draws alone, bit for bit, and its logits agree within ``atol``;
* ``seeds_differ``: two seeds draw different masks;
* ``dropped_share``: the share of live probabilities dropped, against the rate (3 sigma given).

Usage: python bench/attention_check.py [--device cuda] [--rate 0.2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from bench.common import emit


def build(kind: str, rate: float, device: str) -> Any:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(
            vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=rate))
    else:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, attention_dropout=rate))
    return model.to(device).train()


def masks_of(kind: str, rate: float, device: str, parts: list[tuple[int, int, int]], ids: Any, mask: Any,
             ) -> tuple[Any, list[Any], list[Any]]:
    """Logits, dropped masks and live masks (one per layer) of one training forward of a pack whose
    slots hold ``parts`` = (seed, rows, length)."""
    import torch

    import lora_core.packed_attention as pa
    from lora_core import LoraConfig
    from lora_core.packed import Pack

    model = build(kind, rate, device)
    saved = ("classifier",) if kind == "bert" else ()
    pack = Pack(model, len(parts), ["all-linear"], max_rank=4, modules_to_save=saved)
    pack.replace_dropout()
    for slot, (seed, _, _) in enumerate(parts):
        pack.load(slot, LoraConfig(r=4, alpha=8, targets=["q", "v"], modules_to_save=list(saved)), seed=seed,
                  generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            for branch in pack.branches.values():
                branch.lora_B[slot].copy_(torch.randn(branch.lora_B[slot].shape,
                                                      generator=torch.Generator().manual_seed(seed + 7)) * 0.5)
    dropped: list[Any] = []
    live: list[Any] = []
    original = pa.attention_dropout

    def wrapped(lay: Any, site: int, probs: Any, r: float, hashed: bool | None = None) -> Any:
        out = original(lay, site, probs, r, hashed)
        dropped.append(((probs > 0) & (out == 0)).cpu())
        live.append((probs > 0).cpu())
        return out

    pa.attention_dropout = wrapped
    try:
        with torch.no_grad(), pack.batch([(i, n) for i, (_, n, _) in enumerate(parts)], [t for _, _, t in parts]):
            logits = model(input_ids=ids, attention_mask=mask).logits.float().cpu()
    finally:
        pa.attention_dropout = original
    return logits, dropped, live


def check(kind: str, rate: float, device: str) -> dict[str, Any]:
    import torch

    parts = [(11, 3, 40), (12, 5, 24)]  # (seed, rows, own length)
    width = max(t for _, _, t in parts)
    ids = torch.randint(1, 1000, (sum(n for _, n, _ in parts), width), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros_like(ids)
    start = 0
    for _, n, t in parts:
        mask[start:start + n, :t] = 1
        start += n
    ids, mask = ids.to(device), mask.to(device)
    packed, packed_dropped, live = masks_of(kind, rate, device, parts, ids, mask)
    out: dict[str, Any] = {"layers": len(packed_dropped)}
    start, same_masks, worst, dropped, n_live = 0, True, 0.0, 0, 0
    for seed, n, t in parts:
        rows = slice(start, start + n)
        dropped += sum(int(d[rows, :, :t, :t].sum()) for d in packed_dropped)  # over its own rows and positions
        n_live += sum(int(v[rows, :, :t, :t].sum()) for v in live)
        logits, alone, _ = masks_of(kind, rate, device, [(seed, n, t)], ids[rows, :t], mask[rows, :t])
        same_masks &= all(torch.equal(p[rows, :, :t, :t], a) for p, a in zip(packed_dropped, alone, strict=True))
        got = packed[rows, :t] if kind == "llama" else packed[rows]
        worst = max(worst, (got - logits).abs().max().item())
        start += n
    _, other, _ = masks_of(kind, rate, device, [(99, 3, 40), (12, 5, 24)], ids, mask)
    share = dropped / n_live
    sigma = math.sqrt(rate * (1 - rate) / n_live)
    out.update({
        "pack_vs_alone": {"masks_equal": bool(same_masks), "max_abs_logit_diff": worst, "atol": 1e-4,
                          "ok": bool(same_masks and worst <= 1e-4)},
        "seeds_differ": {"ok": not torch.equal(other[0][:3], packed_dropped[0][:3])},
        "dropped_share": {"share": share, "rate": rate, "live": n_live, "three_sigma": 3 * sigma,
                          "ok": abs(share - rate) <= 3 * sigma},
    })
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rate", type=float, default=0.2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import torch

    hardware = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"cpu {os.cpu_count()} cores"
    result: dict[str, Any] = {"hardware": hardware, "torch": torch.__version__, "device": args.device,
                              "checks": {kind: check(kind, args.rate, args.device) for kind in ("bert", "llama")}}
    result["ok"] = all(c["ok"] for c in result["checks"].values())
    emit(result, args.out)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
