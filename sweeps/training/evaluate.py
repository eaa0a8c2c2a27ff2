"""Validation and test metrics for a trial, computed the same way at training time and at export.

classification: accuracy, macro-F1, eval_loss (mean cross-entropy per example).
causal-lm: eval_loss (mean cross-entropy per completion token), perplexity = exp(eval_loss), and
exact_match of greedy generations on a sample (when ``generate`` is set).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from sweeps.config.trial import TrialConfig
from sweeps.data.prepare import PreparedData

CAUSAL_EVAL_BATCH = 16  # logits are batch x length x vocab: keep them small


def _autocast(device: torch.device) -> AbstractContextManager[Any]:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _by_length(examples: list[dict[str, Any]], batch_size: int) -> list[list[dict[str, Any]]]:
    """Batches of similar length (less padding); the order is deterministic."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i]["input_ids"]), i))
    return [[examples[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]


def macro_f1(pred: torch.Tensor, gold: torch.Tensor, num_labels: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in gold or predictions."""
    scores = []
    for c in range(num_labels):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


@torch.inference_mode()
def evaluate(model: nn.Module, data: PreparedData, split: str, config: TrialConfig, tokenizer: Any,
             generate: bool = False) -> dict[str, float]:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    examples = getattr(data, split)
    try:
        if data.task == "classification":
            return _eval_classification(model, data, examples, config.train.eval_batch_size, device)
        metrics = _eval_causal(model, data, examples, device, min(config.train.eval_batch_size, CAUSAL_EVAL_BATCH))
        if generate and config.train.generate_samples > 0:
            metrics["exact_match"] = exact_match(model, tokenizer, generation_sample(data, split, config.train.generate_samples),
                                                 config.train.max_new_tokens, device,
                                                 add_special_tokens=not config.data.chat_template)
        return metrics
    finally:
        model.train(was_training)


def _eval_classification(model: nn.Module, data: PreparedData, examples: list[dict], batch_size: int,
                         device: torch.device) -> dict[str, float]:
    preds, golds, loss_sum = [], [], 0.0
    for chunk in _by_length(examples, batch_size):
        batch = {k: v.to(device) for k, v in data.collate(chunk).items()}
        labels = batch.pop("labels")
        with _autocast(device):
            logits = model(**batch).logits.float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        preds.append(logits.argmax(-1).cpu())
        golds.append(labels.cpu())
    pred, gold = torch.cat(preds), torch.cat(golds)
    n = len(gold)
    return {"accuracy": float((pred == gold).float().mean()), "macro_f1": macro_f1(pred, gold, data.num_labels or 0),
            "eval_loss": loss_sum / n}


def _eval_causal(model: nn.Module, data: PreparedData, examples: list[dict], device: torch.device,
                 batch_size: int) -> dict[str, float]:
    loss_sum, tokens = 0.0, 0
    for chunk in _by_length(examples, batch_size):
        batch = {k: v.to(device) for k, v in data.collate(chunk).items()}
        labels = batch.pop("labels")
        with _autocast(device):
            logits = model(**batch).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        loss_sum += float(F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                          ignore_index=-100, reduction="sum"))
        tokens += int((shift_labels != -100).sum())
    eval_loss = loss_sum / max(tokens, 1)
    return {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50.0))}


def generation_sample(data: PreparedData, split: str, n: int) -> list[tuple[str, str]]:
    """``n`` (prompt, completion) pairs spread evenly over the split (splits can be sorted by name)."""
    pairs: Sequence[tuple[str, str]] = data.generation.get(split, [])
    if n >= len(pairs):
        return list(pairs)
    return [pairs[i * len(pairs) // n] for i in range(n)]


def exact_match(model: nn.Module, tokenizer: Any, pairs: list[tuple[str, str]], max_new_tokens: int,
                device: torch.device, batch_size: int = 16, add_special_tokens: bool = True) -> float:
    """Fraction of prompts whose greedy completion (first line, stripped) equals the expected text."""
    if not pairs:
        return 0.0
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    hits = 0
    try:
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s:s + batch_size]
            enc = tokenizer([p for p, _ in chunk], return_tensors="pt", padding=True,
                            add_special_tokens=add_special_tokens).to(device)
            with _autocast(device):
                out = cast(Any, model).generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                                pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for text, (_, expected) in zip(texts, chunk, strict=True):
                got = text.strip().splitlines()[0].strip() if text.strip() else ""
                hits += int(got == expected.strip())
    finally:
        tokenizer.padding_side = side
    return hits / len(pairs)
