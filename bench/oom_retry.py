"""A GPU check of the out-of-memory retry (sweeps.training.memory): a trial whose batch does not fit
halves its micro-batch until it does, and trains as if run with that micro-batch from the start. Prints JSON.

On CUDA only (on a CPU it prints ``{"skipped": ...}``). SmolLM2-135M's architecture with random weights
(bf16, as bench/pack.py: nothing to fetch), LoRA r = 8 on every linear layer, batch 64 x 256 random
tokens, a few steps through :func:`sweeps.training.trainer.run_trial`:

1. the reference: the same trial with ``train.micro_batch_size: 8``, with the whole GPU; its peak
   (``torch.cuda.max_memory_allocated``) is ``P8``;
2. the process is limited to about 1.6 x ``P8`` (``torch.cuda.set_per_process_memory_fraction``), so
   that micro-batch 64 cannot fit (nor, as a rule, 32 or 16);
3. the trial with no micro-batch set: it must run out of memory at 64, start again with 32, ... and
   complete; then, under the same limit, the trial run directly with the micro-batch it ended with.

Reported: whether it completed, the micro-batches tried (the printed halvings), the micro-batch used,
the loss curves' largest differences (retry against direct at that micro-batch: the same computation;
against the reference at 8), peaks and times. ``ok`` is true when the retried trial completed with a
micro-batch below 64 and, where it ended at the reference's micro-batch, its curve is within 1e-2
of it (bf16 autocast).

Usage: python bench/oom_retry.py [--steps 6] [--batch 64] [--length 256] [--factor 1.6] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.checkpointing import Preloaded, load_base, random_data
from bench.common import emit


def trial_config(home: str, args: argparse.Namespace, micro: int | None) -> Any:
    from sweeps.config.trial import load_trial_config

    sets = ["model.name=smollm2-135m", "model.task=causal-lm", "model.device=cuda", "model.dtype=bfloat16",
            "data.name=null", f"data.files={home}/unused.jsonl", f"data.max_length={args.length}", "lora.r=8",
            "lora.alpha=16", "lora.targets=[all-linear]", "train.lr=1e-3", f"train.steps={args.steps}",
            f"train.batch_size={args.batch}", f"train.eval_every={args.steps}", "train.warmup_ratio=0",
            "train.eval_batch_size=8", "train.generate_samples=0", f"tracking.home={home}"]
    if micro is not None:
        sets.append(f"train.micro_batch_size={micro}")
    return load_trial_config(None, sets)


def run(config: Any, data: Any, models: Any) -> dict[str, Any]:
    """run_trial, its printed halvings captured; what came out (or the error)."""
    from sweeps.training.trainer import run_trial

    err = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stderr(err):
            result = run_trial(config, data=data, models=models).result
    except Exception as exc:  # reported, not raised: the JSON says what failed
        return {"error": f"{type(exc).__name__}: {exc}", "halvings": _halvings(err.getvalue()),
                "wall_s": time.perf_counter() - t0}
    return {"state": result.state, "reason": result.reason, "micro_batch_size": result.micro_batch_size,
            "halvings": _halvings(err.getvalue()), "loss_curve": [loss for _, loss in result.train_curve],
            "peak_memory_bytes": result.peak_memory_bytes, "step_time_s": result.step_time_s,
            "wall_s": time.perf_counter() - t0}


def _halvings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("out of device memory")]


def _diff(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    if "loss_curve" not in a or "loss_curve" not in b or len(a["loss_curve"]) != len(b["loss_curve"]):
        return None
    return max(abs(x - y) for x, y in zip(a["loss_curve"], b["loss_curve"], strict=True))


def check(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "batch": args.batch,
                           "tokens": args.length, "steps": args.steps}
    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    loaded = load_base("smollm2-shaped", "cuda", "bfloat16")
    data = random_data(loaded.model.config.vocab_size, args.length, train=4 * args.batch, validation=8)
    models = Preloaded(loaded)
    with tempfile.TemporaryDirectory() as home:
        reference = run(trial_config(home, args, 8), data, models)
        out["reference_micro_8"] = reference
        if "error" in reference:
            out["ok"] = False
            return out
        torch.cuda.empty_cache()
        limit = min(0.95 * total, args.factor * reference["peak_memory_bytes"])
        out["limit_bytes"], out["total_bytes"] = int(limit), int(total)
        torch.cuda.set_per_process_memory_fraction(limit / total, device)
        try:
            retried = run(trial_config(home, args, None), data, models)
            out["retried"] = retried
            micro = retried.get("micro_batch_size")
            if micro:
                torch.cuda.empty_cache()
                direct = run(trial_config(home, args, micro), data, models)
                out["direct_at_that_micro_batch"] = direct
                out["loss_max_abs_diff_retried_vs_direct"] = _diff(retried, direct)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    out["loss_max_abs_diff_retried_vs_reference"] = _diff(out["retried"], reference)
    micro = out["retried"].get("micro_batch_size") or args.batch
    near = out["loss_max_abs_diff_retried_vs_reference"]
    out["ok"] = (out["retried"].get("state") == "COMPLETE" and micro < args.batch
                 and (micro != 8 or (near is not None and near <= 1e-2)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--factor", type=float, default=1.6, help="the memory limit, times the reference's peak")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        return emit({"skipped": "no CUDA device"}, args.out)
    try:
        result = check(args)
    except Exception:  # the JSON carries the failure
        result = {"ok": False, "error": traceback.format_exc()[-3000:]}
    emit(result, args.out)
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
