"""The model card of an exported adapter: ``README.md`` with YAML front matter (Hugging Face style) and text.

It says what the adapter is (base model, task, data, LoRA layout, parameter counts), the validation
metrics reproduced at export next to the ones the trial logged, the held-out test figures the sweep's
end stored for the trial and its configuration (`sweeps.engine.holdout`; the card only reads them) beside
the validation figures, where it comes from (sweep, study storage, trial, MLflow run, library versions),
and how to load it with PEFT or ``lora_core``.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweeps.config.sweep import SweepConfig
from sweeps.text import fmt_value

if TYPE_CHECKING:
    from mlflow.entities import Run
    from optuna.trial import FrozenTrial

    from sweeps.config.trial import TrialConfig
    from sweeps.data.prepare import PreparedData
    from sweeps.export.result import ExportResult

__all__ = ["CARD_FILE", "MERGED_DIR", "held_out_section", "model_card"]

CARD_FILE = "README.md"
MERGED_DIR = "merged"
# Built-in aliases whose converted directory is the hub model unchanged (for the card's base_model).
_HUB_IDS = {"minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}


def _base_model_id(name: str) -> str:
    return _HUB_IDS.get(name, name)


def _pipeline(task: str) -> str:
    return "text-classification" if task == "classification" else "text-generation"


def _figures(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("mean") is None:
        return "-"
    std = f" ± {entry['std']:.6f}" if entry.get("std") is not None else ""
    return f"{entry['mean']:.6f}{std} (n={entry.get('n')})"


def held_out_section(test: dict[str, Any] | None, frozen: FrozenTrial, objective: str) -> tuple[str, dict[str, float]]:
    """The card's test-split section, and this trial's test metrics (empty when it has none)."""
    head = "## Test split (held out)\n\n"
    if not test or test.get("objective") != objective:
        return (head + "The sweep did not evaluate the test split (`search.test_eval: false`, or it had not ended), "
                "so only validation figures are known; they chose the configuration and are biased upwards.\n"), {}
    entry = (test.get("trials") or {}).get(str(frozen.number))
    roles = [(role, c) for role, c in (test.get("choices") or {}).items()
             if isinstance(c, dict) and frozen.number in (c.get("trials") or [])]
    if not isinstance(entry, dict):
        chosen = "; ".join(f"{role.replace('_', ' ')}: trials {', '.join(map(str, c.get('trials') or []))}"
                           for role, c in (test.get("choices") or {}).items() if isinstance(c, dict))
        return (head + f"This trial was not evaluated on the test split: the sweep's end evaluates only its recommended "
                f"and best-quality configurations ({chosen or 'none'}).\n"), {}
    metrics = {k: float(v) for k, v in (entry.get("test") or {}).items()}
    val = entry.get("validation") or {}
    rows = [f"| this trial ({k}) | {val[k]:.6f} | {metrics[k]:.6f} |" for k in metrics if k in val]
    rows += [f"| this trial ({k}) | - | {metrics[k]:.6f} |" for k in metrics if k not in val]
    for role, c in roles:
        rows.append(f"| the {role.replace('_', ' ')} configuration, {objective} over its seeds (trials "
                    f"{', '.join(map(str, c.get('trials') or []))}) | {_figures(c.get('validation'))} | "
                    f"{_figures(c.get('test'))} |")
    text = (head + f"Every decision of the sweep was taken on the validation split, so a chosen configuration's validation "
            f"figure is biased upwards. The test split ({test.get('rows')} rows) was read once, after the sweep's last "
            "decision, with this adapter reloaded onto the base model; no decision used it.\n\n"
            "| | validation | test |\n|---|---|---|\n" + "\n".join(rows) + "\n")
    return text, metrics


def model_card(config: SweepConfig, cfg: TrialConfig, frozen: FrozenTrial, run: Run, data: PreparedData,
               counts: dict[str, Any], result: ExportResult, *, best: bool, tracking: str, storage: str,
               test: dict[str, Any] | None = None, why: str | None = None) -> str:
    """``README.md`` for the exported directory: YAML front matter (Hugging Face model card style) + text.
    ``test``: the sweep's test-split record (study user attr ``lora_sweep.test``), if it has one;
    ``why``: why the sweep recommends its configuration (`sweeps.engine.selection.recommendation_why`)."""
    import yaml

    from sweeps.models.load import builtin_aliases

    task = cfg.model.task
    base = _base_model_id(cfg.model.name)
    objective = result.objective
    lo = cfg.lora
    front: dict[str, Any] = {"library_name": "peft", "base_model": base, "pipeline_tag": _pipeline(task),
             "tags": ["lora", "peft", "lora-sweep"],
             "model-index": [{"name": f"{config.name}-trial-{frozen.number}", "results": [{
                 "task": {"type": _pipeline(task)},
                 "dataset": {"name": _data_name(cfg), "type": _data_name(cfg), "split": "validation"},
                 "metrics": [{"type": k, "value": round(v, 6), "name": f"validation {k}"}
                             for k, v in result.reproduced.items() if k in result.logged]}]}]}
    test_text, test_metrics = held_out_section(test, frozen, objective)
    if test_metrics:
        front["model-index"][0]["results"].append({
            "task": {"type": _pipeline(task)},
            "dataset": {"name": _data_name(cfg), "type": _data_name(cfg), "split": "test"},
            "metrics": [{"type": k, "value": round(v, 6), "name": f"test {k}"} for k, v in test_metrics.items()]})
    auto = "AutoModelForSequenceClassification" if task == "classification" else "AutoModelForCausalLM"
    labels = f", num_labels={data.num_labels}" if task == "classification" else ""
    builtin = cfg.model.name in builtin_aliases()
    task_text = (f"classification, {data.num_labels} labels: {', '.join(data.label_names or [])}"
                 if task == "classification" else "causal language modelling (loss on the completion tokens)")
    sizes = data.sizes()
    why_text = f"the best trial by {objective}" if best else f"trial {frozen.number} (chosen with --trial)"
    metric_rows = "\n".join(
        f"| {k} | {result.reproduced[k]:.6f} | {result.logged[k]:.6f} | {abs(result.reproduced[k] - result.logged[k]):.1e} |"
        for k in result.logged)
    others = ", ".join(f"{k} {v:.6f}" for k, v in result.reproduced.items() if k not in result.logged)
    quant = cfg.model.quantize
    merged_line = ""
    if result.merged is not None:
        shown = ", ".join(f"{k} {result.merged_metrics[k]:.6f}" for k in result.logged if k in result.merged_metrics)
        if result.merged_dtype is not None:
            merged_line = (f"\nThe merged model in `{MERGED_DIR}/` is the {quant} base dequantized to {result.merged_dtype} "
                           f"(bitsandbytes' dequantization) with the adapter folded in, all in {result.merged_dtype}; plain "
                           f"`{auto}.from_pretrained`. A quantized layer cannot hold the merged weights, so this is "
                           f"not the quantized model the adapter was trained on: it gives {shown} (reported, not "
                           "checked against the logged metric).\n")
        else:
            merged_line = (f"\nThe merged model in `{MERGED_DIR}/` (adapter folded into the base weights; plain "
                           f"`{auto}.from_pretrained`) gives {shown}.\n")
    quant_row, quant_import, quant_arg, quant_load = "", "", "", ""
    if quant != "none":
        how = ("NF4, double quantization, bf16 compute" if quant == "4bit" else "LLM.int8")
        quant_row = (f"| base quantized | {quant} with bitsandbytes ({how}); the adapter was trained and checked on "
                     "the base loaded this way |\n")
        bnb = ('BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, '
               'bnb_4bit_compute_dtype=torch.bfloat16)' if quant == "4bit" else "BitsAndBytesConfig(load_in_8bit=True)")
        quant_import, quant_arg = "import torch\n", f",\n    quantization_config={bnb}"
        quant_load = f', quantize="{quant}"'
    base_note = ""
    if builtin:
        base_note = (f"\nThe base is lora-sweep's built-in `{cfg.model.name}`; `sweeps.models.load_model("
                     f"\"{cfg.model.name}\", ...)` loads exactly the weights the adapter was trained on.")
        if cfg.model.name not in _HUB_IDS:
            base_note += " Its weights are converted (see `lora-sweep` docs), so load it that way, not from the hub."
    peft_base = base if not builtin or cfg.model.name in _HUB_IDS else cfg.model.name
    versions = {k.removeprefix("version."): v for k, v in sorted(run.data.params.items()) if k.startswith("version.")}
    text = f"""---
{yaml.safe_dump(front, sort_keys=False).rstrip()}
---

# {config.name}, trial {frozen.number}: LoRA adapter for {base}

A LoRA adapter found by lora-sweep: {why_text} of the sweep `{config.name}`, checked at export: it
loads strictly and reproduces the validation metric its MLflow run logged.

The sweep's margin, the smallest difference in {objective} that matters: {config.search.margin_value(task):g}.
{f"Its recommendation: {why}." if why else "The sweep has no recommendation yet."}

## Model and data

| | |
|---|---|
| base model | `{cfg.model.name}`{f" ({base})" if base != cfg.model.name else ""} |
| task | {task_text} |
| data | {data.source} |
| examples | train {sizes['train']}, validation {sizes['validation']}, test {sizes['test']} (max_length {cfg.data.max_length}, split seed {config.seed}) |
{quant_row}{base_note}

## LoRA

| | |
|---|---|
| r | {lo.r} |
| alpha | {lo.alpha:g} (scaling {('alpha/sqrt(r)' if lo.rslora else 'alpha/r')} = {(lo.alpha / math.sqrt(lo.r) if lo.rslora else lo.alpha / lo.r):g}) |
| targets | {', '.join(lo.targets)} ({len(counts['modules'])} modules) |
| dropout | {lo.dropout:g} |
| modules_to_save | {', '.join(counts['saved_paths']) or 'none'} |
| trainable parameters | {counts['trainable']:,} ({f"{counts['lora']:,} LoRA + {counts['saved']:,} in saved modules; " if counts['saved'] else ""}{counts['fraction']:.3%} of the base's {counts['base']:,}) |
| training | {cfg.train.steps} steps, batch {cfg.train.batch_size} x {cfg.train.grad_accum}, lr {cfg.train.lr:g} ({cfg.train.schedule}), seed {cfg.seed} |

## Metrics (validation split)

| metric | reproduced at export | logged by the trial | abs. difference |
|---|---|---|---|
{metric_rows}
{f"{chr(10)}Also at export: {others}.{chr(10)}" if others else ""}{merged_line}
{test_text}
## Provenance

| | |
|---|---|
| sweep | `{config.name}` ({config.search.strategy}, objective {objective}, {config.search.objective_direction(task)}) |
| study storage | `{storage}` |
| trial | {frozen.number} (seed index {frozen.user_attrs.get('seed_index', 0)}, seed {cfg.seed}) |
| params | {', '.join(f'{k}={fmt_value(v)}' for k, v in frozen.params.items())} |
| MLflow run | `{run.info.run_id}` in `{tracking}` (experiment `{config.experiment()}`) |
| exported | {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} with lora-sweep {_version('lora-sweep')} |
| trained with | {', '.join(f'{k} {v}' for k, v in versions.items())} |

## Use with PEFT

```python
{quant_import}from transformers import {auto}, AutoTokenizer{", BitsAndBytesConfig" if quant_arg else ""}
from peft import PeftModel
base = {auto}.from_pretrained("{peft_base}"{labels}{quant_arg})
model = PeftModel.from_pretrained(base, "path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```

`model.merge_and_unload()` folds the adapter into the base weights{" (on a quantized base PEFT quantizes the merged weights again, which rounds them)" if quant_arg else ""}.

## Use with lora_core

```python
import lora_core
from sweeps.models.load import load_model
base = load_model("{cfg.model.name}", "{task}"{labels}{quant_load}).model
model = lora_core.load_adapter(base, "path/to/this/folder")   # strict: every key, every shape
```
"""
    return re.sub(r"\n{3,}", "\n\n", text)


def _data_name(cfg: TrialConfig) -> str:
    if cfg.data.name:
        return cfg.data.name + (f"/{cfg.data.config}" if cfg.data.config else "")
    files = cfg.data.files
    if isinstance(files, dict):
        return ", ".join(Path(v).name for v in files.values())
    return Path(str(files)).name


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"
