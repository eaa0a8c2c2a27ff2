"""The starter sweep ``lora-sweep init`` writes: a ladder sweep for one model and data set, as commented YAML.

    >>> spec = StarterSpec(name="my-sweep", model="smollm2-135m", task="causal-lm", data={"files": "pairs.jsonl"},
    ...                    columns={"prompt": "prompt", "completion": "completion"}, targets=["q,v", "all-linear"])
    >>> text = render_starter(spec)     # YAML that load_sweep_config accepts as it is

The defaults (`starter_defaults`) follow the project's guidance: start at r=1 and double while the
gain beats the measured seed noise (two to four seeds per configuration: more only where a comparison
is undecided), alpha fixed at r_start, the learning
rate calibrated at r=1 among four log-spaced values of a range about ten times a full fine-tune's,
then the wider target sets at the chosen rank. Every setting carries a one-line comment.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from sweeps.config.sweep import SWEEP_NAME_RE
from sweeps.config.trial import objective_of
from sweeps.stats import default_margin

__all__ = ["StarterSpec", "ladder_trials", "render_starter", "starter_defaults", "sweep_name"]

LADDER_TARGETS = ("q,v", "q,k,v,o", "all-linear")   # the ladder's widening order, when the model has them
CALIBRATION_LRS = 4                                 # a range gives this many log-spaced candidates
_PLAIN = re.compile(r"^[A-Za-z0-9_./][A-Za-z0-9_./@+-]*$")
_YAML_WORDS = {"null", "true", "false", "yes", "no", "on", "off", "y", "n", "~"}
_COMMENT_AT = 40  # comments line up after the longest setting up to this width


@dataclass
class StarterSpec:
    """What the starter sweep is made of (the defaults by task are `starter_defaults`)."""

    name: str
    model: str
    task: str
    data: dict[str, Any]                  # {"name": ...} or {"files": ...} (+ "config" for a hub data set)
    columns: dict[str, str]
    targets: list[str]                    # the ladder's target sets, all resolvable on the model
    max_length: int = 128
    prompt_template: str | None = None    # causal-lm: how a prompt is written before its completion
    steps: int = 200
    batch_size: int = 32
    eval_every: int = 50
    lr_low: float = 1e-3
    lr_high: float = 3e-2
    r_start: int = 1
    r_max: int = 16
    seeds: int = 2
    max_seeds: int = 4
    header: list[str] = field(default_factory=list)   # comment lines at the top (what init found)


def starter_defaults(task: str, max_positions: int | None) -> dict[str, Any]:
    """Steps, batch, sequence length and learning-rate range by task (sequence length capped by the model)."""
    if task == "classification":
        values: dict[str, Any] = {"steps": 200, "batch_size": 32, "eval_every": 50, "max_length": 128,
                                  "lr_low": 1e-3, "lr_high": 3e-2}
    else:
        values = {"steps": 300, "batch_size": 8, "eval_every": 50, "max_length": 256, "lr_low": 3e-4,
                  "lr_high": 1e-2, "prompt_template": "{prompt}\n"}
    if max_positions:
        values["max_length"] = min(values["max_length"], max_positions)
    return values


def ladder_trials(spec: StarterSpec) -> int:
    """The most trials the ladder can plan: calibration, every rung, every wider target set (``max_seeds`` each,
    at every calibration rate: the lr bracket can walk a configuration over all of them)."""
    rungs, r = 0, spec.r_start
    while r <= spec.r_max:
        rungs, r = rungs + 1, r * 2
    return CALIBRATION_LRS + max(spec.seeds, spec.max_seeds) * CALIBRATION_LRS * (rungs + len(spec.targets) - 1)


def sweep_name(*parts: str) -> str:
    """A valid sweep name from the model's and the data's names (``smollm2-135m-pairs``)."""
    words = []
    for part in parts:
        stem = re.split(r"[\\/]", part.rstrip("/\\"))[-1]
        stem = re.sub(r"\.(csv|tsv|jsonl?|parquet)$", "", stem, flags=re.IGNORECASE)
        words.append(re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._"))
    name = "-".join(w for w in words if w) or "sweep"
    return name if SWEEP_NAME_RE.match(name) else "sweep"


def render_starter(spec: StarterSpec) -> str:
    """The sweep as commented YAML (one setting per line, a comment on each)."""
    q = _scalar
    classification = spec.task == "classification"
    rows: list[tuple[str, str]] = [
        (f"name: {q(spec.name)}", "the Optuna study, its journal file and the MLflow experiment"),
        ("seed: 0", "a configuration's seeds are seed, seed+1, ..."),
        ("model:", ""),
        (f"  name: {q(spec.model)}", "a built-in alias, a local directory or a hub id"),
        (f"  task: {spec.task}", "classification | causal-lm"),
        ("  dtype: auto", "bfloat16 on a GPU that has it, else float32"),
        ("  device: auto", "cuda when there is one, else cpu"),
        ("data:", "")]
    if "files" in spec.data:
        rows += [("  name: null", "no built-in or hub data set: the file below"),
                 (f"  files: {q(spec.data['files'])}", "one file, split 80/10/10 (a relative path starts at the "
                                                      "working directory)")]
    else:
        rows.append((f"  name: {q(spec.data['name'])}", "a built-in data set or a hub data set id"))
        if spec.data.get("config"):
            rows.append((f"  config: {q(spec.data['config'])}", "the hub data set's configuration"))
    mapping = ", ".join(f"{role}: {q(column)}" for role, column in spec.columns.items())
    roles = "text (+ text_pair) and label" if classification else "prompt and completion"
    rows += [(f"  columns: {{{mapping}}}", f"role -> column: {roles}"),
             (f"  max_length: {spec.max_length}", "tokens per example; longer ones are truncated")]
    if not classification:
        rows += [(f"  prompt_template: {q(spec.prompt_template or '{prompt}')}",
                  "the prompt as the model reads it; the completion follows"),
                 ("  chat_template: false", "true: wrap the prompt in the tokenizer's chat template")]
    rows += [
        ("lora:", ""),
        ("  modules_to_save: auto", "the classifier head trains alongside the adapter" if classification
         else "nothing trains beside the adapter (the LM head is pretrained)"),
        ("train:", ""),
        (f"  steps: {spec.steps}", "optimizer steps per trial"),
        (f"  batch_size: {spec.batch_size}", "examples per step"),
        ("  schedule: linear", "warm-up, then linear decay"),
        ("  warmup_ratio: 0.06", "share of the steps spent warming up"),
        (f"  eval_every: {spec.eval_every}", "steps between validation passes"),
        ("tracking:", ""),
        ("  home: lora-sweeps", "the study, the MLflow store and the report go here"),
        ("search:", ""),
        ("  strategy: ladder", "start low, double the rank while it pays, then widen the targets"),
        (f"  n_trials: {ladder_trials(spec)}", "a cap: the most trials this ladder can plan"),
        (f"  lr: {{low: {_float(spec.lr_low)}, high: {_float(spec.lr_high)}}}",
         f"calibrated at r_start among {CALIBRATION_LRS} log-spaced values"),
        ("  dropout: [0.0]", "LoRA dropout"),
        (f"  margin: {_margin(spec.task)}", _margin_comment(spec.task)),
        ("  ladder:", ""),
        (f"    r_start: {spec.r_start}", "the first rank"),
        (f"    r_max: {spec.r_max}", "ranks r_start, 2 r_start, ... up to r_max"),
        (f"    targets: {_flow(spec.targets)}", "stage 1 uses the first; stage 2 tries the others"),
        (f"    seeds: {spec.seeds}", "the minimum per configuration: the seed noise is measured, not guessed"),
        (f"    max_seeds: {spec.max_seeds}", "an undecided comparison gets one more seed each side, up to this"),
        ("    alpha: null", "fixed across ranks; null = r_start"),
        ("    calibrate: true", "stage 0 picks the learning rate (false: train.lr)"),
        ("    calibration_steps: null", "null: half of train.steps"),
        ("    false_gain_rate: 0.05", "a gain counts when a t-test of the seed means says so; on pure noise "
                                    "the ladder calls any gain at most this often"),
        ("    patience: 2", "rungs in a row shown no gain (a plateau) before stopping"),
        ("    retune_lr: true", "a rung or target set not shown a gain is tried at the neighbouring rates"),
        ("    climb_undecided: true", "a rung still undecided at max_seeds is not a plateau (false: stop there)"),
        ("    max_params: null", "cost limits (null: none): trainable parameters,"),
        ("    max_train_s: null", "train seconds per trial,"),
        ("    max_memory_mb: null", "peak memory in MiB")]
    width = max(len(text) for text, comment in rows if comment and len(text) <= _COMMENT_AT) + 2
    lines = [f"# {line}" if line else "#" for line in spec.header]
    lines.append("# Run it with: lora-sweep run <this file>  (again to resume; --set key=value overrides a setting)")
    for text, comment in rows:
        lines.append(f"{text.ljust(width) if len(text) < width else text + '  '}# {comment}" if comment else text)
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _margin(task: str) -> str:
    """The margin ``init`` writes: the task's default objective's (`sweeps.stats.default_margin`)."""
    return f"{default_margin(objective_of(task)[0]):g}"


def _margin_comment(task: str) -> str:
    metric = objective_of(task)[0]
    what = "one point of accuracy" if metric == "accuracy" else f"{_margin(task)} of {metric}"
    return (f"the smallest difference in {metric} that matters to you ({what}): a gain must be shown above it, and "
            "the cheapest configuration shown within it of the best is recommended")


def _scalar(value: str) -> str:
    """A YAML scalar for ``value``: plain when that reads back as the same string, else JSON-quoted."""
    if _PLAIN.match(value) and value.lower() not in _YAML_WORDS and not _number_like(value):
        return value
    return json.dumps(value)


def _number_like(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return bool(re.match(r"^[0-9][0-9_:.eE+-]*$", value))
    return True


def _float(value: float) -> str:
    """``3.0e-4``: a float that YAML 1.1 (PyYAML) reads as a float, not a string."""
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent):+d}"


def _flow(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"
