"""Packed trials against trials one at a time: the same list of trials with pack K = 1, 2, 4, 8. Prints JSON.

Every variant trains the same trials (same configs, seeds, steps) through
:class:`sweeps.training.packed.PackedTrainer` with capacity K; ``legacy`` trains them one at a time
with the pre-pack loop (:func:`sweeps.training.trainer.start_trial` + ``train_loop``) for reference.
Each variant runs in its own fresh process (so its peak memory is its own), and the variants alternate
over ``--repeats`` rounds (1, 2, 4, 8, legacy, 1, 2, ...): machine noise hits all of them alike.
Reported per variant (medians over rounds) and as ratios to K = 1:

* ``trials_per_hour``: trials / wall time of the whole list (training and evaluation, not loading);
* ``step_s_per_trial``: training time / (trials x steps), i.e. what one trial's step costs;
* ``peak_memory_bytes``: CUDA max allocated (GPU) or the process's peak RSS (CPU).

Cases: ``--model minilm-l6`` (CPU default: pydoc-topics, batch 16 x 48 tokens, classifier heads) or
``--model smollm2-135m`` (GPU: pydoc-names, batch 8 x 64 tokens, bf16 autocast, causal LM); target
sets ``all-linear-r8`` (every trial all-linear at r = 8) and ``mixed`` (ranks 1, 2, 4, 8, 16, 32, 64, 64,
all-linear). Trials differ in seed and learning rate. Evaluation runs once, at the last step, on
``--eval-samples`` validation examples.

``--pad-waste``: how much padding one forward may add to bring trials of different lengths together
(:func:`sweeps.training.packed.forward_groups`; default the trainer's: 0 on the CPU, unlimited on CUDA).

``--attention``: the cost of per-trial attention-probability dropout (issue 24). Each pack size K in
``--packs`` runs twice, side by side in alternating fresh processes: ``K:keyed`` (today's trial: the
model's attention dropout on, each trial's masks drawn by the pack's attention function, eager attention
in training) and ``K:off`` (the trial before issue 24: attention dropout off, SDPA). Reported: per K the
ratio keyed / off of the step time per trial and of trials per hour (above 1: keyed costs more).
``--attention-rate R`` sets the base model's attention dropout to R first (SmolLM2's config has 0).
``--attention --interleave N``: the same four variants in one process instead (one model loaded, a copy
per variant, each variant's trainer holding K trials), their training steps interleaved for N rounds
(the order rotating each round) after one untimed step each; the medians of each variant's step time per
trial and the ratios keyed / off. On a shared, loaded machine this is far less noisy than fresh
processes minutes apart (evaluation and loading are not timed).

Usage: python bench/pack.py [--model minilm-l6] [--cases all-linear-r8,mixed] [--trials 8] [--steps 8]
                            [--packs 1,2,4,8] [--repeats 2] [--device cpu] [--pad-waste X] [--attention]
                            [--attention-rate R] [--out FILE.json]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from bench.common import emit, hardware

MIXED_RANKS = [1, 2, 4, 8, 16, 32, 64, 64]
SETTINGS = {
    "minilm-l6": {"task": "classification", "data": "pydoc-topics", "batch": 16, "length": 48, "dtype": "float32"},
    "smollm2-135m": {"task": "causal-lm", "data": "pydoc-names", "batch": 8, "length": 64, "dtype": "bfloat16"},
    # SmolLM2-135M's architecture with random weights and random 64-token sequences: no download and no
    # data pipeline (for a GPU machine that cannot fetch the model); throughput is the model's.
    "smollm2-shaped": {"task": "causal-lm", "data": "synthetic", "batch": 8, "length": 64, "dtype": "bfloat16"},
}
SMOLLM2 = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 2048,
           "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 100000.0}


def synthetic(device: str, dtype: str, length: int) -> tuple:
    """A random-weight SmolLM2-135M-shaped causal LM and random token data (train 512, validation 64)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sweeps.data.examples import PadCollator, PreparedData
    from sweeps.models.load import LoadedModel

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).to(device=device, dtype=getattr(torch, dtype)).eval()
    gen = torch.Generator().manual_seed(0)

    def rows(n: int) -> list:
        ids = torch.randint(1, SMOLLM2["vocab_size"], (n, length), generator=gen).tolist()
        return [{"input_ids": x, "labels": list(x)} for x in ids]

    data = PreparedData(task="causal-lm", train=rows(512), validation=rows(64), test=rows(8),  # type: ignore[arg-type]
                        collate=PadCollator(pad_id=0, causal=True), label_names=None, num_labels=None,
                        majority_rate=None, generation={}, source="random tokens", fingerprint="synthetic")
    loaded = LoadedModel(model, None, "smollm2-shaped", "smollm2-shaped", None, "causal-lm",  # type: ignore[arg-type]
                         getattr(torch, dtype), torch.device(device), ())
    return loaded, data


def trial_configs(model: str, case: str, trials: int, steps: int, device: str, eval_samples: int, home: str) -> list:
    from sweeps.config.trial import load_trial_config

    s = SETTINGS[model]
    out = []
    for i in range(trials):
        r = 8 if case == "all-linear-r8" else MIXED_RANKS[i % len(MIXED_RANKS)]
        name, data = ("smollm2-135m", "pydoc-names") if s["data"] == "synthetic" else (model, s["data"])
        sets = [f"model.name={name}", f"model.task={s['task']}", f"model.device={device}", f"model.dtype={s['dtype']}",
                f"data.name={data}", f"data.max_length={s['length']}", f"data.max_eval_samples={eval_samples}",
                f"lora.r={r}", f"lora.alpha={2 * r}", "lora.targets=[all-linear]", f"seed={i}",
                f"train.lr={[1e-3, 3e-3, 1e-2][i % 3]}", f"train.batch_size={s['batch']}", f"train.steps={steps}",
                f"train.eval_every={steps}", "train.generate_samples=0", f"tracking.home={home}"]
        out.append(load_trial_config(None, sets))
    return out


def attention_off(model: object) -> int:
    """The model's attention-probability dropout set to 0 in every module the pack's attention function
    serves (what trials did before issue 24); returns how many rates were changed."""
    from lora_core.packed import PackedDropout
    from lora_core.packed_attention import SITE_ATTR

    changed = 0
    for m in model.modules():  # type: ignore[attr-defined]
        if SITE_ATTR not in m.__dict__:
            continue
        if isinstance(getattr(m, "dropout", None), PackedDropout) and m.dropout.p > 0:
            m.dropout.p = 0.0
            changed += 1
        if isinstance(getattr(m, "attention_dropout", None), float) and m.attention_dropout > 0:
            m.attention_dropout = 0.0
            changed += 1
    return changed


def set_attention_rate(model: object, rate: float) -> int:
    """The base model's attention-probability dropout set to ``rate`` before the pack is built (the
    SmolLM2-shaped model's config has none); returns how many modules were changed."""
    from torch import nn

    changed = 0
    for m in model.modules():  # type: ignore[attr-defined]
        if isinstance(getattr(m, "attention_dropout", None), float):  # Llama-style: a rate attribute
            m.attention_dropout = rate
            changed += 1
        elif hasattr(m, "attention_head_size") and isinstance(getattr(m, "dropout", None), nn.Dropout):  # BERT
            m.dropout.p = rate
            changed += 1
    return changed


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    """One variant in this process: load, then train every trial; the measurements. ``K:off`` /
    ``K:keyed``: pack size K with the model's attention dropout off / on (keyed per trial)."""
    import torch

    from sweeps.data.prepare import prepare_data
    from sweeps.models.load import load_model, load_tokenizer
    from sweeps.training.loop import train_loop
    from sweeps.training.packed import PackedTrainer, Waiting
    from sweeps.training.runtime import peak_memory
    from sweeps.training.trainer import start_trial

    with tempfile.TemporaryDirectory() as home:
        configs = trial_configs(args.model, args.case, args.trials, args.steps, args.device, args.eval_samples, home)
        first = configs[0]
        s = SETTINGS[args.model]
        if s["data"] == "synthetic":
            loaded, data = synthetic(args.device, s["dtype"], s["length"])
        else:
            data = prepare_data(first.data, first.model.task, load_tokenizer(first.model.name), seed=0)
            loaded = None
        device = torch.device(args.device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if variant == "legacy":
            if loaded is not None:
                raise SystemExit("the legacy variant needs a real model (use --no-legacy)")
            t0 = time.perf_counter()
            train_s = 0.0
            for config in configs:
                slot = start_trial(config, data=data)[0]
                train_loop([slot])
                train_s += slot.train_s
            wall = time.perf_counter() - t0
        else:
            k = int(variant.partition(":")[0])
            if loaded is None:
                loaded = load_model(first.model.name, first.model.task, num_labels=data.num_labels,
                                    dtype=first.model.dtype, device=args.device)
            max_rank = max(c.lora.r for c in configs)
            if args.attention_rate is not None and set_attention_rate(loaded.model, args.attention_rate) == 0:
                raise SystemExit("--attention-rate: the model has no attention dropout to set")
            trainer = PackedTrainer(loaded, data, k, ["all-linear"], max_rank, "auto", first.model.task,
                                    pad_waste=args.pad_waste)
            if variant.endswith(":off") and attention_off(loaded.model) == 0:
                raise SystemExit("--attention: the model has no attention dropout to turn off")
            t0 = time.perf_counter()
            members = trainer.run([Waiting(c) for c in configs])
            wall = time.perf_counter() - t0
            train_s = sum(m.train_s for m in members)
            assert all(m.result.state == "COMPLETE" for m in members), [m.result.reason for m in members]
        peak, kind = peak_memory(device)
    return {"wall_s": wall, "train_s": train_s, "trials_per_hour": 3600 * len(configs) / wall,
            "step_s_per_trial": train_s / (len(configs) * args.steps), "peak_memory_bytes": peak, "memory_kind": kind}


def interleaved_attention(args: argparse.Namespace, case: str, packs: list[int]) -> dict:
    """``--attention --interleave N``: per K, attention dropout keyed and off, steps interleaved in one process."""
    import copy
    import dataclasses

    import torch

    from sweeps.data.prepare import prepare_data
    from sweeps.models.load import load_model, load_tokenizer
    from sweeps.training.packed import PackedTrainer, Waiting

    with tempfile.TemporaryDirectory() as home:
        configs = trial_configs(args.model, case, max(packs), 100_000, args.device, args.eval_samples, home)
        first = configs[0]
        s = SETTINGS[args.model]
        if s["data"] == "synthetic":
            loaded, data = synthetic(args.device, s["dtype"], s["length"])
        else:
            data = prepare_data(first.data, first.model.task, load_tokenizer(first.model.name), seed=0)
            loaded = load_model(first.model.name, first.model.task, num_labels=data.num_labels,
                                dtype=first.model.dtype, device=args.device)
        if args.attention_rate is not None and set_attention_rate(loaded.model, args.attention_rate) == 0:
            raise SystemExit("--attention-rate: the model has no attention dropout to set")
        trainers = {}
        for k in packs:
            for mode in ("off", "keyed"):
                copy_ = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))
                trainer = PackedTrainer(copy_, data, k, ["all-linear"], max(c.lora.r for c in configs), "auto",
                                        first.model.task, pad_waste=args.pad_waste)
                if mode == "off" and attention_off(copy_.model) == 0:
                    raise SystemExit("--attention: the model has no attention dropout to turn off")
                for config in configs[:k]:
                    trainer.add(Waiting(config))
                copy_.model.train()
                trainers[f"{k}:{mode}"] = (k, trainer)
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        times: dict[str, list[float]] = {v: [] for v in trainers}
        names = list(trainers)
        for rnd in range(args.interleave + 1):
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                k, trainer = trainers[name]
                sync()
                t0 = time.perf_counter()
                trainer._step()  # one optimizer step of the variant's K trials (no evaluation: eval_every is far)
                sync()
                if rnd > 0:  # round 0: warm-up
                    times[name].append((time.perf_counter() - t0) / k)
        med = {v: statistics.median(t) for v, t in times.items()}
        return {"rounds": args.interleave, "step_s_per_trial": med, "times": times,
                "keyed_over_off": {f"K={k}": med[f"{k}:keyed"] / med[f"{k}:off"] for k in packs},
                "k_over_k1": {mode: {f"K={k}": med[f"{k}:{mode}"] / med[f"{packs[0]}:{mode}"] for k in packs}
                              for mode in ("off", "keyed")}}



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm-l6", choices=sorted(SETTINGS))
    ap.add_argument("--cases", default="all-linear-r8,mixed")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--packs", default="1,2,4,8")
    ap.add_argument("--legacy", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--eval-samples", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pad-waste", type=float, default=None,
                    help="padding a forward may add (default: the trainer's, 0 on CPU, inf on CUDA)")
    ap.add_argument("--attention", action="store_true",
                    help="per K: attention dropout keyed per trial against off (ratios keyed / off)")
    ap.add_argument("--interleave", type=int, default=0,
                    help="with --attention: N interleaved rounds of steps in one process (0: fresh processes)")
    ap.add_argument("--attention-rate", type=float, default=None,
                    help="set the base model's attention dropout to this rate first (default: the model's own)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print its JSON
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args, args.variant)))
        return 0
    packs = [p.strip() for p in args.packs.split(",")]
    if args.attention and args.interleave > 0:
        out = {"hardware": hardware(args.device), "model": args.model, "settings": SETTINGS[args.model],
               "mode": "attention, interleaved in one process", "pad_waste": args.pad_waste,
               "attention_rate": args.attention_rate if args.attention_rate is not None else "the model's own",
               "cases": {case.strip(): interleaved_attention(args, case.strip(), [int(k) for k in packs])
                         for case in args.cases.split(",")}}
        return emit(out, args.out)
    if args.attention:
        variants = [f"{k}:{mode}" for k in packs for mode in ("off", "keyed")]
    else:
        variants = packs + (["legacy"] if args.legacy else [])
    out: dict = {"hardware": hardware(args.device), "model": args.model, "settings": SETTINGS[args.model],
                 "trials": args.trials, "steps": args.steps, "repeats": args.repeats,
                 "pad_waste": args.pad_waste if args.pad_waste is not None else "default", "cases": {}}
    for case in [c.strip() for c in args.cases.split(",")]:
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for rep in range(args.repeats):
            for variant in variants:
                cmd = [sys.executable, __file__, "--model", args.model, "--case", case, "--variant", variant,
                       "--trials", str(args.trials), "--steps", str(args.steps), "--device", args.device,
                       "--eval-samples", str(args.eval_samples)]
                if args.pad_waste is not None:
                    cmd += ["--pad-waste", str(args.pad_waste)]
                if args.attention_rate is not None:
                    cmd += ["--attention-rate", str(args.attention_rate)]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"variant {variant} of {case} failed (exit {proc.returncode})")
                runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"# {case} round {rep + 1} K={variant}: {runs[variant][-1]['trials_per_hour']:.0f} trials/h",
                      file=sys.stderr)
        med = {v: {key: statistics.median(r[key] for r in rs) for key in
                   ("trials_per_hour", "step_s_per_trial", "peak_memory_bytes", "wall_s")}
               for v, rs in runs.items()}
        ref = med[variants[0]]
        out["cases"][case] = {
            "median": med,
            "ratio_to_k1": {v: {"trials_per_hour": m["trials_per_hour"] / ref["trials_per_hour"],
                                "step_s_per_trial": m["step_s_per_trial"] / ref["step_s_per_trial"],
                                "peak_memory": m["peak_memory_bytes"] / ref["peak_memory_bytes"]}
                            for v, m in med.items()},
            "memory_kind": runs[variants[0]][0]["memory_kind"], "runs": runs}
        if args.attention:
            out["cases"][case]["keyed_over_off"] = {
                f"K={k}": {"step_s_per_trial": med[f"{k}:keyed"]["step_s_per_trial"] / med[f"{k}:off"]["step_s_per_trial"],
                           "trials_per_hour": med[f"{k}:keyed"]["trials_per_hour"] / med[f"{k}:off"]["trials_per_hour"]}
                for k in packs}
    out["attention"] = bool(args.attention)
    out["attention_rate"] = args.attention_rate if args.attention_rate is not None else "the model's own"
    return emit(out, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
