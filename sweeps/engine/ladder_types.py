"""What the ladder plans over: its spec (read from the sweep config), the trials it observes, the seed
statistics of one configuration, the slots it asks for and the plan it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sweeps.config.sweep import SweepConfig

FINISHED = ("COMPLETE", "PRUNED", "FAIL")
PENDING = ("RUNNING", "WAITING")


@dataclass(frozen=True)
class LadderSpec:
    """What the ladder needs to know, resolved from the sweep config (see `sweeps.config.sweep`)."""

    ranks: list[int]                     # r_start, 2 r_start, ... <= r_max
    targets: list[str]                   # target sets: the first is the starting one
    alpha: float
    dropout: float
    seeds: int                           # the minimum seeds per configuration of stages 1 and 2
    lrs: list[float]                     # calibration candidates; one value when not calibrating
    calibration_steps: int | None        # None: no stage 0
    maximize: bool
    max_seeds: int = 4                   # an undecided comparison adds seeds up to this many
    false_gain_rate: float = 0.05        # the chance that a ladder calls any gain on pure noise (at most)
    margin: float = 0.0                  # the smallest difference that matters (`sweeps.stats`), objective units
    patience: int = 1
    max_params: float | None = None
    max_train_s: float | None = None
    max_memory_mb: float | None = None
    stage2: bool = True
    calibration_seeds: int = 1
    retune_lr: bool = True               # re-check the lr around a rung or target set not shown a gain
    climb_undecided: bool = True         # a rung undecided at max_seeds is not a plateau: the ladder climbs on
    probe_seeds: int = 1                 # an lr bracket's neighbouring rate starts at this many seeds
    follow_trend: bool = True            # a rung starts one step further where the best rate last moved


@dataclass(frozen=True)
class Slot:
    """One planned trial: a configuration at one seed, in a stage and rung."""

    stage: int
    rung: int
    params: dict[str, Any]
    seed_index: int
    steps: int | None = None             # None: the trial's configured steps

    def key(self) -> tuple[Any, ...]:
        return (self.stage, self.rung, self.seed_index)


@dataclass
class Observation:
    """What the study says about one trial of the ladder."""

    stage: int
    rung: int
    seed_index: int
    params: dict[str, Any]
    state: str                            # COMPLETE | PRUNED | FAIL | RUNNING | WAITING
    value: float | None = None
    cost: dict[str, float] = field(default_factory=dict)
    number: int | None = None
    retried: bool = False                 # FAIL by an interruption or a dead worker: superseded by a retry


@dataclass
class ConfigStats:
    """Seed statistics of one configuration (stage, rung)."""

    stage: int
    rung: int
    params: dict[str, Any]
    values: list[float]
    mean: float | None
    std: float | None
    n: int
    trainable_params: float | None
    lora_params: float | None
    train_s: float | None
    peak_memory_bytes: float | None
    trials: list[int]

    def label(self) -> str:
        """``r=4 q,v at lr 0.01``: the configuration and the learning rate it was judged at."""
        lr = self.params.get("lr")
        return f"r={self.params['r']} {self.params['targets']}" + (f" at lr {lr:.3g}" if lr is not None else "")

    def brief(self) -> dict[str, Any]:
        return {"params": self.params, "mean": self.mean, "std": self.std, "n": self.n,
                "values": self.values, "trainable_params": self.trainable_params, "train_s": self.train_s,
                "peak_memory_bytes": self.peak_memory_bytes, "trials": self.trials,
                "stage": self.stage, "rung": self.rung}


@dataclass
class Plan:
    """What to do next: enqueue ``enqueue``, or wait for running trials, or stop (``done``)."""

    enqueue: list[Slot] = field(default_factory=list)
    wait: bool = False
    done: bool = False
    decisions: list[dict[str, Any]] = field(default_factory=list)
    recommendation: dict[str, Any] | None = None
    best_quality: dict[str, Any] | None = None
    threshold: float | None = None       # how far below the best a mean may lie and be shown within the margin
    margin: float | None = None
    why: str | None = None               # why the recommendation: shown within the margin, or the best and why
    lr: float | None = None
    chosen_rank: int | None = None

    def as_attr(self) -> dict[str, Any]:
        return {"decisions": self.decisions, "recommendation": self.recommendation,
                "best_quality": self.best_quality, "threshold": self.threshold, "margin": self.margin, "why": self.why, "lr": self.lr,
                "chosen_rank": self.chosen_rank, "done": self.done}


# --------------------------------------------------------------------------- statistics


def ladder_spec(config: SweepConfig) -> LadderSpec:
    """The `LadderSpec` of a sweep with ``strategy: ladder``."""
    search, lad = config.search, config.search.ladder
    lrs = lad.lrs(search.lr, config.train.lr)
    steps = lad.calibration_steps or max(1, config.train.steps // 2)
    return LadderSpec(ranks=lad.ranks(), targets=[",".join(t.strip() for t in x.split(",")) for x in lad.targets],
                      alpha=float(lad.alpha if lad.alpha is not None else lad.r_start),
                      dropout=float(search.dropout[0]), seeds=lad.seeds, max_seeds=lad.max_seeds, lrs=lrs,
                      calibration_steps=steps if lad.calibrate and len(lrs) > 1 else None,
                      maximize=search.objective_direction(config.model.task) == "maximize",
                      false_gain_rate=lad.false_gain_rate, margin=search.margin_value(config.model.task),
                      patience=lad.patience,
                      max_params=lad.max_params, max_train_s=lad.max_train_s, max_memory_mb=lad.max_memory_mb, stage2=lad.stage2,
                      calibration_seeds=lad.calibration_seeds, retune_lr=lad.retune_lr,
                      climb_undecided=lad.climb_undecided)


def planned_total(spec: LadderSpec) -> int:
    """The most trials the ladder can run (every rung and every wider set, each at every rate of the lr
    grid and the maximum seeds)."""
    cal = len(spec.lrs) * spec.calibration_seeds if spec.calibration_steps is not None else 0
    rates = len(set(spec.lrs)) if spec.retune_lr else 1   # a bracket can walk a configuration over every rate
    return cal + most_seeds(spec) * rates * (len(spec.ranks) + (len(spec.targets) - 1 if spec.stage2 else 0))


def most_seeds(spec: LadderSpec) -> int:
    """The most seeds one configuration of stages 1 and 2 can get (``max_seeds``, at least ``seeds``)."""
    return max(spec.seeds, spec.max_seeds)
