"""Trial configuration: YAML -> validated dataclasses, with ``--set key=value`` overrides.

Every user mistake (malformed YAML, an unknown key, a wrong type, an out-of-range value) raises
``lora_core.LoraError`` naming the dotted key, with a hint; nothing is run or written before the whole
config validates.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from lora_core import LoraConfig, LoraError
from sweeps.secrets import strip_credentials

Task = Literal["classification", "causal-lm"]


def objective_of(task: str) -> tuple[str, Literal["maximize", "minimize"]]:
    """The metric a trial of ``task`` is judged by by default, and which way is better."""
    return ("accuracy", "maximize") if task == "classification" else ("eval_loss", "minimize")


@dataclass
class ModelConfig:
    """The base model. ``name``: a built-in alias (minilm-l6, smollm2-135m), a local directory, or a hub id."""

    name: str = "minilm-l6"
    task: Task = "classification"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    quantize: Literal["none", "4bit", "8bit"] = "none"  # frozen base in bitsandbytes 4bit (NF4, QLoRA) or 8bit (LLM.int8)


@dataclass
class DataConfig:
    """The data set: a built-in name (pydoc-topics, pydoc-names), a hub data set, or local files.

    ``files`` maps split names to local csv/json/jsonl/parquet paths (or is one path, split by
    ``split_fractions``). ``columns`` maps roles to column names: classification uses ``text``,
    ``text_pair`` (optional) and ``label``; causal-lm uses ``prompt`` and ``completion``.
    """

    name: str | None = "pydoc-topics"
    config: str | None = None
    files: dict[str, str] | str | None = None
    splits: dict[str, str] = field(default_factory=dict)
    split_fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    columns: dict[str, str] = field(default_factory=dict)
    max_length: int = 64
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    prompt_template: str = "{prompt}\n"
    chat_template: bool = False


@dataclass
class LoraSection:
    """LoRA hyperparameters (see ``lora_core.LoraConfig``). ``modules_to_save: auto`` trains the
    classification head for classification and nothing extra for causal-lm."""

    r: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    dropout: float = 0.0
    init: Literal["kaiming", "gaussian"] = "kaiming"
    rslora: bool = False
    modules_to_save: Literal["auto"] | list[str] = "auto"
    enabled: bool = True  # false: the head-only baseline (no LoRA; train only modules_to_save)


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 32
    grad_accum: int = 1
    # Rows per forward/backward: each batch is split into micro-batches of at most this many rows whose
    # losses add up to the batch's (null: the whole batch). On CUDA an out-of-memory error before the
    # first evaluation restarts the trial with half the micro-batch (sweeps.training.memory).
    micro_batch_size: int | None = None
    gradient_checkpointing: bool = False  # recompute each layer's activations in the backward (less memory)
    lr: float = 2e-3
    weight_decay: float = 0.0
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = 0.06
    max_grad_norm: float | None = 1.0
    eval_every: int = 50
    eval_batch_size: int = 128
    generate_samples: int = 32
    max_new_tokens: int = 24
    head_lr: float | None = 1e-2  # a fresh classification head learns faster than the adapter


@dataclass
class TrackingConfig:
    """Where runs go. ``uri`` defaults to ``sqlite:///<home>/mlflow.db`` with artifacts under
    ``<home>/artifacts``; an ``http://`` tracking server works too."""

    home: str = "lora-sweeps"
    uri: str | None = None
    experiment: str | None = None


@dataclass
class TrialConfig:
    name: str = "default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> TrialConfig:
        self._check_sizes()
        _positive(self.train.steps, "train.steps")
        _positive(self.train.batch_size, "train.batch_size")
        _positive(self.train.grad_accum, "train.grad_accum")
        if self.train.micro_batch_size is not None:  # (above batch_size: the whole batch, e.g. in a batch sweep)
            _positive(self.train.micro_batch_size, "train.micro_batch_size")
        _positive(self.train.eval_every, "train.eval_every")
        _positive(self.train.eval_batch_size, "train.eval_batch_size")
        _positive(self.data.max_length, "data.max_length")
        if not self.train.lr > 0:
            raise LoraError(f"train.lr must be positive, got {self.train.lr}", hint="LoRA often uses 1e-4 to 2e-3")
        if self.train.head_lr is not None and not self.train.head_lr > 0:
            raise LoraError(f"train.head_lr must be positive, got {self.train.head_lr}",
                            hint="or null to train the head at train.lr")
        if self.train.max_grad_norm is not None and not self.train.max_grad_norm > 0:
            raise LoraError(f"train.max_grad_norm must be positive, got {self.train.max_grad_norm}",
                            hint="or null to turn gradient clipping off")
        if not self.train.weight_decay >= 0:
            raise LoraError(f"train.weight_decay must be >= 0, got {self.train.weight_decay}")
        if not 0 <= self.train.warmup_ratio < 1:
            raise LoraError(f"train.warmup_ratio must be in [0, 1), got {self.train.warmup_ratio}")
        fr = self.data.split_fractions
        if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1) > 1e-6 or fr[0] == 0 or fr[1] == 0:
            raise LoraError(f"data.split_fractions must be 3 non-negative numbers summing to 1, got {fr}",
                            hint="e.g. [0.8, 0.1, 0.1] for train, validation, test")
        if self.data.name is None and self.data.files is None:
            raise LoraError("data needs a name (built-in or hub data set) or files", hint="e.g. data.name: pydoc-topics")
        self.lora_config()  # validates r, alpha, dropout, targets
        return self

    def _check_sizes(self) -> None:
        """Upper bounds (and non-negative counts) of every size in a trial config."""
        check_seed(self.seed, "seed")
        tr, data = self.train, self.data
        at_most(tr.steps, MAX_STEPS, "train.steps")
        for key in ("batch_size", "eval_batch_size", "grad_accum"):
            at_most(getattr(tr, key), MAX_BATCH, f"train.{key}")
        if tr.micro_batch_size is not None:
            at_most(tr.micro_batch_size, MAX_BATCH, "train.micro_batch_size")
        at_most(data.max_length, MAX_LENGTH, "data.max_length", hint="tokens per row; the model's positions bound it too")
        if tr.generate_samples < 0:
            raise LoraError(f"train.generate_samples must be >= 0, got {tr.generate_samples}",
                            hint="validation prompts generated at each evaluation (causal-lm); 0: none")
        at_most(tr.generate_samples, MAX_GENERATE_SAMPLES, "train.generate_samples")
        _positive(tr.max_new_tokens, "train.max_new_tokens")
        at_most(tr.max_new_tokens, MAX_NEW_TOKENS, "train.max_new_tokens")
        for key in ("max_train_samples", "max_eval_samples"):
            if getattr(data, key) is not None:
                _positive(getattr(data, key), f"data.{key}")
        at_most(self.lora.r, MAX_RANK, "lora.r", hint="the model's layer sizes bound it too")

    def lora_config(self, modules_to_save: tuple[str, ...] = ()) -> LoraConfig:
        lo = self.lora
        try:
            return LoraConfig(r=lo.r, alpha=lo.alpha, targets=tuple(lo.targets), dropout=lo.dropout, init=lo.init,
                              rslora=lo.rslora, modules_to_save=modules_to_save)
        except LoraError as exc:
            raise LoraError(f"lora: {exc.message}", hint=exc.hint) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def stored_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` as it may be stored or shown (a study, an MLflow artifact, a model card): the
        tracking URI and the Optuna storage without their credentials (`sweeps.secrets`)."""
        data = self.to_dict()
        data["tracking"]["uri"] = strip_credentials(data["tracking"]["uri"])
        search = data.get("search")
        if isinstance(search, dict) and search.get("storage"):
            search["storage"] = strip_credentials(search["storage"])
        return data


def _positive(value: int, key: str) -> None:
    if value < 1:
        raise LoraError(f"{key} must be >= 1, got {value}")


# Upper bounds of the sizes a user types: far above any real use, low enough that nothing allocates, loops or
# plans anywhere near without end (checked when a config is read, before anything runs).
MAX_SEED = 2**32 - 1          # numpy's and Optuna's samplers take seeds below 2**32
MAX_STEPS = 10_000_000
MAX_BATCH = 65_536
MAX_LENGTH = 131_072          # tokens per row (a model's own positions are checked when it is inspected)
MAX_GENERATE_SAMPLES = 100_000
MAX_NEW_TOKENS = 32_768
MAX_RANK = 65_536


def at_most(value: int | float, limit: int | float, key: str, hint: str | None = None) -> None:
    """Refuse ``value`` above ``limit`` in one line (and a hint)."""
    if value > limit:
        raise LoraError(f"{key} must be <= {limit:,}, got {value:,}", hint=hint)


def check_seed(value: int, key: str) -> None:
    if not 0 <= value <= MAX_SEED:
        raise LoraError(f"{key} must be in 0 .. {MAX_SEED} (2**32 - 1), got {value}",
                        hint="a seed is a non-negative integer; seeds of repeats count up from it")


# --- generic strict conversion -------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _convert(value, arg, key)
            except LoraError:
                continue
        raise LoraError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise LoraError(f"{key} must be one of {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise LoraError(f"{key} must be null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise LoraError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise LoraError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise LoraError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise LoraError(f"{key} must be a string, got {value!r}")
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, str) and item_tp is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise LoraError(f"{key} must be a list, got {value!r}")
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = get_args(tp)
        if not isinstance(value, dict):
            raise LoraError(f"{key} must be a mapping, got {value!r}")
        return {_convert(k, k_tp, key): _convert(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def from_dict(cls: type, data: Any, key: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    where = key or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LoraError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        dotted = f"{key}.{k}" if key else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys here: {', '.join(names)}"
            raise LoraError(f"unknown key {dotted!r} in the config", hint=hint)
        kwargs[k] = _convert(v, hints[k], dotted)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"lora.r=16"`` -> (["lora", "r"], 16); the value is read as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise LoraError(f"--set expects key=value, got {text!r}", hint="e.g. --set lora.r=16 --set train.lr=5e-4")
    k, v = text.split("=", 1)
    path = [p for p in k.strip().split(".") if p]
    if not path:
        raise LoraError(f"--set {text}: the key is empty", hint="e.g. --set lora.r=16")
    try:
        value = yaml.safe_load(v) if v.strip() else ""
    except yaml.YAMLError:
        value = v
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            if node.get(part) is None:  # absent, or an empty section in the YAML file (``lora:``)
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise LoraError(f"--set {text}: {part!r} is not a section")
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise LoraError(f"config file {p} does not exist", hint="pass a YAML file, or nothing for the built-in default")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise LoraError(f"{p} is not valid YAML{where}: {problem}", hint="check indentation and quoting") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LoraError(f"{p} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def load_trial_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrialConfig:
    """Read a trial config (or the built-in default when ``path`` is None) and apply overrides."""
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, overrides or [])
    return from_dict(TrialConfig, data).validate()
