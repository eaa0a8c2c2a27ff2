"""A sweep's ``search`` block (`SearchConfig`): what a sweep (`sweeps.config.sweep`) varies, how it samples
and its budget; checked by `sweeps.config.search_checks`.

    name: demo-sweep          # also the Optuna study name and (by default) the MLflow experiment
    model: ...  data: ...  lora: ...  train: ...  tracking: ...   # the base trial, as for `train`
    search:
      rank: [1, 4, 16]        # choices of r
      alpha: 2r               # fixed (16), choices ([8, 16, 32]), a multiple of r ("2r"), or
                              # choices of multiples (["1r", "2r"])
      targets: ["q,v", "q,k,v,o", "all-linear"]   # each string is one subset of target matrices
      lr: {low: 1.0e-4, high: 3.0e-3}             # log-uniform range; or a list of values
      dropout: [0.0, 0.1]
      seeds: 1                # each sampled configuration runs with seeds seed, seed+1, ...
      strategy: tpe           # tpe | random | grid
      n_trials: 20            # Optuna trials (each seed of a configuration is one trial)
      timeout: null           # seconds after which no new trial starts
      pruner: median          # median | hyperband | none (default: median, none for a Pareto study)
      objective: null         # default: the task's (accuracy for classification, eval_loss for LMs)
      direction: null         # default: minimize for *loss and perplexity, else maximize
      second_objective: null  # trainable_params | train_s: a two-objective (Pareto) study
      margin: null            # the smallest difference that matters, in the objective's units (default:
                              # 0.01 for accuracy, F1, exact match and losses; 0.1 for perplexity)
      storage: null           # default: <home>/optuna/<name>.journal; or an RDB URL / a journal path
      pack: 1                 # trials trained together over one base model per worker; auto: probe on CUDA
      test_eval: true         # at the end: the recommended and best-quality configurations on the test split

Everything is validated before anything runs; mistakes raise ``lora_core.LoraError`` naming the key.
On the command line a single string is one subset (``--set search.targets=q,k,v,o``); several subsets
need YAML list syntax: ``--set 'search.targets=["q,v", "q,k,v,o"]'``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from lora_core import LoraError
from sweeps.config.trial import objective_of
from sweeps.stats import default_margin

Strategy = Literal["tpe", "random", "grid", "ladder"]
Pruner = Literal["median", "hyperband", "none"]
Direction = Literal["maximize", "minimize"]
SecondObjective = Literal["trainable_params", "train_s"]

METRICS = {"classification": ("accuracy", "macro_f1", "eval_loss"),
           "causal-lm": ("eval_loss", "perplexity", "exact_match")}
DEFAULT_RANKS = [1, 2, 4, 8, 16, 32, 64]
MAX_TRIALS = 100_000   # trials in one sweep (a study holds them all in memory; planners list them)
MAX_SEEDS = 1_000      # seeds of one configuration
MAX_PACK = 256         # trials one worker trains together
_MULTIPLE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)?\s*r\s*$")



@dataclass
class LogRange:
    """A log-uniform range ``[low, high]`` (both > 0, low < high)."""

    low: float = 1e-4
    high: float = 3e-3


@dataclass
class PairConfig:
    """One (rank, target set) pair of an explicit grid (``search.configs``)."""

    r: int = 8
    targets: str = "q,v"


@dataclass
class LadderConfig:
    """``strategy: ladder`` (see `sweeps.engine.ladder`): start low, double the rank while it pays, then widen."""

    r_start: int = 1
    r_max: int = 64
    targets: list[str] = field(default_factory=lambda: ["q,v", "q,k,v,o", "all-linear"])
    seeds: int = 2                    # the minimum seeds per configuration in stages 1 and 2
    max_seeds: int = 4                # an undecided comparison adds a seed to both sides, up to this many
    alpha: float | None = None        # fixed across ranks; None: r_start (the paper's choice)
    calibrate: bool = True            # stage 0: choose the lr; off: train.lr
    calibration_lrs: list[float] | None = None   # None: search.lr (a list as given; a range: 4 log-spaced)
    calibration_steps: int | None = None         # None: half of train.steps
    calibration_seeds: int = 1
    false_gain_rate: float = 0.05     # at most this chance that a ladder calls any gain on pure noise
    min_delta: float | None = None    # the old name of search.margin (read when margin is unset)
    z: float | None = None            # replaced by false_gain_rate: set, it raises a LoraError saying so
    patience: int = 2                 # rungs in a row shown no gain (a plateau) before stopping
    max_params: float | None = None   # cost limits
    max_train_s: float | None = None
    max_memory_mb: float | None = None
    stage2: bool = True               # try the wider target sets at the chosen rank
    retune_lr: bool = True            # re-check the lr (a bracket on the calibration grid) where it can change the answer
    climb_undecided: bool = True      # a rung still undecided at max_seeds: climb on (false: count it as a plateau)

    def lrs(self, search_lr: LogRange | list[float], base_lr: float) -> list[float]:
        """The calibration candidates (or ``[base_lr]`` without calibration)."""
        if not self.calibrate:
            return [base_lr]
        if self.calibration_lrs is not None:
            return [float(x) for x in self.calibration_lrs]
        if isinstance(search_lr, list):
            return [float(x) for x in search_lr]
        lo, hi = math.log(search_lr.low), math.log(search_lr.high)
        return [float(f"{math.exp(lo + (hi - lo) * i / 3):.3g}") for i in range(4)]

    def ranks(self) -> list[int]:
        out, r = [], self.r_start
        while r <= self.r_max:
            out.append(r)
            r *= 2
        return out


@dataclass
class SearchConfig:
    """What a sweep varies, how it samples, and its budget (see the module docstring)."""

    rank: list[int] = field(default_factory=lambda: list(DEFAULT_RANKS))
    alpha: float | str | list[float] | list[str] = "2r"
    targets: str | list[str] = field(default_factory=lambda: ["q,v"])
    lr: LogRange | list[float] = field(default_factory=LogRange)
    dropout: list[float] = field(default_factory=lambda: [0.0])
    seeds: int = 1
    strategy: Strategy = "tpe"
    n_trials: int = 20
    timeout: float | None = None
    pruner: Pruner | None = None
    objective: str | None = None
    direction: Direction | None = None
    second_objective: SecondObjective | None = None
    margin: float | None = None       # the smallest difference that matters (objective units); None: the metric's
    storage: str | None = None
    pack: int | Literal["auto"] = 1   # trials a worker trains together (sweeps.training.packed); numbers unchanged
    test_eval: bool = True            # read the test split once at the end (sweeps.engine.holdout); no decision uses it
    sampler_seed: int = 0
    startup_trials: int = 10          # TPE: random trials before the model is used
    ei_candidates: int = 24           # TPE: candidates drawn per suggestion
    prune_startup_trials: int = 5     # median: finished trials before anything is pruned
    prune_warmup_steps: int = 0       # median: no pruning before this step
    hyperband_min_steps: int | None = None   # hyperband: smallest budget in steps (default train.eval_every)
    hyperband_reduction: int = 3
    ladder: LadderConfig = field(default_factory=LadderConfig)
    configs: list[PairConfig] | None = None   # grid: explicit (r, targets) pairs instead of rank x targets

    # ------------------------------------------------------------------ derived views
    def target_subsets(self) -> list[list[str]]:
        """Each ``targets`` entry as a list of target names (``"q,v"`` -> ``["q", "v"]``)."""
        entries = [self.targets] if isinstance(self.targets, str) else list(self.targets)
        return [[t.strip() for t in entry.split(",")] for entry in entries]

    def target_choices(self) -> list[str]:
        """The subsets in canonical text form (``"q,v"``): the values of the ``targets`` parameter."""
        return [",".join(s) for s in self.target_subsets()]

    def alpha_mode(self) -> tuple[Literal["fixed", "multiple"], list[float]]:
        """``("fixed", values)`` for absolute alphas, ``("multiple", factors)`` for multiples of r."""
        items = self.alpha if isinstance(self.alpha, list) else [self.alpha]
        if all(isinstance(a, str) for a in items):
            factors = []
            for a in items:
                m = _MULTIPLE.match(str(a))
                if m is None:
                    raise LoraError(f"search.alpha: {a!r} is not a number or a multiple of r",
                                    hint='write 16, [8, 16], "2r" or ["1r", "2r"]')
                factors.append(float(m.group(1)) if m.group(1) else 1.0)
            return "multiple", factors
        return "fixed", [float(a) for a in items]

    def objective_name(self, task: str) -> str:
        return self.objective or objective_of(task)[0]

    def margin_value(self, task: str) -> float:
        """The margin every decision uses (`sweeps.stats`): ``margin``, else the ladder's old
        ``min_delta``, else the objective's default (one point of accuracy, 0.01 of a loss)."""
        if self.margin is not None:
            return float(self.margin)
        if self.ladder.min_delta is not None:
            return float(self.ladder.min_delta)
        return default_margin(self.objective_name(task))

    def objective_direction(self, task: str) -> Direction:
        if self.direction is not None:
            return self.direction
        if self.objective is None:
            return objective_of(task)[1]
        return "minimize" if ("loss" in self.objective or "perplexity" in self.objective) else "maximize"

    def directions(self, task: str) -> list[Direction]:
        return [self.objective_direction(task)] + (["minimize"] if self.second_objective else [])

    def pruner_name(self) -> Pruner:
        if self.pruner is not None:
            return self.pruner
        return "none" if self.second_objective or self.strategy == "ladder" else "median"

    def grid_pairs(self) -> list[tuple[int, str]]:
        """The grid's (rank, target set) pairs: ``configs`` as written, else every rank with every set."""
        if self.configs is not None:
            return [(c.r, ",".join(t.strip() for t in c.targets.split(","))) for c in self.configs]
        return [(r, t) for r in self.rank for t in self.target_choices()]

    def grid_size(self) -> int:
        """Configurations in the grid (``strategy: grid``)."""
        lr = len(self.lr) if isinstance(self.lr, list) else 0
        return len(self.grid_pairs()) * len(self.alpha_mode()[1]) * lr * len(self.dropout)

    def budget(self) -> int:
        """Trials this sweep runs in all: ``n_trials``, or the whole grid times the seeds if smaller."""
        if self.strategy == "grid":
            return min(self.n_trials, self.grid_size() * self.seeds)
        return self.n_trials  # for the ladder: a cap (the ladder plans its own trials)

    def varied(self) -> frozenset[str]:
        """Which of ``alpha``, ``lr`` and ``dropout`` differ between this search's trials (rank, targets and
        seed are always shown): alpha when several values or multiples of r are searched (one multiple
        follows r), lr for a range or several values (the ladder: when it calibrates several), dropout for
        several values."""
        if self.strategy == "ladder":
            return frozenset({"lr"} if len(self.ladder.lrs(self.lr, 0.0)) > 1 else ())
        out = set()
        if len(self.alpha_mode()[1]) > 1:
            out.add("alpha")
        if isinstance(self.lr, LogRange) or len(set(self.lr)) > 1:
            out.add("lr")
        if len(set(self.dropout)) > 1:
            out.add("dropout")
        return frozenset(out)
