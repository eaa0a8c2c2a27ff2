"""Gradient checkpointing against none, side by side: peak memory, step time and the loss. Prints JSON.

Both variants (``train.gradient_checkpointing`` false / true) train the same LoRA trial through
:func:`sweeps.training.trainer.run_trial` (a pack of one): SmolLM2-135M, LoRA r = 8 (alpha 16) on every
linear layer, batch 8 x 256 tokens (random token ids, every next token supervised), dropout 0, a few
steps and one evaluation (8 rows) at the end. Float32 on the CPU; on CUDA the model in bf16 with bf16
autocast, as the trainer runs it there. Each variant runs in its own fresh process, so that its peak
memory is its own, and the variants alternate over ``--repeats`` rounds.

Models: ``smollm2-135m`` is the built-in (real weights: loading dequantizes its GGUF, the ``gguf``
extra); ``smollm2-shaped`` is its architecture with random weights, for a GPU machine that cannot fetch
the model (memory and time are the architecture's).

Peak memory, what it measures (``memory_kind``):

* CUDA: ``torch.cuda.max_memory_allocated`` over the trial (run_trial resets the peak after the model
  is loaded): the base model's copy, the adapter, AdamW's state, activations, logits;
* CPU: the process's peak resident set size (``VmHWM``) while the trial runs, above its resident set
  size just before. The base model is loaded first (into the worker's base-model cache, as in a
  sweep), then the kernel's peak counter is reset (``/proc/self/clear_refs`` 5), then run_trial copies
  the model, trains and evaluates. (tracemalloc does not see torch's allocations; ``ru_maxrss`` would
  include the GGUF dequantization's peak at load time.)

Reported per variant: the median peak and median step time over rounds, the loss curves; and
``loss_max_abs_diff`` between the variants' curves (the same computation: expected 0).

Usage: python bench/checkpointing.py [--model smollm2-135m] [--device cpu] [--steps 4] [--batch 8]
                                     [--length 256] [--repeats 1] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from bench.common import emit, hardware, trial_memory

VARIANTS = ("off", "on")
SMOLLM2 = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 2048,
           "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 100000.0}


class Preloaded:
    """A base-model cache holding one model already loaded: a deep copy per trial (BaseModelCache's get)."""

    def __init__(self, loaded: Any) -> None:
        self.loaded = loaded

    def get(self, *args: Any, **kwargs: Any) -> Any:
        import copy
        import dataclasses

        return dataclasses.replace(self.loaded, model=copy.deepcopy(self.loaded.model))


def random_data(vocab: int, length: int, train: int, validation: int) -> Any:
    """Random token rows of exactly ``length`` tokens, every token a label (no padding)."""
    import torch

    from sweeps.data.examples import PadCollator, PreparedData

    gen = torch.Generator().manual_seed(0)

    def rows(n: int) -> list[dict[str, list[int]]]:
        ids = torch.randint(1, vocab, (n, length), generator=gen).tolist()
        return [{"input_ids": x, "labels": list(x)} for x in ids]

    return PreparedData(task="causal-lm", train=rows(train), validation=rows(validation), test=rows(2),  # type: ignore[arg-type]
                        collate=PadCollator(pad_id=0, causal=True), label_names=None, num_labels=None,
                        majority_rate=None, generation={}, source="random tokens", fingerprint="random")


def load_base(model: str, device: str, dtype: str) -> Any:
    import torch

    from sweeps.models.load import LoadedModel, load_model

    if model == "smollm2-135m":
        return load_model("smollm2-135m", "causal-lm", dtype=dtype, device=device)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    net = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).to(device=device, dtype=getattr(torch, dtype)).eval()
    return LoadedModel(net, None, "smollm2-shaped", "smollm2-shaped", None, "causal-lm",  # type: ignore[arg-type]
                       getattr(torch, dtype), torch.device(device), ())


def run_variant(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """One variant in this process: load, reset the peak, run the trial; the measurements."""
    import torch

    from sweeps.config.trial import load_trial_config
    from sweeps.training.runtime import peak_memory, reset_peak_memory, resident_memory
    from sweeps.training.trainer import run_trial

    device = torch.device(args.device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    loaded = load_base(args.model, args.device, dtype)
    data = random_data(loaded.model.config.vocab_size, args.length, train=4 * args.batch, validation=8)
    with tempfile.TemporaryDirectory() as home:
        config = load_trial_config(None, [
            "model.name=smollm2-135m", "model.task=causal-lm", f"model.device={args.device}", f"model.dtype={dtype}",
            "data.name=null", f"data.files={home}/unused.jsonl", f"data.max_length={args.length}",
            "lora.r=8", "lora.alpha=16", "lora.targets=[all-linear]", "lora.dropout=0", "train.lr=1e-3",
            f"train.steps={args.steps}", f"train.batch_size={args.batch}", f"train.eval_every={args.steps}",
            "train.warmup_ratio=0", "train.eval_batch_size=8", "train.generate_samples=0",
            f"train.gradient_checkpointing={'true' if variant == 'on' else 'false'}", f"tracking.home={home}"])
        reset_peak_memory(device)  # (run_trial resets it again after its copy of the model: the trial's own peak)
        before = resident_memory() if device.type != "cuda" else None
        t0 = time.perf_counter()
        result = run_trial(config, data=data, models=Preloaded(loaded)).result  # type: ignore[arg-type]
        wall = time.perf_counter() - t0
    assert result.state == "COMPLETE", result.reason
    out: dict[str, Any] = {"variant": variant, "step_time_s": result.step_time_s, "train_s": result.train_s,
                           "wall_s": wall, "loss_curve": [loss for _, loss in result.train_curve],
                           "final_eval_loss": result.final_metrics.get("eval_loss")}
    out.update(trial_memory(device.type, result.peak_memory_bytes, *peak_memory(device), before))
    return out



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "smollm2-shaped"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print its JSON
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args, args.variant)))
        return 0
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for rep in range(args.repeats):
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--variant", variant, "--model", args.model, "--device", args.device,
                   "--steps", str(args.steps), "--batch", str(args.batch), "--length", str(args.length)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"variant {variant} failed (exit {proc.returncode})")
            runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = runs[variant][-1]
            print(f"# round {rep + 1} checkpointing {variant}: peak {r['peak_memory_bytes'] / 2**20:.0f} MiB, "
                  f"step {r['step_time_s']:.2f} s", file=sys.stderr)
    med = {v: {k: statistics.median(r[k] for r in rs) for k in ("peak_memory_bytes", "step_time_s")}
           for v, rs in runs.items()}
    off, on = runs["off"][0]["loss_curve"], runs["on"][0]["loss_curve"]
    out = {
        "hardware": hardware(args.device), "model": args.model,
        "trial": {"batch": args.batch, "tokens": args.length, "steps": args.steps, "lora": "all-linear r=8 alpha=16",
                  "dtype": "bfloat16 + autocast" if args.device.startswith("cuda") else "float32",
                  "path": "run_trial (a pack of one)"},
        "repeats": args.repeats, "memory_kind": runs["off"][0]["memory_kind"], "median": med,
        "ratio_on_to_off": {"peak_memory": med["on"]["peak_memory_bytes"] / med["off"]["peak_memory_bytes"],
                            "step_time": med["on"]["step_time_s"] / med["off"]["step_time_s"]},
        "loss_max_abs_diff": max(abs(a - b) for a, b in zip(off, on, strict=True)),
        "runs": runs,
    }
    return emit(out, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
