"""Benchmark lora_core's layer against PEFT and against the no-LoRA lower bound.

Everything is measured side by side in one process, in alternating repeats (A, B, C, A, B, C, ...),
and reported as medians and ratios, so machine noise hits every variant alike. Prints JSON.

Measured, per model and target set (r = 8):
  * training step (forward + backward + AdamW step): ours vs PEFT, and ours vs the lower bound:
    the base model with no LoRA where gradients still flow from the loss back to the input
    embeddings (all weights frozen), i.e. the cost no LoRA implementation can avoid;
  * memory of a training step: CUDA peak allocated on a GPU; on CPU the bytes a step keeps alive
    (activations saved for backward, counted once per storage, plus gradients and AdamW state);
  * inference latency: ours merged vs the base model; unmerged (ours and PEFT's) vs the base model;
  * for a fused q/k/v layer (gpt2-shaped q+v), that one layer's LoRA branch alone ("fused_layer",
    the base output y given): forward + backward and forward only of ours (each role's B block added
    into its own output rows) against the dense formulation ``y + s * (x A^T) expanded_B()^T`` (a
    zero-padded (out, k*r) B built on every call, how lora_core computed it before), with the frozen
    base layer's own time for scale.

``gpt2-shaped`` is not a downloaded model: GPT-2 small's layer shapes (hidden 768, 12 heads, MLP 3072,
fused ``c_attn`` 768 -> 2304) with 2 layers and a vocabulary of 2048, random weights (seed 0), batch 8 x 32. Its
``q+v`` case adapts the q and v rows of the fused ``c_attn`` (lora_core's per-role blocks); PEFT cannot
adapt row slices, so it gets a rank-8 LoRA on the whole ``c_attn``, which has exactly as many trainable
numbers (r * (768 + 2304) = 2 * r * (768 + 768)): ``ours/peft`` compares adapters of equal size, not the
same function.

Usage: python bench/layer.py [--models minilm-l6,smollm2-135m,gpt2-shaped] [--repeats 5] [--threads N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lora_core
from bench.common import emit

MODELS = {
    # alias: (task, batch, seq_len, peft/ours targets for "q+v" and "all-linear")
    "minilm-l6": ("classification", 32, 32, ["query", "value"]),
    "smollm2-135m": ("causal-lm", 8, 64, ["q_proj", "v_proj"]),
    "gpt2-shaped": ("causal-lm", 8, 32, ["c_attn"]),
}


def gpt2_shaped() -> nn.Module:
    """GPT-2 small's layers (768 wide, fused c_attn), 2 of them, vocabulary 2048; random weights, no download."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=2048, n_positions=64, n_embd=768, n_layer=2, n_head=12,
                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()  # as from_pretrained returns a model


def load_base(alias: str, device: torch.device) -> nn.Module:
    if alias == "gpt2-shaped":
        return gpt2_shaped().to(device)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from sweeps.models.load import resolve_model_path

    path = resolve_model_path(alias)
    task = MODELS[alias][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if task == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=8, local_files_only=True)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
    return model.to(device)


def make_batch(alias: str, model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    task, batch, seq, _ = MODELS[alias]
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out["labels"] = torch.randint(0, 8, (batch,), generator=g) if task == "classification" else ids.clone()
    return {k: v.to(device) for k, v in out.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Trainer:
    """One variant's training step; ``embed_grad`` makes the input embeddings' output require grad."""

    def __init__(self, model: nn.Module, batch: dict, device: torch.device, embed_grad: bool = False) -> None:
        self.model, self.batch, self.device = model.train(), batch, device
        # Disable dropout everywhere so every variant does the same work.
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        if embed_grad:
            model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))

    def step(self) -> None:
        with autocast(self.device):
            loss = self.model(**self.batch).loss
        loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)


def step_memory(trainer: Trainer) -> int:
    """Bytes a training step needs beyond the weights.

    CUDA: peak allocated during the step minus allocated before it. CPU: unique storages saved for
    backward (parameters excluded) plus gradients and AdamW's two moments of the trainable params.
    """
    device = trainer.device
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    if device.type == "cuda":
        trainer.step()  # optimizer state exists from here on
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        trainer.step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    param_storages = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in param_storages:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.step()
    state = sum(3 * p.numel() * p.element_size() for p in trainable)  # grad + exp_avg + exp_avg_sq
    return sum(saved.values()) + state


def timed(fn: Callable[[], None], device: torch.device, inner: int) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / inner


def alternate(variants: dict[str, Callable[[], None]], device: torch.device, repeats: int, inner: int,
              warmup: int = 2) -> dict[str, list[float]]:
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, device, inner))
    return times


def summarise(times: dict[str, list[float]], pairs: dict[str, tuple[str, str]]) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    out: dict = {"median_s": {k: round(v, 6) for k, v in med.items()}, "ratios": {}}
    for label, (a, b) in pairs.items():
        paired = statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))
        out["ratios"][label] = {"ratio_of_medians": round(med[a] / med[b], 4), "median_paired_ratio": round(paired, 4)}
    return out


def peft_model(base: nn.Module, targets: list[str] | str, r: int, alpha: float) -> nn.Module:
    import peft

    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, cfg)


def bench_config(alias: str, base: nn.Module, target_set: str, device: torch.device, repeats: int,
                 inner: int, r: int = 8, parts: tuple[str, ...] = ("train", "inference", "layer")) -> dict:
    _, _, _, qv = MODELS[alias]
    ours_targets = ["q", "v"] if target_set == "q+v" else ["all-linear"]
    peft_targets: list[str] = qv
    batch = make_batch(alias, base, device)

    lower = copy.deepcopy(base)
    for p in lower.parameters():
        p.requires_grad_(False)
    ours = lora_core.inject(copy.deepcopy(base), lora_core.LoraConfig(r=r, alpha=2 * r, targets=ours_targets))
    if target_set != "q+v":
        # PEFT's "all-linear" also adapts a classification head; give it exactly our layers instead.
        peft_targets = lora_core.adapter_info(ours).paths
    theirs = peft_model(copy.deepcopy(base), peft_targets, r, 2 * r)
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    n_peft = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    if n_ours != n_peft:
        raise RuntimeError(f"ours and PEFT adapt different layers: {n_ours} vs {n_peft} trainable numbers")

    out: dict = {"trainable_params": n_ours}
    if "train" in parts:
        trainers = {"ours": Trainer(ours, batch, device), "peft": Trainer(theirs, batch, device),
                    "lower_bound": Trainer(lower, batch, device, embed_grad=True)}
        train = alternate({k: t.step for k, t in trainers.items()}, device, repeats, inner)
        memory = {k: step_memory(t) for k, t in trainers.items()}
        out["train_step"] = summarise(train, {"ours/peft": ("ours", "peft"), "ours/lower_bound": ("ours", "lower_bound"),
                                              "peft/lower_bound": ("peft", "lower_bound")})
        out["step_memory_bytes"] = memory
        out["step_memory_ratio"] = {"ours/peft": round(memory["ours"] / memory["peft"], 4),
                                    "ours/lower_bound": round(memory["ours"] / memory["lower_bound"], 4)}
    fused = {p: w for p, w in lora_core.lora_weights(ours).items() if w.fused}
    if "layer" in parts and fused:
        path = next(iter(fused))
        out["fused_layer"] = {"path": path, "roles": list(fused[path].roles),
                              **bench_fused_layer(ours.get_submodule(path), batch, device, repeats, inner * 5)}
    if "inference" not in parts:
        return out

    # Inference: eval mode, no grad. The base model is `lower` (same weights, frozen).
    infer_models = {"base": lower.eval(), "ours_unmerged": ours.eval(), "peft_unmerged": theirs.eval()}
    ours_merged = lora_core.merge(copy.deepcopy(ours)).eval()
    infer_models["ours_merged"] = ours_merged
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def infer(m: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode(), autocast(device):
                m(**inputs)
        return run

    infer_times = alternate({k: infer(m) for k, m in infer_models.items()}, device, repeats, inner * 2)
    out["inference"] = summarise(infer_times, {"ours_merged/base": ("ours_merged", "base"),
                                               "ours_unmerged/base": ("ours_unmerged", "base"),
                                               "peft_unmerged/base": ("peft_unmerged", "base")})
    return out


def bench_fused_layer(layer: nn.Module, batch: dict, device: torch.device, repeats: int, inner: int) -> dict:
    """One adapted fused layer on the batch's tokens: the LoRA branch alone (the base output y given), ours
    against the dense formulation with a zero-padded B built per call; the frozen base layer for scale."""
    layer = copy.deepcopy(layer)
    w = next(iter(layer.lora.values()))
    tokens = batch["input_ids"].numel()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, w.in_features, generator=g).to(device).requires_grad_(True)
    with torch.no_grad():
        w.lora_B.copy_(torch.randn(w.lora_B.shape, generator=g) * 0.02)  # nonzero B, as after some training
        y = layer._lora_base_class.forward(layer, x)  # the base class's forward: no LoRA branch
    y.requires_grad_(True)

    def base() -> torch.Tensor:
        return layer._lora_base_class.forward(layer, x)

    def ours() -> torch.Tensor:
        return w.add_to(x, y)

    def dense() -> torch.Tensor:
        return torch.addmm(y, torch.nn.functional.linear(x, w.lora_A), w.expanded_B().t(), alpha=w.scaling)

    def step(fn: Callable[[], torch.Tensor], grad: bool) -> Callable[[], None]:
        def run() -> None:
            if grad:
                fn().sum().backward()
                x.grad = y.grad = w.lora_A.grad = w.lora_B.grad = None
            else:
                with torch.inference_mode():
                    fn()
        return run

    if not torch.allclose(ours(), dense(), atol=1e-5, rtol=1e-5):
        raise RuntimeError("the per-role forward and the dense formulation disagree")
    variants = {"base_layer": base, "ours_branch": ours, "dense_padded_B_branch": dense}
    out: dict = {"tokens": tokens, "threads": torch.get_num_threads()}
    for label, grad in (("forward_backward", True), ("forward", False)):
        times = alternate({k: step(fn, grad) for k, fn in variants.items()}, device, repeats, inner)
        out[label] = summarise(times, {"ours/dense_padded_B": ("ours_branch", "dense_padded_B_branch"),
                                       "ours_branch/base_layer": ("ours_branch", "base_layer"),
                                       "dense_padded_B_branch/base_layer": ("dense_padded_B_branch", "base_layer")})
    return out


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm-l6,smollm2-135m,gpt2-shaped")
    ap.add_argument("--targets", default="q+v,all-linear")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inner", type=int, default=0, help="iterations per timing (default: 3 on CPU, 20 on GPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--parts", default="train,inference,layer",
                    help="what to measure: train, inference, layer (a fused layer alone, if there is one)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 5:
        print("note: fewer than 5 repeats do not meet the acceptance rule", file=sys.stderr)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    inner = args.inner or (20 if device.type == "cuda" else 3)
    torch.manual_seed(0)
    result: dict = {"hardware": hardware(device), "torch": torch.__version__, "repeats": args.repeats,
                    "inner": inner, "dtype": "bf16 autocast" if device.type == "cuda" else "float32",
                    "results": {}}
    try:
        import peft
        result["peft"] = peft.__version__
    except ImportError:
        print("PEFT is needed for the comparison: pip install peft", file=sys.stderr)
        return 2
    for alias in args.models.split(","):
        base = load_base(alias, device)
        for target_set in args.targets.split(","):
            t0 = time.perf_counter()
            res = bench_config(alias, base, target_set, device, args.repeats, inner,
                               parts=tuple(args.parts.split(",")))
            res["bench_seconds"] = round(time.perf_counter() - t0, 1)
            result["results"][f"{alias} r=8 {target_set}"] = res
            print(f"# done {alias} {target_set} in {res['bench_seconds']} s", file=sys.stderr)
        del base
    return emit(result, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
