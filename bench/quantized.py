"""A quantized frozen base (``model.quantize``) against the bf16 base, side by side: memory, step time and the
PEFT round trip. Prints JSON.

Three variants of the same LoRA trial on SmolLM2-135M, each in its own fresh process (its peak memory is its
own): ``bf16`` (``model.quantize: none``, ``model.dtype: bfloat16``), ``4bit`` (NF4, double quantization,
bf16 compute) and ``8bit`` (LLM.int8), the other modules in bf16. Each loads the base the way
``sweeps.models.load.load_model`` does (transformers' ``BitsAndBytesConfig``, the head unquantized), trains
LoRA r = 8 (alpha 16) on every linear layer through :func:`sweeps.training.trainer.run_trial` (a pack of
one; random token rows, every next token supervised), saves the adapter with ``lora_core.save_adapter``,
loads the same quantized base again and the adapter into it with PEFT (``PeftModel.from_pretrained``) and
with ``lora_core.load_adapter``, and compares their logits on held-out rows with the trained model's
(no autocast, eval mode).

Reported per variant: ``weights_bytes`` (the base's state dict: 4-bit weights two values a byte plus their
quantization constants, int8 weights plus their scales; a tied embedding counted once), the trial's peak
memory and median step time, the loss curve, ``peft_logits_max_abs_diff`` and ``reload_logits_max_abs_diff``
(with the logits' own scale), and ratios to ``bf16``.

Peak memory (``memory_kind``): on CUDA ``torch.cuda.max_memory_allocated`` over the trial (run_trial resets
it after the base is loaded: the trial's copy of the base, the adapter, AdamW, activations); on the CPU the
process's peak resident set size while the trial runs, above its resident size just before.

Models: ``smollm2-135m`` is the built-in (real weights); ``smollm2-shaped`` is its architecture with random
weights, saved to a temporary folder and loaded from there (for a GPU machine that cannot fetch the model).
bitsandbytes and accelerate must import (``pip install 'lora-sweep[quantize]'``); where they do not, the JSON
says so and nothing runs.

Usage: python bench/quantized.py [--model smollm2-135m] [--device cuda] [--steps 10] [--batch 8]
                                 [--length 256] [--variants bf16,4bit,8bit] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
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

VARIANTS = ("bf16", "4bit", "8bit")
QUANTIZE = {"bf16": "none", "4bit": "4bit", "8bit": "8bit"}
SMOLLM2 = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 2048,
           "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 100000.0}


class Preloaded:
    """A base-model cache holding one model already loaded: a deep copy per trial (as BaseModelCache.get)."""

    def __init__(self, loaded: Any) -> None:
        self.loaded = loaded

    def get(self, *args: Any, **kwargs: Any) -> Any:
        return dataclasses.replace(self.loaded, model=copy.deepcopy(self.loaded.model))


def shaped_dir(folder: Path) -> Path:
    """SmolLM2-135M's architecture with random weights (seed 0), saved as a transformers checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOLLM2)).save_pretrained(folder)
    return folder


def load_base(model: str, folder: Path | None, device: str, quantize: str) -> Any:
    """The base as ``load_model`` loads it: the built-in through load_model itself; the random-weights one
    (no tokenizer to load) through the same keywords and preparation (sweeps.models.quantize)."""
    import torch

    from sweeps.models.load import LoadedModel, load_model

    if model == "smollm2-135m":
        return load_model("smollm2-135m", "causal-lm", dtype="bfloat16", device=device, quantize=quantize)  # type: ignore[arg-type]
    from transformers import AutoModelForCausalLM

    from sweeps.models.quantize import after_load, quantization_kwargs

    dev = torch.device(device)
    kwargs: dict[str, Any] = {}
    if quantize != "none":
        kwargs = quantization_kwargs(quantize, torch.bfloat16, dev, ["lm_head"])  # type: ignore[arg-type]
    net = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **kwargs)
    if quantize == "none":
        net.to(dev)
    else:
        after_load(net, quantize)  # type: ignore[arg-type]
    return LoadedModel(net.eval(), None, "smollm2-shaped", str(folder), None, "causal-lm",  # type: ignore[arg-type]
                       torch.bfloat16, dev, (), quantize)  # type: ignore[arg-type]


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


def state_bytes(model: Any) -> int:
    """Bytes of the model's state dict (quantization constants included), each storage once (tied weights)."""
    seen: set[int] = set()
    total = 0
    for t in model.state_dict().values():
        if hasattr(t, "data_ptr") and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def logits(model: Any, ids: Any) -> Any:
    import torch

    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def run_variant(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """One variant in this process: load, train through run_trial, save, reload in PEFT and lora_core."""
    import torch
    from peft import PeftModel

    import lora_core
    from sweeps.config.trial import load_trial_config
    from sweeps.training.runtime import peak_memory, reset_peak_memory, resident_memory
    from sweeps.training.trainer import run_trial

    quantize = QUANTIZE[variant]
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = shaped_dir(Path(tmp) / "base") if args.model == "smollm2-shaped" else None
        t0 = time.perf_counter()
        loaded = load_base(args.model, folder, args.device, quantize)
        load_s = time.perf_counter() - t0
        weights = state_bytes(loaded.model)
        allocated = torch.cuda.memory_allocated() if device.type == "cuda" else None
        vocab = loaded.model.config.vocab_size
        data = random_data(vocab, args.length, train=4 * args.batch, validation=8)
        config = load_trial_config(None, [
            "model.name=smollm2-135m", "model.task=causal-lm", f"model.device={args.device}", "model.dtype=bfloat16",
            f"model.quantize={quantize}", "data.name=null", f"data.files={tmp}/unused.jsonl",
            f"data.max_length={args.length}", "lora.r=8", "lora.alpha=16", "lora.targets=[all-linear]",
            "lora.dropout=0", "train.lr=1e-3", f"train.steps={args.steps}", f"train.batch_size={args.batch}",
            f"train.eval_every={args.steps}", "train.warmup_ratio=0", "train.eval_batch_size=8",
            "train.generate_samples=0", f"tracking.home={tmp}/home"])
        reset_peak_memory(device)  # (run_trial resets it again after its copy of the model: the trial's own peak)
        before = resident_memory() if device.type != "cuda" else None
        trial = run_trial(config, data=data, models=Preloaded(loaded))  # type: ignore[arg-type]
        result = trial.result
        assert result.state == "COMPLETE", result.reason
        peak, kind = peak_memory(device)
        lora_core.save_adapter(trial.model, Path(tmp) / "adapter")
        ids = torch.randint(1, vocab, (4, min(args.length, 64)), generator=torch.Generator().manual_seed(1)).to(device)
        ours = logits(trial.model, ids)
        del trial
        peft_model = PeftModel.from_pretrained(load_base(args.model, folder, args.device, quantize).model,
                                               str(Path(tmp) / "adapter"))
        peft = logits(peft_model, ids)
        del peft_model
        again = logits(lora_core.load_adapter(load_base(args.model, folder, args.device, quantize).model,
                                              Path(tmp) / "adapter"), ids)
    out: dict[str, Any] = {
        "variant": variant, "quantize": quantize, "load_s": load_s, "weights_bytes": weights,
        "step_time_s": result.step_time_s, "train_s": result.train_s,
        "loss_curve": [loss for _, loss in result.train_curve], "final_eval_loss": result.final_metrics.get("eval_loss"),
        "peft_logits_max_abs_diff": float((peft - ours).abs().max()),
        "reload_logits_max_abs_diff": float((again - ours).abs().max()),
        "logits_max_abs": float(ours.abs().max()),
    }
    out.update(trial_memory(device.type, result.peak_memory_bytes, peak, kind, before))
    if device.type == "cuda":
        out["allocated_after_load_bytes"] = allocated
    return out



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "smollm2-shaped"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print its JSON
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args, args.variant)))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    try:
        import accelerate  # noqa: F401 (transformers' bitsandbytes quantizer needs it)
        import bitsandbytes
    except Exception as exc:  # not installed, or no native library for this machine
        return emit({"hardware": hardware(args.device), "skipped": f"does not import: {exc}",
                     "hint": "pip install 'lora-sweep[quantize]'"}, args.out)
    runs: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    for variant in variants:
        cmd = [sys.executable, __file__, "--variant", variant, "--model", args.model, "--device", args.device,
               "--steps", str(args.steps), "--batch", str(args.batch), "--length", str(args.length)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"variant {variant} failed (exit {proc.returncode})")
        runs[variant] = r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"# {variant}: weights {r['weights_bytes'] / 2**20:.0f} MiB, peak {r['peak_memory_bytes'] / 2**20:.0f} MiB, "
              f"step {r['step_time_s']:.3f} s, PEFT |diff| {r['peft_logits_max_abs_diff']:.2g}", file=sys.stderr)
    ratios: dict[str, dict[str, float]] = {}
    if "bf16" in runs:
        ref = runs["bf16"]
        for variant, r in runs.items():
            if variant != "bf16":
                ratios[variant] = {k: r[k] / ref[k] for k in ("weights_bytes", "peak_memory_bytes", "step_time_s")}
    out = {
        "hardware": hardware(args.device), "model": args.model, "bitsandbytes": bitsandbytes.__version__,
        "trial": {"batch": args.batch, "tokens": args.length, "steps": args.steps, "lora": "all-linear r=8 alpha=16",
                  "dtype": "bfloat16 (+ bf16 autocast on CUDA); 4bit: NF4 + double quantization, bf16 compute; "
                           "8bit: LLM.int8", "path": "run_trial (a pack of one)"},
        "memory_kind": next(iter(runs.values()))["memory_kind"] if runs else None,
        "ratio_to_bf16": ratios, "wall_s": time.perf_counter() - t0, "runs": runs,
    }
    return emit(out, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
