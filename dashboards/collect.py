"""What a report shows, read from the sweep's Optuna study and MLflow store (both read-only).

    >>> data = collect(config)            # SweepData: trials, configurations, ladder, notes
    >>> data.configs[0].mean, data.configs[0].std, data.configs[0].n

A *configuration* is one set of params (``r``, ``alpha``/``alpha_per_r``, ``targets``, ``lr``,
``dropout``) trained for the sweep's full number of steps; its COMPLETE trials are its seeds. A
ladder's learning-rate calibration trials (stage 0) train for fewer steps (trial user attr
``lora_sweep.train_steps``), so their objective is not comparable: they are kept apart
(``SweepData.shortened``) and left out of every quality table, plot and choice. Its quality is the mean of the objective over those
seeds, ``std`` the sample standard deviation (n - 1 in the denominator; None for one seed). Costs
(``trainable_params``, ``train_s``, ``peak_memory_bytes``) are the means of the MLflow summary metrics
over the same trials.

Without a ladder decision record (study user attr ``lora_sweep.ladder``), the recommendation is
derived here: the best configuration by seed mean, and, when the sweep ran at least two seeds, the
cheapest configuration (fewest trainable parameters, then shortest train time) whose mean lies within
the noise band of the best, by the same rule as the ladder's (`sweeps.stats`): within
``z * pooled seed std / sqrt(seeds)`` of the best mean (z = 2, the ladder's default; the pooled std
over every configuration with two or more seeds).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import statistics
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lora_core import LoraError
from sweeps import stats as noise
from sweeps.config.sweep import SweepConfig
from sweeps.names import RUNG_ATTR, STAGE_ATTR, STEPS_ATTR
from sweeps.text import first_line

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient
    from optuna.trial import FrozenTrial

__all__ = ["COST_METRICS", "Choice", "ConfigStats", "SweepData", "TrialRecord", "collect",
           "pareto_front", "rank_table"]

log = logging.getLogger(__name__)

COST_METRICS = ("trainable_params", "train_s", "peak_memory_bytes")
PARAM_ORDER = ("r", "alpha", "alpha_per_r", "targets", "lr", "dropout")


# --------------------------------------------------------------------------- records

@dataclass
class TrialRecord:
    """One Optuna trial with what MLflow knows about it."""

    number: int
    state: str
    params: dict[str, Any]
    seed_index: int
    value: float | None                  # the objective (first value) of a COMPLETE trial
    run_id: str | None = None
    stage: int | None = None
    rung: int | None = None
    steps: int | None = None             # a shortened trial's steps (ladder calibration); None: full length
    metrics: dict[str, float] = field(default_factory=dict)   # the run's latest metric values
    has_adapter: bool = False
    duration_s: float | None = None

    @property
    def key(self) -> str:
        return config_key(self.params)


@dataclass
class ConfigStats:
    """One configuration: its COMPLETE trials (seeds) and their mean objective and costs."""

    key: str
    params: dict[str, Any]
    trials: list[TrialRecord]
    values: list[float]
    mean: float
    std: float | None
    n: int
    cost: dict[str, float | None]

    @property
    def r(self) -> int:
        return int(self.params["r"])

    @property
    def targets(self) -> str:
        return str(self.params["targets"])

    @property
    def alpha(self) -> float:
        return effective_alpha(self.params)

    @property
    def label(self) -> str:
        return params_label(self.params)

    def seed0(self) -> TrialRecord | None:
        """The trial of the lowest seed index that logged an adapter (seed 0 when there is one)."""
        with_adapter = [t for t in self.trials if t.has_adapter and t.run_id]
        return min(with_adapter, key=lambda t: (t.seed_index, t.number)) if with_adapter else None


@dataclass
class Choice:
    """A configuration picked by the ladder or by the report's own rule (``source``), with its numbers."""

    params: dict[str, Any]
    mean: float | None
    std: float | None
    n: int | None
    trainable_params: float | None
    trials: list[int]
    source: str                           # "ladder" | "report"
    how: str = ""                         # one sentence: how it was picked, with the numbers


@dataclass
class SweepData:
    """Everything a report shows about one sweep."""

    config: SweepConfig
    study: optuna.Study
    objective: str
    direction: str                        # "maximize" | "minimize"
    trials: list[TrialRecord]
    configs: list[ConfigStats]
    counts: dict[str, int]
    ladder: dict[str, Any] | None
    parent_run_id: str | None
    tracking_uri: str
    client: MlflowClient | None
    notes: list[str] = field(default_factory=list)
    shortened: list[TrialRecord] = field(default_factory=list)   # COMPLETE trials of fewer steps
    recommendation: Choice | None = None
    best_quality: Choice | None = None
    noise: dict[str, Any] = field(default_factory=dict)   # the derived rule's numbers

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"

    @property
    def ladder_sweep(self) -> bool:
        return self.config.search.strategy == "ladder"

    @property
    def seeds(self) -> int:
        """Seeds per configuration (the ladder's own for a ladder sweep)."""
        search = self.config.search
        return int(search.ladder.seeds) if self.ladder_sweep else int(search.seeds)

    def target_order(self) -> list[str]:
        """The target sets in the order the sweep lists them."""
        search = self.config.search
        if self.ladder_sweep:
            return [",".join(t.strip() for t in x.split(",")) for x in search.ladder.targets]
        return search.target_choices()

    def better(self, a: float, b: float) -> bool:
        return a > b if self.maximize else a < b

    def best_config(self) -> ConfigStats:
        """The best seed mean; ties go to more seeds, then fewer trainable parameters, then less train time."""
        def key(c: ConfigStats) -> tuple[float, int, float, float]:
            params, train = c.cost.get("trainable_params"), c.cost.get("train_s")
            return (-c.mean if self.maximize else c.mean, -c.n, math.inf if params is None else params,
                    math.inf if train is None else train)

        return min(self.configs, key=key)

    def config_of(self, choice: Choice) -> ConfigStats | None:
        """The configuration a choice names: by its trial numbers, else by its params."""
        numbers = set(choice.trials)
        if numbers:
            for c in self.configs:
                if numbers & {t.number for t in c.trials}:
                    return c
        for c in self.configs:
            if same_params(c.params, choice.params):
                return c
        return None


# --------------------------------------------------------------------------- params

def config_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def effective_alpha(params: dict[str, Any]) -> float:
    if "alpha" in params:
        return float(params["alpha"])
    return float(params.get("alpha_per_r", 0.0)) * int(params.get("r", 0))


def same_params(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two param sets name the same configuration (alpha compared as the effective alpha)."""
    def norm(p: dict[str, Any]) -> tuple[Any, ...]:
        return (int(p.get("r", -1)), round(effective_alpha(p), 9), str(p.get("targets")),
                round(float(p.get("lr", math.nan)), 15) if p.get("lr") is not None else None,
                round(float(p.get("dropout", 0.0)), 9))
    try:
        return norm(a) == norm(b)
    except (TypeError, ValueError):
        return False


def fmt_num(value: Any, digits: int = 4) -> str:
    """Numbers as shown in the report: ``digits`` significant digits; integers with separators."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value.is_integer() and abs(value) >= 1000:
            return f"{int(value):,}"
        return f"{value:.{digits}g}"
    return str(value)


def params_label(params: dict[str, Any]) -> str:
    """``r=4 α=8 q,v lr=0.01 dropout=0``."""
    parts = []
    if "r" in params:
        parts.append(f"r={params['r']}")
    if "alpha" in params or "alpha_per_r" in params:
        parts.append(f"α={fmt_num(effective_alpha(params))}")
    if "targets" in params:
        parts.append(str(params["targets"]))
    if "lr" in params:
        parts.append(f"lr={fmt_num(float(params['lr']), 3)}")
    if "dropout" in params:
        parts.append(f"dropout={fmt_num(float(params['dropout']))}")
    return " ".join(parts)


# --------------------------------------------------------------------------- reading

@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _record(t: FrozenTrial) -> TrialRecord:
    from sweeps.names import RUN_ID_ATTR, SEED_INDEX

    value = float(t.values[0]) if t.state.name == "COMPLETE" and t.values else None
    duration = t.duration.total_seconds() if t.duration is not None else None
    return TrialRecord(number=t.number, state=t.state.name, params=dict(t.params),
                       seed_index=int(t.user_attrs.get(SEED_INDEX, 0)), value=value,
                       run_id=t.user_attrs.get(RUN_ID_ATTR), stage=_int_or_none(t.user_attrs.get(STAGE_ATTR)),
                       rung=_int_or_none(t.user_attrs.get(RUNG_ATTR)), steps=_int_or_none(t.user_attrs.get(STEPS_ATTR)),
                       duration_s=duration)


def _read_runs(data: SweepData) -> None:
    """Fill each trial's MLflow metrics and adapter flag; a store that cannot be read becomes a note."""
    from sweeps.tracking.store import missing_store, quiet_mlflow, short_http_retries

    missing = missing_store(data.tracking_uri)
    if missing is not None:
        data.notes.append(f"no MLflow store at {missing}: costs, learning curves and adapters are not shown")
        return
    try:
        from mlflow import MlflowClient

        with quiet_mlflow(), short_http_retries():
            client = MlflowClient(tracking_uri=data.tracking_uri)
            exp = client.get_experiment_by_name(data.config.experiment())
            if exp is None:
                data.notes.append(f"no MLflow experiment {data.config.experiment()!r} in {data.tracking_uri}: "
                                  "costs, learning curves and adapters are not shown")
                return
            by_id: dict[str, Any] = {}
            by_number: dict[int, Any] = {}
            name = data.name.replace("'", "\\'")
            token = None
            while True:
                page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token,
                                          filter_string=f"tags.`optuna.study_name` = '{name}'")
                for run in page:
                    if run.data.tags.get("lora_sweep.kind") != "trial":
                        continue
                    by_id[run.info.run_id] = run
                    number = run.data.tags.get("optuna.trial_number", "")
                    if number.isdigit():
                        by_number.setdefault(int(number), run)  # newest first
                token = page.token
                if not token:
                    break
    except Exception as exc:  # any store problem: the study alone still makes a report
        data.notes.append(f"cannot read the MLflow store {data.tracking_uri} ({first_line(exc)}): costs, "
                          "learning curves and adapters are not shown")
        return
    data.client = client
    for t in data.trials:
        run = by_id.get(t.run_id or "") or by_number.get(t.number)
        if run is None:
            continue
        t.run_id = run.info.run_id
        t.metrics = {k: float(v) for k, v in run.data.metrics.items()}
        t.has_adapter = run.data.tags.get("lora_sweep.weights") == "adapter"


def _aggregate(trials: list[TrialRecord]) -> list[ConfigStats]:
    groups: dict[str, list[TrialRecord]] = {}
    for t in trials:
        if t.state == "COMPLETE" and t.value is not None and math.isfinite(t.value) and "r" in t.params \
                and t.steps is None:
            groups.setdefault(t.key, []).append(t)
    out = []
    for key, members in groups.items():
        members.sort(key=lambda t: (t.seed_index, t.number))
        values = [float(t.value) for t in members]  # type: ignore[arg-type]
        cost: dict[str, float | None] = {}
        for metric in COST_METRICS:
            got = [t.metrics[metric] for t in members if metric in t.metrics and math.isfinite(t.metrics[metric])]
            cost[metric] = statistics.fmean(got) if got else None
        out.append(ConfigStats(key, dict(members[0].params), members, values, statistics.fmean(values),
                               statistics.stdev(values) if len(values) >= 2 else None, len(values), cost))
    return out


def _choice(c: ConfigStats, how: str) -> Choice:
    return Choice(dict(c.params), c.mean, c.std, c.n, c.cost.get("trainable_params"),
                  [t.number for t in c.trials], "report", how)


def _from_ladder(entry: Any) -> Choice | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("params"), dict):
        return None

    def num(key: str) -> float | None:
        value = entry.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    trials = [int(n) for n in entry.get("trials") or [] if isinstance(n, (int, float)) and not isinstance(n, bool)]
    n = num("n")
    return Choice(dict(entry["params"]), num("mean"), num("std"), int(n) if n is not None else None,
                  num("trainable_params"), trials, "ladder")


def _derive_choices(data: SweepData) -> None:
    best = data.best_config()
    word = "highest" if data.maximize else "lowest"
    data.best_quality = _choice(best, f"the {word} mean {data.objective} over seeds "
                                      f"({fmt_num(best.mean)}, n={best.n})")
    seeds = data.seeds
    pooled, dof = noise.pooled_std(c.values for c in data.configs)
    if seeds < 2 or pooled is None:
        why = "the sweep ran one seed per configuration" if seeds < 2 else "no configuration has two seeds yet"
        data.recommendation = _choice(best, f"the best configuration: {why}, so there is no noise band to "
                                            "trade quality for cost within")
        data.noise = {"pooled_std": pooled, "dof": dof, "seeds": seeds}
        return
    margin = noise.threshold(pooled, seeds)
    threshold = best.mean - margin if data.maximize else best.mean + margin
    inside = [c for c in data.configs if (c.mean >= threshold if data.maximize else c.mean <= threshold)]

    def cost_key(c: ConfigStats) -> tuple[float, float, float]:
        params = c.cost.get("trainable_params")
        train = c.cost.get("train_s")
        return (params if params is not None else math.inf, train if train is not None else math.inf,
                -c.mean if data.maximize else c.mean)

    pick = min(inside, key=cost_key)
    side = "at least" if data.maximize else "at most"
    data.noise = {"pooled_std": pooled, "dof": dof, "threshold": threshold, "margin": margin, "z": noise.DEFAULT_Z,
                  "best_mean": best.mean, "within": len(inside), "seeds": seeds, "rule": noise.rule_text()}
    data.recommendation = _choice(pick, (
        f"the cheapest configuration (fewest trainable parameters, then shortest train time) whose mean "
        f"{data.objective} is {side} {fmt_num(threshold)}: the best mean {fmt_num(best.mean)} "
        f"{'minus' if data.maximize else 'plus'} the ladder's significance threshold {fmt_num(margin)} = "
        f"{noise.DEFAULT_Z:g} x pooled seed std {fmt_num(pooled)} ({dof} degrees of freedom) / sqrt({seeds} seeds) "
        f"({noise.rule_text()}); {len(inside)} of {len(data.configs)} configurations are in that band"))


def collect(config: SweepConfig, *, require_complete: bool = True) -> SweepData:
    """Read the sweep's study and MLflow runs (nothing is created or written).

    Raises:
        LoraError: the study does not exist or cannot be read, or (``require_complete``) has no
            COMPLETE trial.
    """
    from sweeps.engine.readonly import load_study_readonly
    from sweeps.names import LADDER_ATTR, PARENT_ATTR
    from sweeps.tracking.store import existing_store_uri

    study = load_study_readonly(config)
    task = config.model.task
    with _quiet_optuna():
        frozen = study.get_trials(deepcopy=False)
    trials = [_record(t) for t in sorted(frozen, key=lambda t: t.number)]
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state] = counts.get(t.state, 0) + 1
    if require_complete and not any(t.state == "COMPLETE" and t.value is not None and math.isfinite(t.value)
                                    and "r" in t.params and t.steps is None for t in trials):
        states = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trials"
        raise LoraError(f"sweep {config.name!r} has no COMPLETE trial yet ({states}): nothing to report",
                        hint=f"run it (lora-sweep run {config.name}) or wait for a trial to finish; "
                             f"lora-sweep status {config.name} shows its trials")
    ladder = study.user_attrs.get(LADDER_ATTR)
    data = SweepData(config=config, study=study, objective=config.search.objective_name(task),
                     direction=config.search.objective_direction(task), trials=trials, configs=[],
                     counts=counts, ladder=None, parent_run_id=study.user_attrs.get(PARENT_ATTR),
                     tracking_uri=existing_store_uri(config.tracking), client=None)
    if ladder is not None:
        if isinstance(ladder, dict):
            data.ladder = ladder
        else:
            data.notes.append(f"the study's {LADDER_ATTR} attr is a {type(ladder).__name__}, not a mapping: "
                              "the ladder's decisions are not shown")
    _read_runs(data)
    data.configs = _aggregate(trials)
    data.shortened = [t for t in trials if t.state == "COMPLETE" and t.steps is not None]
    if data.configs:
        _derive_choices(data)
    if data.ladder is not None:
        rec, best_q = _from_ladder(data.ladder.get("recommendation")), _from_ladder(data.ladder.get("best_quality"))
        if rec is not None:
            rec.how = "the ladder's recommendation"
            data.recommendation = rec
        if best_q is not None:
            best_q.how = "the ladder's best-quality configuration"
            data.best_quality = best_q
    return data


# --------------------------------------------------------------------------- derived views

@dataclass
class RankCell:
    """One cell of the metric-vs-rank table: the best configuration at that (target set, rank)."""

    targets: str
    r: int
    config: ConfigStats
    alternatives: int                     # configurations at this (targets, r), the shown one included


def rank_table(data: SweepData) -> tuple[list[str], list[int], dict[tuple[str, int], RankCell]]:
    """(target sets, ranks, cells): each cell the configuration with the best seed mean at that target
    set and rank (other params, e.g. lr, may differ between cells); target sets in the search's order."""
    order = {t: i for i, t in enumerate(data.target_order())}
    cells: dict[tuple[str, int], RankCell] = {}
    for c in data.configs:
        key = (c.targets, c.r)
        cell = cells.get(key)
        if cell is None:
            cells[key] = RankCell(c.targets, c.r, c, 1)
            continue
        cell.alternatives += 1
        if data.better(c.mean, cell.config.mean) or (c.mean == cell.config.mean and c.n > cell.config.n):
            cell.config = c
    targets = sorted({k[0] for k in cells}, key=lambda t: (order.get(t, len(order)), t))
    ranks = sorted({k[1] for k in cells})
    return targets, ranks, cells


def pareto_front(points: list[tuple[float, float]], maximize: bool) -> list[int]:
    """Indices of the points no other point beats: cost (x) no higher and quality (y) at least as good,
    one of them strictly. Sorted by cost."""
    def close(a: float, b: float) -> bool:  # seed means that differ by rounding only are equal
        return abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))

    front = []
    for i, (x, y) in enumerate(points):
        dominated = False
        for j, (x2, y2) in enumerate(points):
            if j == i:
                continue
            better_y = not close(y, y2) and (y2 > y if maximize else y2 < y)
            same_or_better_y = close(y, y2) or better_y
            if (x2 <= x and same_or_better_y) and (x2 < x or better_y):
                dominated = True
                break
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1] if maximize else points[i][1]))
