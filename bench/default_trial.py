"""The built-in default trial against its two baselines, side by side in one run. Prints JSON.

* LoRA: the built-in default (minilm-l6 on pydoc-topics, r=8, alpha=16 on q,v, head trained);
* head only: the same steps, batch, schedule and seed with no LoRA (only the classifier trains),
  at the default head lr and at a 10x higher one (a head alone may tolerate larger steps);
* the majority-class rate of the validation split.

Usage: python bench/default_trial.py [--out FILE.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch

from bench.common import emit
from sweeps.config.trial import load_trial_config
from sweeps.training.trainer import run_trial

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "default.yaml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    base = load_trial_config(EXAMPLE)
    variants = {
        "lora_q_v_r8": [],
        "head_only_same_lr": ["lora.enabled=false"],
        "head_only_10x_lr": ["lora.enabled=false", f"train.head_lr={(base.train.head_lr or base.train.lr) * 10}"],
    }
    out: dict = {"hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} threads", "config": str(EXAMPLE),
                 "steps": base.train.steps, "results": {}}
    with tempfile.TemporaryDirectory() as home:
        for name, overrides in variants.items():
            cfg = load_trial_config(EXAMPLE, [*overrides, f"tracking.home={home}"])
            t0 = time.perf_counter()
            trial = run_trial(cfg)
            r = trial.result
            out["majority_rate"] = trial.data.majority_rate
            out["results"][name] = {"state": r.state, "final": r.final_metrics, "best": r.best_metrics,
                                    "best_step": r.best_step, "trainable_params": r.trainable_params,
                                    "step_time_s": round(r.step_time_s, 4), "train_s": round(r.train_s, 1),
                                    "eval_s": round(r.eval_s, 1), "wall_s": round(time.perf_counter() - t0, 1)}
            print(f"# {name}: accuracy {r.final_metrics.get('accuracy'):.4f} in {r.wall_s:.0f} s", file=sys.stderr)
    lora = out["results"]["lora_q_v_r8"]["final"]["accuracy"]
    out["lora_beats"] = {"majority": lora > out["majority_rate"],
                         "head_only_same_lr": lora > out["results"]["head_only_same_lr"]["final"]["accuracy"],
                         "head_only_10x_lr": lora > out["results"]["head_only_10x_lr"]["final"]["accuracy"]}
    return emit(out, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
