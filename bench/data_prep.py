"""Data preparation at the scale users bring: a 200,000-example local JSON-lines file (about 40 MB,
``text`` + ``label`` columns like the classification data the tests use), prepared with the minilm-l6
tokenizer by two implementations side by side, each in fresh subprocesses (interleaved, so both see
about the same load on a shared machine):

* ``before``: a checkout of the previous implementation (pandas/json readers, examples in Python lists,
  one JSON cache file per data set), made with ``git worktree add /tmp/data-before <commit>``;
* ``after``: this checkout (``datasets.load_dataset`` into Arrow, ``Dataset.map`` into memory-mapped
  Arrow files).

Per implementation:

* ``cold``: ``prepare_data`` with an empty data cache; ``warm``: again in a new process, disk cache
  kept. Each reports the time inside ``prepare_data``, the process's resident memory just before it
  and its peak (``VmHWM``; also ``ru_maxrss`` of the child from ``wait4``), so ``peak - before`` is the
  data's share. After the measurement each child hashes every example of every split, so the two
  implementations can be checked to give the same rows in the same splits and the same tokens.
* the data cache on disk after the cold run (``<cache>/tokenized`` and, after, the Arrow copy of the
  file under ``<cache>/datasets``);
* ``train`` (unless ``--no-train``): ``lora-sweep train`` for 2 steps on the file (minilm-l6 on CPU,
  fresh data cache; all 200,000 rows are read, split and fingerprinted and the 160,000 train rows
  tokenized, but only ``--eval-samples`` validation rows are evaluated at the end: all 20,000 take
  many minutes on two cores), wall time and peak RSS of the command.

The result is written to ``--out`` after every measurement, and printed at the end.

Usage: python bench/data_prep.py [--before DIR] [--after DIR] [--rows N] [--no-train] [--eval-samples N]
       [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LABELS = ("neg", "pos")
TRAIN_TIMEOUT_S = 900
VOCABULARY = ("the a model data set train test layer rank alpha matrix query value key token batch step loss "
              "learning rate sweep trial adapter frozen weight update gradient optimizer schedule warmup decay "
              "accuracy metric label class text sentence word review movie film plot actor scene good bad great "
              "poor boring exciting slow fast long short story ending music sound picture quality price service")
CHILD = r"""
import hashlib, json, os, sys, time
t0 = time.perf_counter()
from sweeps.config.trial import DataConfig
from sweeps.data.prepare import prepare_data
from sweeps.models.load import load_tokenizer

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

tokenizer = load_tokenizer(sys.argv[2])
t1 = time.perf_counter()
rss_before = status("VmRSS")
data = prepare_data(DataConfig(name=None, files=sys.argv[1]), "classification", tokenizer, seed=0)
first, last = data.train[0], data.validation[len(data.validation) - 1]  # a consumer's first reads
t2 = time.perf_counter()
peak = status("VmHWM")
digests = {}
for split in ("train", "validation", "test"):
    h = hashlib.sha256()
    for example in getattr(data, split):
        h.update(json.dumps(example, sort_keys=True).encode())
    digests[split] = h.hexdigest()
print(json.dumps({"import_and_tokenizer_s": t1 - t0, "prepare_s": t2 - t1, "rss_before_prepare": rss_before,
                  "peak_rss_prepare": peak, "sizes": data.sizes(), "majority_rate": data.majority_rate,
                  "label_names": data.label_names, "examples_sha256": digests}))
"""


def make_file(path: Path, rows: int, seed: int = 0) -> int:
    """``rows`` JSON lines of about 200 bytes: a sentence of random words and a label it mentions."""
    rng = random.Random(seed)
    words = VOCABULARY.split()
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            label = LABELS[i % len(LABELS)] if rng.random() < 0.8 else rng.choice(LABELS)
            text = " ".join(rng.choice(words) for _ in range(rng.randint(18, 28)))
            f.write(json.dumps({"text": f"example {i}: {text}, overall {label}", "label": label}) + "\n")
    return path.stat().st_size


def run_child(argv: list[str], env: dict[str, str], cwd: Path,
              timeout: float = 1800) -> tuple[dict[str, Any], float, int, str]:
    """Run a subprocess (killed after ``timeout`` s); its JSON output (last line, when it prints one),
    wall time, peak RSS (bytes, from wait4) and stderr's tail."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=err)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:4]} failed ({proc.returncode}):\n{stderr[-3000:]}")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    return (json.loads(lines[-1]) if lines else {}), wall, usage.ru_maxrss * 1024, stderr[-500:]


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown model"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown model")


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def mb(n: float) -> float:
    return round(n / 1e6, 1)


def prepare_run(code: Path, data_file: Path, model_dir: Path, cache: Path) -> dict[str, Any]:
    """One preparation in a fresh process with ``code`` first on the path and ``cache`` as the cache."""
    env = {**os.environ, "PYTHONPATH": str(code), "LORA_SWEEP_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    report, wall, maxrss, _ = run_child([sys.executable, "-c", CHILD, str(data_file), str(model_dir)], env,
                                        cache.parent)
    return {
        "prepare_s": round(report["prepare_s"], 2),
        "process_wall_s": round(wall, 2),
        "rss_before_prepare_mb": mb(report["rss_before_prepare"]),
        "peak_rss_prepare_mb": mb(report["peak_rss_prepare"]),
        "data_share_mb": mb(report["peak_rss_prepare"] - report["rss_before_prepare"]),
        "child_maxrss_mb": mb(maxrss),
        "check": {key: report[key] for key in ("sizes", "examples_sha256", "majority_rate", "label_names")},
    }


def train_run(code: Path, data_file: Path, model_dir: Path, work: Path, eval_samples: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(code), "LORA_SWEEP_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "COLUMNS": "120"}
    sets = [f"model.name={model_dir}", "model.device=cpu", "data.name=null", f"data.files={data_file}",
            f"data.max_eval_samples={eval_samples}", "train.steps=2", "train.eval_every=2",
            f"tracking.home={work / 'home'}"]
    argv = [sys.executable, "-m", "sweeps.cli", "train", *[a for s in sets for a in ("--set", s)]]
    try:
        _, wall, maxrss, _ = run_child(argv, env, work, timeout=TRAIN_TIMEOUT_S)
    except RuntimeError as exc:
        return {"error": str(exc)[-800:]}
    return {"wall_s": round(wall, 1), "peak_rss_mb": mb(maxrss),
            "data_cache_mb": mb(du(work / "cache" / "tokenized") + du(work / "cache" / "datasets"))}


def save(path: Path, result: dict[str, Any]) -> str:
    """Write the result so far (a killed run keeps what it measured); returns the JSON text."""
    text = json.dumps(result, indent=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, default=Path("/tmp/data-before"))
    parser.add_argument("--after", type=Path, default=REPO)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--eval-samples", type=int, default=2000,
                        help="data.max_eval_samples of the train runs (all 20,000 validation rows take many "
                             "minutes on two cores)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "data-prep-cpu-2core.json")
    args = parser.parse_args()
    if not (args.before / "sweeps" / "data" / "prepare.py").is_file():
        parser.error(f"{args.before} is not a checkout (git worktree add {args.before} <commit before Arrow>)")

    from sweeps.models.builtin import ensure_builtin_model

    model_dir = ensure_builtin_model("minilm-l6")  # the real model cache: converted once, then reused
    root = Path(tempfile.mkdtemp(prefix="data-prep-bench-"))
    try:
        data_file = root / "data.jsonl"
        size = make_file(data_file, args.rows)
        result: dict[str, Any] = {
            "hardware": f"{platform.machine()} CPU, {os.cpu_count()} cores ({cpu_model()}), shared with other work",
            "load_average_at_start": [round(x, 1) for x in os.getloadavg()],
            "python": platform.python_version(),
            "data": {"rows": args.rows, "file_mb": mb(size), "format": "jsonl", "columns": ["text", "label"],
                     "labels": list(LABELS), "split": "one file, 80/10/10 by seed 0, stratified",
                     "tokenizer": "minilm-l6", "max_length": 64},
            "prepare": {},
        }
        codes = {"before": args.before.resolve(), "after": args.after.resolve()}
        for name, code in codes.items():
            result["prepare"][name] = {"code": str(code)}
        for run in ("cold", "warm"):  # interleaved: both see about the same load on a shared machine
            for name, code in codes.items():
                cache = root / name / "cache"
                cache.parent.mkdir(exist_ok=True)
                measured = prepare_run(code, data_file, model_dir, cache)
                result["prepare"][name][run] = {k: v for k, v in measured.items() if k != "check"}
                result["prepare"][name]["check"] = measured["check"]
                if run == "cold":
                    result["prepare"][name]["cache_mb"] = {
                        "tokenized": mb(du(cache / "tokenized")), "datasets": mb(du(cache / "datasets")),
                        "total": mb(du(cache / "tokenized") + du(cache / "datasets"))}
                save(args.out, result)
        before, after = result["prepare"]["before"], result["prepare"]["after"]
        result["same_examples"] = before["check"] == after["check"]
        result["ratios_after_over_before"] = {
            f"{run}_{key}": round(after[run][key] / before[run][key], 3)
            for run in ("cold", "warm") for key in ("prepare_s", "data_share_mb", "peak_rss_prepare_mb")
            if before[run][key]
        } | {"cache_total_mb": round(after["cache_mb"]["total"] / before["cache_mb"]["total"], 3)}
        save(args.out, result)
        if not args.no_train:
            result["train_2_steps"] = {"settings": f"2 steps, batch 32, validation subset of {args.eval_samples} "
                                                   "rows evaluated at step 2, fresh data cache, model on CPU"}
            for name, code in codes.items():
                work = root / f"train-{name}"
                work.mkdir()
                result["train_2_steps"][name] = train_run(code, data_file, model_dir, work, args.eval_samples)
                save(args.out, result)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(save(args.out, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
