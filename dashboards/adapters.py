"""The LoRA paper's analyses (Hu et al. 2021, section 7) on a sweep's real adapters.

Adapters are downloaded from the MLflow runs (``adapter/``, PEFT format) and read by lora_core's
reader (:func:`lora_core.files.read_adapter_files`, no model involved): per adapted module the A
matrix (``r x in``; for a fused q/k/v layer written by lora_core, one ``r x in`` block per adapted
role, from lora_core's metadata) and the update ``dW = scale * B @ A`` with PEFT's scaling rules as
lora_core applies them (``lora_core.config.scaling``: ``lora_alpha / r``, or ``/ sqrt(r)`` with
``use_rslora``; ``rank_pattern`` / ``alpha_pattern`` per module by
``lora_core.peft_config.pattern_value``), which is exact for the fused layout too. The numbers come
from ``lora_core.analysis``:

- subspace similarity (the paper's Figure 3): ``subspace_similarity_grid(A_low, A_high)``, phi for
  every i <= r_low, j <= r_high, for the first, middle and last adapted layer of one matrix type;
- amplification factor (the paper's Table 7): ``amplification_factor(W, dW, r)`` per adapted module,
  with W the base model's weight (``sweeps.models.load_model``, on the CPU in float32).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dashboards.records import ConfigStats, SweepData, TrialRecord, fmt_num
from dashboards.views import rank_table
from lora_core.config import scaling
from lora_core.files import PREFIX, read_adapter_files
from lora_core.peft_config import pattern_value
from sweeps.text import first_line

__all__ = ["AdapterFile", "Amplification", "Similarity", "amplification", "analyses", "read_adapter", "similarity"]

log = logging.getLogger(__name__)

# module types shown first in the similarity heatmaps, in this order (the query projection, as the paper)
QUERY_TYPES = ("query", "q_proj", "q", "q_lin", "c_attn[q]", "qkv_proj[q]", "query_key_value[q]", "Wqkv[q]")


# --------------------------------------------------------------------------- reading adapter files

@dataclass
class AdapterFile:
    """One adapter's LoRA matrices: ``a[module] = (r x in)``, per role for fused layers (``path[role]``),
    and ``delta[path] = scale * B @ A`` (``out x in``, float64)."""

    path: Path
    a: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]
    rank: dict[str, int]                  # PEFT rank of each module path (blocks * r for fused layers)


def read_adapter(folder: Path) -> AdapterFile:
    """A PEFT LoRA adapter directory, read by :func:`lora_core.files.read_adapter_files`, as the analyses
    need it (see the module docstring).

    Raises:
        LoraError: a file is missing or unreadable, or lora_core's metadata is not a JSON object.
    """
    files = read_adapter_files(folder)
    config = files.config
    fused: dict[str, Any] = (files.lora_core_meta() or {}).get("fused") or {}
    r_default, alpha_default = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rslora = bool(config.get("use_rslora", False))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    out = AdapterFile(files.path, {}, {}, {})
    for key in sorted(files.tensors):
        m = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.lora_A\.weight", key)
        if m is None:
            continue
        mpath = m.group(1)
        a = files.tensors[key].double()
        b = files.tensors.get(f"{PREFIX}{mpath}.lora_B.weight")
        if b is None:
            continue
        r = int(pattern_value(rank_pattern, mpath, r_default))
        alpha = float(pattern_value(alpha_pattern, mpath, alpha_default))
        out.delta[mpath] = scaling(r, alpha, rslora) * (b.double() @ a)
        out.rank[mpath] = int(a.shape[0])
        layout = fused.get(mpath)
        if isinstance(layout, dict) and layout.get("roles"):
            per = int(layout["r"])
            for i, role in enumerate(layout["roles"]):
                out.a[f"{mpath}[{role}]"] = a[i * per:(i + 1) * per]
        else:
            out.a[mpath] = a
    return out


@contextlib.contextmanager
def _transformers_quiet() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


class AdapterCache:
    """Downloads adapters of a sweep's runs once, into one temporary folder (removed by ``close``)."""

    def __init__(self, data: SweepData) -> None:
        self.data = data
        self._tmp = tempfile.TemporaryDirectory(prefix="lora-sweep-report-")
        self._files: dict[str, AdapterFile] = {}

    def get(self, trial: TrialRecord) -> AdapterFile:
        from sweeps.tracking.artifacts import download_adapter

        assert trial.run_id
        if trial.run_id not in self._files:
            folder = download_adapter(self.data.config.tracking, trial.run_id, Path(self._tmp.name) / trial.run_id)
            self._files[trial.run_id] = read_adapter(folder)
        return self._files[trial.run_id]

    def close(self) -> None:
        self._tmp.cleanup()


# --------------------------------------------------------------------------- module names

def _natural(path: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path))


def module_type(name: str) -> str:
    """``bert.encoder.layer.0.attention.self.query`` -> ``query``; ``h.0.attn.c_attn[q]`` -> ``c_attn[q]``."""
    return name.rsplit(".", 1)[-1]


def pick_layers(names: list[str]) -> list[str]:
    """First, middle and last of the modules (in layer order), without repeats."""
    ordered = sorted(names, key=_natural)
    picks = [ordered[0], ordered[(len(ordered) - 1) // 2], ordered[-1]]
    return list(dict.fromkeys(picks))


# --------------------------------------------------------------------------- subspace similarity

@dataclass
class SimilarityGrid:
    module: str
    grid: list[list[float]]               # grid[i-1][j-1] = phi(A_low, A_high, i, j)


@dataclass
class Similarity:
    """phi between the lowest- and highest-rank adapters of one target set (or why it is not shown)."""

    note: str = ""
    targets: str | None = None
    module_type: str | None = None
    low: ConfigStats | None = None
    high: ConfigStats | None = None
    low_trial: TrialRecord | None = None
    high_trial: TrialRecord | None = None
    grids: list[SimilarityGrid] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        if not self.grids:
            return {"note": self.note}
        assert self.low and self.high and self.low_trial and self.high_trial
        return {"targets": self.targets, "module_type": self.module_type,
                "r_low": self.low.r, "r_high": self.high.r,
                "low": {"trial": self.low_trial.number, "run_id": self.low_trial.run_id,
                        "seed_index": self.low_trial.seed_index, "params": self.low.params},
                "high": {"trial": self.high_trial.number, "run_id": self.high_trial.run_id,
                         "seed_index": self.high_trial.seed_index, "params": self.high.params},
                "grids": [{"module": g.module, "phi": g.grid} for g in self.grids]}


def _preferred_target_sets(data: SweepData) -> list[str]:
    targets, _, _ = rank_table(data)
    first = data.config_of(data.recommendation) if data.recommendation else None
    if first is not None and first.targets in targets:
        targets = [first.targets] + [t for t in targets if t != first.targets]
    return targets


def similarity(data: SweepData, cache: AdapterCache) -> Similarity:
    """The paper's Figure 3 on this sweep: see the module docstring."""
    from lora_core.analysis import subspace_similarity_grid

    if data.client is None:
        return Similarity(note="the MLflow store could not be read, so no adapter can be analysed")
    _, ranks, cells = rank_table(data)
    candidates = []
    for t in _preferred_target_sets(data):
        with_adapter = sorted(r for r in ranks if (t, r) in cells and cells[(t, r)].config.seed0() is not None)
        if len(with_adapter) >= 2:
            candidates.append((t, with_adapter[0], with_adapter[-1]))
    if not candidates:
        if len(ranks) < 2:
            return Similarity(note=f"the sweep has only one rank (r={ranks[0]}) among its COMPLETE trials, so there "
                                   "is no lower- and higher-rank adapter pair to compare")
        return Similarity(note="no target set has COMPLETE adapters at two different ranks")
    t, r_low, r_high = candidates[0]
    low, high = cells[(t, r_low)].config, cells[(t, r_high)].config
    low_trial, high_trial = low.seed0(), high.seed0()
    assert low_trial and high_trial
    out = Similarity(targets=t, low=low, high=high, low_trial=low_trial, high_trial=high_trial)
    try:
        a_low, a_high = cache.get(low_trial).a, cache.get(high_trial).a
    except Exception as exc:
        log.warning("subspace similarity: %s", exc)
        return Similarity(note=f"the adapters could not be read: {first_line(exc)}")
    common = sorted(set(a_low) & set(a_high), key=_natural)
    if not common:
        return Similarity(note="the two adapters have no adapted module in common")
    types = sorted({module_type(n) for n in common})
    chosen = next((q for q in QUERY_TYPES if q in types), types[0])
    out.module_type = chosen
    for name in pick_layers([n for n in common if module_type(n) == chosen]):
        grid = subspace_similarity_grid(a_low[name], a_high[name])
        out.grids.append(SimilarityGrid(name, [[float(v) for v in row] for row in grid.tolist()]))
    return out


# --------------------------------------------------------------------------- amplification factor

@dataclass
class AmplificationRow:
    module: str
    r: int
    delta_norm: float                     # ||dW||_F
    projected_norm: float                 # ||U^T W V^T||_F
    factor: float


@dataclass
class Amplification:
    """The amplification factor of one adapter per adapted module (or why it is not shown)."""

    note: str = ""
    config: ConfigStats | None = None
    trial: TrialRecord | None = None
    which: str = ""                       # "recommended" | "best"
    rows: list[AmplificationRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        if not self.rows:
            return {"note": self.note}
        assert self.config and self.trial
        return {"which": self.which, "trial": self.trial.number, "run_id": self.trial.run_id,
                "seed_index": self.trial.seed_index, "params": self.config.params,
                "rows": [{"module": r.module, "r": r.r, "delta_norm": r.delta_norm,
                          "projected_norm": r.projected_norm, "factor": r.factor} for r in self.rows],
                "skipped": self.skipped}


def amplification(data: SweepData, cache: AdapterCache) -> Amplification:
    """The paper's Table 7 for the recommended adapter (the best one when there is no recommendation
    with an adapter): see the module docstring."""
    from lora_core.analysis import amplification_factor, base_weight
    from sweeps.engine.space import trial_config
    from sweeps.models.load import load_model

    if data.client is None:
        return Amplification(note="the MLflow store could not be read, so no adapter can be analysed")
    picks = []
    if data.recommendation is not None:
        picks.append(("recommended", data.config_of(data.recommendation)))
    if data.best_quality is not None:
        picks.append(("best", data.config_of(data.best_quality)))
    picks.append(("best", data.best_config()))
    which, config, trial = "", None, None
    for label, c in picks:
        if c is not None and c.seed0() is not None:
            which, config, trial = label, c, c.seed0()
            break
    if config is None or trial is None:
        return Amplification(note="no COMPLETE trial of the recommended or best configuration logged an adapter")
    out = Amplification(config=config, trial=trial, which=which)
    try:
        adapter = cache.get(trial)
        cfg = trial_config(data.config, trial.params, trial.seed_index)
        task = cfg.model.task
        # only the adapted matrices' base weights are read: the classification head's size does not
        # matter (transformers' report of a re-initialised head is silenced)
        with _transformers_quiet():
            loaded = load_model(cfg.model.name, task, num_labels=2 if task == "classification" else None,
                                dtype="float32", device="cpu", trust_remote_code=cfg.model.trust_remote_code)
    except Exception as exc:
        log.warning("amplification factor: %s", exc)
        return Amplification(note=f"the adapter or the base model could not be loaded: {first_line(exc)}")
    modules = dict(loaded.model.named_modules())
    for mpath in sorted(adapter.delta, key=_natural):
        delta = adapter.delta[mpath]
        module = modules.get(mpath)
        if module is None or not hasattr(module, "weight"):
            out.skipped.append(f"{mpath} (not in the base model)")
            continue
        w = base_weight(module).double()
        if tuple(w.shape) != tuple(delta.shape):
            out.skipped.append(f"{mpath} (base weight {tuple(w.shape)}, update {tuple(delta.shape)})")
            continue
        r = min(adapter.rank[mpath], *delta.shape)
        factor = amplification_factor(w, delta, r)
        delta_norm = float(torch.linalg.matrix_norm(delta))
        out.rows.append(AmplificationRow(mpath, r, delta_norm, delta_norm / factor if factor else math.inf, factor))
    if not out.rows:
        out.note = "no adapted module of the adapter matches the base model: " + "; ".join(out.skipped[:3])
    del loaded
    return out


def describe_pair(sim: Similarity) -> str:
    assert sim.low and sim.high and sim.low_trial and sim.high_trial
    return (f"target set {sim.targets}: r={sim.low.r} (trial {sim.low_trial.number}, seed {sim.low_trial.seed_index}, "
            f"{sim.low.label}) against r={sim.high.r} (trial {sim.high_trial.number}, seed "
            f"{sim.high_trial.seed_index}, {sim.high.label}); mean {fmt_num(sim.low.mean)} and "
            f"{fmt_num(sim.high.mean)}")


def analyses(data: SweepData) -> tuple[Similarity, Amplification]:
    """Both adapter analyses of a sweep (`similarity`, `amplification`) over one adapter cache."""
    cache = AdapterCache(data)
    try:
        return similarity(data, cache), amplification(data, cache)
    finally:
        cache.close()
