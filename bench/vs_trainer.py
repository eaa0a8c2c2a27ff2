"""The same trial trained by lora-sweep and by ``transformers.Trainer`` with a PEFT LoRA model, side by side.

What users glue together without lora-sweep: a PEFT model of the same rank, alpha, targets, dropout and
trainable head, trained by ``Trainer`` with the same optimizer (AdamW with the same parameter groups:
the head at ``train.head_lr``), learning-rate schedule, batch, steps, gradient clipping and data (the
prepared rows of the trial's data set, padded by the same collator), then evaluated by the same code
on the same validation split. lora-sweep's side is ``run_trial`` (``lora-sweep train`` without the
MLflow logging after training). Both train with the same dropout: LoRA's and all of the base model's,
attention probabilities included (the Trainer side draws it inside SDPA from torch's generator; ours
per trial from its keyed stream, lora_core.packed_attention, since issue 24), so the metrics should
agree within the seed-to-seed spread. Each run is a fresh subprocess (so the peak RSS is its own), the two
sides alternate, and every seed runs on both.

Cases: ``default`` (the built-in default trial: minilm-l6 on pydoc-topics, r=8 q,v, 200 steps),
``smollm2`` (examples/smollm2-pydoc-names.yaml with a short step budget) and ``smollm2-shaped`` (the same
trial on SmolLM2-135M's architecture with random weights and random 128-token sequences, bf16 on a GPU:
for bench/gpu.sh, whose machine can fetch neither the model nor its tokenizer; no generation). Prints JSON: per run the
median step time (each side's own per-step timing, first step excluded by the median), tokens per
second, peak memory (CUDA max allocated, or the process's peak RSS) and the final validation metric;
per case the medians and the ratios ours / Trainer, and the metric's mean and spread over seeds.

Sides: ``ours``, ``trainer`` (Trainer's defaults: random batches, padded to their longest row) and
``trainer-grouped`` (``train_sampling_strategy="group_by_length"``: batches of similar length, as lora-sweep's stream draws
them, so the comparison is of the training loop and the LoRA layer, not of the padding).

Usage: python bench/vs_trainer.py [--cases default,smollm2] [--seeds 0,1] [--sides ours,trainer]
       [--steps default=200,smollm2=30,smollm2-shaped=100]
       [--device auto] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

CASES = {"default": ROOT / "examples" / "default.yaml", "smollm2": ROOT / "examples" / "smollm2-pydoc-names.yaml",
         "smollm2-shaped": ROOT / "examples" / "smollm2-pydoc-names.yaml"}
SHAPED_LENGTH = 128  # the smollm2 case's data.max_length


def _shaped(cfg: Any) -> tuple[Any, Any]:
    """The smollm2-shaped case's base model and data: SmolLM2-135M's architecture with random weights
    (seeded: both sides get the same) and random 128-token sequences (bench/pack.py), for a GPU machine
    that can fetch neither the model nor a tokenizer."""
    import torch

    from bench.pack import synthetic

    device = cfg.model.device if cfg.model.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    return synthetic(device, dtype, SHAPED_LENGTH)


class _Given:
    """A model cache holding one model already built (``run_trial``'s ``models``): the shaped base."""

    def __init__(self, loaded: Any) -> None:
        self.loaded = loaded

    def get(self, *args: Any, **kwargs: Any) -> Any:
        import copy
        import dataclasses

        return dataclasses.replace(self.loaded, model=copy.deepcopy(self.loaded.model))


def _config(case: str, seed: int, steps: int, device: str) -> Any:
    from sweeps.config.trial import load_trial_config

    overrides = [f"seed={seed}", f"train.steps={steps}", f"train.eval_every={steps}", f"model.device={device}"]
    if case == "smollm2":
        overrides.append("train.generate_samples=16")
    if case == "smollm2-shaped":  # no tokenizer there: no generation
        overrides.append("train.generate_samples=0")
    return load_trial_config(CASES[case], overrides)


def _peak(device: Any) -> tuple[int, str]:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_peak_rss"


def run_ours(cfg: Any, case: str) -> dict[str, Any]:
    from sweeps.training.trainer import run_trial

    if case == "smollm2-shaped":
        loaded, data = _shaped(cfg)
        trial = run_trial(cfg, data=data, models=_Given(loaded))  # type: ignore[arg-type]
    else:
        trial = run_trial(cfg)
    r = trial.result
    peak, kind = _peak(next(trial.model.parameters()).device)
    return {"step_time_s": r.step_time_s, "tokens_per_s": r.tokens_per_s, "train_s": r.train_s,
            "peak_memory_bytes": peak, "memory_kind": kind, "metric": r.final_metrics[r.objective],
            "objective": r.objective, "state": r.state}


def run_trainer(cfg: Any, case: str, grouped: bool = False) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from lora_core.targets import resolve_targets
    from sweeps.config.trial import objective_of
    from sweeps.data.prepare import prepare_data
    from sweeps.models.cache import reinit_fresh
    from sweeps.models.heads import saved_modules
    from sweeps.models.load import load_model, load_tokenizer
    from sweeps.training.evaluate import evaluate
    from sweeps.training.optim import lr_lambda
    from sweeps.training.runtime import seed_everything

    m, lo, tr = cfg.model, cfg.lora, cfg.train
    seed_everything(cfg.seed)
    if case == "smollm2-shaped":
        tokenizer = None
        loaded, data = _shaped(cfg)
    else:
        tokenizer = load_tokenizer(m.name, trust_remote_code=m.trust_remote_code)
        data = prepare_data(cfg.data, m.task, tokenizer, seed=cfg.seed)
        seed_everything(cfg.seed)
        loaded = load_model(m.name, m.task, num_labels=data.num_labels, dtype=m.dtype, device=m.device,
                            trust_remote_code=m.trust_remote_code)
    reinit_fresh(loaded.model, loaded.fresh_modules, cfg.seed)
    model = loaded.model
    saved = list(saved_modules(model, m.task, lo.modules_to_save))
    targets = sorted(site.path for site in resolve_targets(model, lo.targets, saved))
    peft_model = get_peft_model(model, LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                                                  target_modules=targets, modules_to_save=saved or None))
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    head = [p for n, p in named if "modules_to_save" in n]
    groups = [{"params": [p for n, p in named if "modules_to_save" not in n], "lr": tr.lr}]
    if head:
        groups.append({"params": head, "lr": tr.head_lr or tr.lr})
    opt = torch.optim.AdamW(groups, weight_decay=tr.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tr.schedule, int(tr.warmup_ratio * tr.steps), tr.steps))
    tokens = [0]

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = data.collate(rows)
        tokens[0] += int(batch["attention_mask"].sum())
        return batch

    times: list[float] = []

    class StepTimes(TrainerCallback):
        t0 = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if loaded.device.type == "cuda":
                torch.cuda.synchronize(loaded.device)
            times.append(time.perf_counter() - self.t0)

    class Rows(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(data.train)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return data.train[i]

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=tr.batch_size, max_steps=tr.steps,
                                 max_grad_norm=tr.max_grad_norm or 0.0, seed=cfg.seed, report_to=[],
                                 save_strategy="no", eval_strategy="no", logging_strategy="no",
                                 dataloader_num_workers=0, remove_unused_columns=False,
                                 use_cpu=loaded.device.type == "cpu", disable_tqdm=True,
                                 train_sampling_strategy="group_by_length" if grouped else "random",
                                 bf16=loaded.device.type == "cuda" and model.dtype == torch.bfloat16)
        if loaded.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(loaded.device)
        trainer = Trainer(model=peft_model, args=args, train_dataset=Rows(), data_collator=collate,
                          optimizers=(opt, sched), callbacks=[StepTimes()])
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
    peak, kind = _peak(loaded.device)
    objective, _ = objective_of(m.task)
    metrics = evaluate(peft_model, data, "validation", cfg, tokenizer, generate=True)
    return {"step_time_s": statistics.median(times), "tokens_per_s": tokens[0] / train_s, "train_s": train_s,
            "peak_memory_bytes": peak, "memory_kind": kind, "metric": metrics[objective], "objective": objective,
            "state": "COMPLETE"}


def child(side: str, case: str, seed: int, steps: int, device: str) -> int:
    cfg = _config(case, seed, steps, device)
    out = run_ours(cfg, case) if side == "ours" else run_trainer(cfg, case, grouped=side == "trainer-grouped")
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="default,smollm2")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", default="default=200,smollm2=30,smollm2-shaped=100")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sides", default="ours,trainer",
                        help="ours, trainer (Trainer's default random batches), trainer-grouped (train_sampling_strategy=group_by_length)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=4, metavar=("SIDE", "CASE", "SEED", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, case, seed, steps = args.child
        return child(side, case, int(seed), int(steps), args.device)
    steps = {k: int(v) for k, v in (kv.split("=") for kv in args.steps.split(","))}
    import torch

    from bench.common import emit

    hardware = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else \
        f"cpu {os.cpu_count()} cores {platform.processor() or platform.machine()}"
    result: dict[str, Any] = {"hardware": hardware, "torch": torch.__version__, "cases": {}}
    sides = args.sides.split(",")
    if sides[0] != "ours" or len(sides) < 2 or not set(sides) <= {"ours", "trainer", "trainer-grouped"}:
        parser.error("--sides: ours first, then trainer and/or trainer-grouped")
    for case in args.cases.split(","):
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        for i, seed in enumerate(int(s) for s in args.seeds.split(",")):
            order = sides if i % 2 == 0 else sides[::-1]  # alternate who goes first
            for side in order:
                proc = subprocess.run([sys.executable, __file__, "--device", args.device, "--child", side, case,
                                       str(seed), str(steps[case])], capture_output=True, text=True, cwd=ROOT)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
                    return 1
                runs[side].append({"seed": seed, **json.loads(line[len("RESULT "):])})
        summary: dict[str, Any] = {"steps": steps[case], "runs": runs}
        for key in ("step_time_s", "tokens_per_s", "peak_memory_bytes"):
            medians = {side: statistics.median(r[key] for r in runs[side]) for side in sides}
            summary[key] = {**medians, **{f"ratio_ours_over_{side}": round(medians["ours"] / medians[side], 3)
                                          for side in sides[1:]}}
        for side in sides:
            values = [r["metric"] for r in runs[side]]
            summary[f"metric_{side}"] = {"objective": runs[side][0]["objective"], "mean": statistics.fmean(values),
                                         "std": statistics.stdev(values) if len(values) > 1 else None,
                                         "values": values}
        result["cases"][case] = summary
    return emit(result, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
