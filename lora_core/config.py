"""``LoraConfig``: what to adapt and how, validated on construction."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from lora_core.errors import LoraError

InitKind = Literal["kaiming", "gaussian"]
_INITS = ("kaiming", "gaussian")


def _as_tuple_of_str(value: str | Iterable[str], what: str) -> tuple[str, ...]:
    """Accept ``"q,v"``, ``["q", "v"]`` or ``("q", "v")``; strip blanks and drop empties."""
    if isinstance(value, str):
        items = value.split(",")
    else:
        try:
            items = list(value)
        except TypeError:
            raise LoraError(f"{what} must be a string or a list of strings, got {value!r}") from None
    out = []
    for item in items:
        if not isinstance(item, str):
            raise LoraError(f"{what} must contain strings, got {item!r}")
        item = item.strip()
        if item:
            out.append(item)
    return tuple(out)


def pattern_matches(pattern: str, path: str) -> bool:
    """Whether a module path is named by ``pattern``: the exact path, a dotted suffix, or a regex.

    ``"q_proj"`` names ``model.layers.0.self_attn.q_proj``; ``"layers.0.self_attn.q_proj"`` names only
    layer 0's; ``"re:.*layers\\.[0-3]\\..*q_proj"`` (or any pattern with regex characters) is matched
    against the whole path.
    """
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    if path == pattern or path.endswith("." + pattern):
        return True
    if any(ch in pattern for ch in "*+?[](){}|^$\\"):
        try:
            return re.fullmatch(pattern, path) is not None
        except re.error:
            return False
    return False


@dataclass(frozen=True)
class LoraConfig:
    """How to adapt a model with LoRA.

    Args:
        r: Rank of the update ``B @ A`` (A is ``r x in``, B is ``out x r``). At least 1.
        alpha: Scale numerator: the update is multiplied by ``alpha / r`` (``alpha / sqrt(r)`` with
            ``rslora``). Positive.
        targets: Which linear layers to adapt: presets (``q``, ``k``, ``v``, ``o``, ``attn``, ``mlp``,
            ``all-linear``), exact module paths, dotted suffixes such as ``q_proj``, or regexes
            (prefix ``re:``). A comma-separated string is split.
        dropout: Dropout on the LoRA branch's input, ``0 <= dropout < 1``.
        init: ``"kaiming"`` (kaiming-uniform with ``a = sqrt(5)``, the loralib/PEFT default) or
            ``"gaussian"`` (normal with std ``1 / r``; the paper says "random Gaussian"). B is zero
            either way, so the adapted model starts equal to the base model.
        rslora: Scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA) instead of ``alpha / r``.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
        rank_pattern: Per-module rank overrides, ``{pattern: r}`` with patterns as for targets.
        alpha_pattern: Per-module alpha overrides, ``{pattern: alpha}``.
    """

    r: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0
    init: InitKind = "kaiming"
    rslora: bool = False
    modules_to_save: tuple[str, ...] = ()
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_rank(self.r, "r")
        _check_alpha(self.alpha, "alpha")
        object.__setattr__(self, "alpha", float(self.alpha))
        targets = _as_tuple_of_str(self.targets, "targets")
        if not targets:
            raise LoraError("targets is empty: LoRA needs at least one module to adapt",
                            hint="use a preset such as targets=['q', 'v'] or a module name such as 'q_proj'")
        object.__setattr__(self, "targets", targets)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not (
            0.0 <= float(self.dropout) < 1.0
        ):
            raise LoraError(f"dropout must be a number with 0 <= dropout < 1, got {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))
        if self.init not in _INITS:
            raise LoraError(f"init must be one of {', '.join(_INITS)}, got {self.init!r}")
        if not isinstance(self.rslora, bool):
            raise LoraError(f"rslora must be true or false, got {self.rslora!r}")
        object.__setattr__(self, "modules_to_save", _as_tuple_of_str(self.modules_to_save, "modules_to_save"))
        for what in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, what), Mapping):
                raise LoraError(f"{what} must be a mapping of module pattern to value, got {getattr(self, what)!r}")
        for key, rank in dict(self.rank_pattern).items():
            _check_pattern_key(key, "rank_pattern")
            _check_rank(rank, f"rank_pattern[{key!r}]")
        for key, alpha in dict(self.alpha_pattern).items():
            _check_pattern_key(key, "alpha_pattern")
            _check_alpha(alpha, f"alpha_pattern[{key!r}]")
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", {k: float(v) for k, v in dict(self.alpha_pattern).items()})

    def rank_for(self, path: str) -> int:
        """The rank used for the module at ``path`` (``rank_pattern`` wins over ``r``)."""
        for pattern, value in self.rank_pattern.items():
            if pattern_matches(pattern, path):
                return int(value)
        return self.r

    def alpha_for(self, path: str) -> float:
        """The alpha used for the module at ``path`` (``alpha_pattern`` wins over ``alpha``)."""
        for pattern, value in self.alpha_pattern.items():
            if pattern_matches(pattern, path):
                return float(value)
        return self.alpha

    def scaling_for(self, path: str) -> float:
        """The factor applied to ``B @ A`` at ``path``: alpha/r, or alpha/sqrt(r) with rslora."""
        return scaling(self.rank_for(path), self.alpha_for(path), self.rslora)

    def to_dict(self) -> dict[str, Any]:
        return {
            "r": self.r,
            "alpha": self.alpha,
            "targets": list(self.targets),
            "dropout": self.dropout,
            "init": self.init,
            "rslora": self.rslora,
            "modules_to_save": list(self.modules_to_save),
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LoraError(f"unknown LoRA config key(s): {', '.join(unknown)}",
                            hint=f"valid keys: {', '.join(sorted(known))}")
        return cls(**dict(data))


def scaling(r: int, alpha: float, rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def _check_pattern_key(key: Any, what: str) -> None:
    if not isinstance(key, str) or not key.strip():
        raise LoraError(f"{what} keys must be module names or patterns, got {key!r}")


def _check_rank(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LoraError(f"{what} must be an integer >= 1, got {value!r}",
                        hint="LoRA ranks are usually 1, 2, 4, 8, 16, 32 or 64")


def _check_alpha(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise LoraError(f"{what} must be a positive number, got {value!r}",
                        hint="a common choice is alpha = r or alpha = 2r")
