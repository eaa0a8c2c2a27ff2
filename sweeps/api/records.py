"""The plain records the Python API hands out: a chosen configuration (`Choice`), a ladder decision
(`Decision`) and one trained trial (`TrialResult`). Dataclasses of plain values (numbers, strings, lists,
dicts), so they print, compare and serialise (``dataclasses.asdict``) without the engine."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from sweeps.training.result import TrialResult as MeasuredTrial

if TYPE_CHECKING:
    from dashboards.records import Choice as ReportChoice
    from dashboards.records import SweepData
    from sweeps.training.trainer import Trial

__all__ = ["Choice", "Decision", "TrialResult", "choice_of", "decisions_of", "trial_result_of"]


@dataclass(frozen=True)
class Choice:
    """A configuration the sweep chose: the recommendation or the best-quality one.

    ``mean``/``std``/``n`` are the objective over its seeds on the validation split (what chose it; ``std``
    the sample standard deviation, None for one seed); ``test_mean``/``test_std``/``test_n`` the held-out
    test split's figure the sweep's end stored (None when it did not evaluate one). ``trial`` is its best
    seed's trial number (``sweep.export(DIR, trial=choice.trial)`` exports this configuration). ``source``:
    ``"ladder"`` (the ladder's own decision) or ``"rule"`` (the cheapest configuration shown within the margin of the best seed mean, else the best;
    `sweeps.stats`). ``why`` says how it was picked, with the numbers.

    Example:
        >>> rec = sweep.recommendation
        >>> rec.r, rec.targets, f"{rec.mean:.3f} ± {rec.std:.3f} over {rec.n} seeds"
    """

    params: dict[str, Any]
    r: int | None
    alpha: float | None
    targets: str | None
    lr: float | None
    dropout: float | None
    objective: str
    mean: float | None
    std: float | None
    n: int | None
    trainable_params: float | None
    trials: list[int]
    trial: int | None
    source: str
    why: str
    test_mean: float | None = None
    test_std: float | None = None
    test_n: int | None = None


@dataclass(frozen=True)
class Decision:
    """One decision of the rank ladder, in its order: ``kind`` (``calibration``, ``more_seeds``, ``rank``,
    ``stop``, ``chosen_rank``, ``targets``, ``recommendation``), the ``stage`` (0 learning rate, 1 ranks, 2
    wider target sets, 3 the recommendation) and ``rung`` it is about, what was decided in words
    (``text``), and the numbers it rests on (``evidence``: means, bounds, the margin).

    Example:
        >>> [d.text for d in sweep.decisions if d.kind == "rank"]
    """

    kind: str
    stage: int | None
    rung: int | None
    text: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrialResult(MeasuredTrial):
    """What ``sweeps.train`` measured: the trial's outcome, metrics and costs (the fields of
    `sweeps.training.result.TrialResult`, times in seconds and memory in bytes), with its MLflow run id and
    the trained model (the base model with its adapter, in memory).

    Example:
        >>> result = sweeps.train("examples/default.yaml", overrides={"lora.r": 16})
        >>> result.state, result.value, result.run_id
    """

    run_id: str = ""
    model: Any = field(default=None, repr=False, compare=False)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def choice_of(data: SweepData, choice: ReportChoice | None, role: str) -> Choice | None:
    """The API's record of a report's choice (``role``: ``recommended`` or ``best_quality``, the key of the
    test split's record), with the trial to export and the stored test figure."""
    from dashboards.records import effective_alpha

    if choice is None:
        return None
    params = dict(choice.params)
    by_number = {t.number: t for t in data.trials}
    seeds = [by_number[n] for n in choice.trials if n in by_number and by_number[n].value is not None]
    sign = 1.0 if data.maximize else -1.0
    best_seed = max(seeds, key=lambda t: (sign * float(t.value or 0.0), -t.number)) if seeds else None
    test = ((data.test or {}).get("choices") or {}).get(role) or {}
    figures = test.get("test") if isinstance(test, dict) else None
    figures = figures if isinstance(figures, dict) else {}
    n_test = figures.get("n")
    return Choice(params=params, r=int(params["r"]) if "r" in params else None,
                  alpha=effective_alpha(params) if ("alpha" in params or "alpha_per_r" in params) else None,
                  targets=str(params["targets"]) if "targets" in params else None,
                  lr=_number(params.get("lr")), dropout=_number(params.get("dropout")), objective=data.objective,
                  mean=choice.mean, std=choice.std, n=choice.n, trainable_params=choice.trainable_params,
                  trials=list(choice.trials), trial=best_seed.number if best_seed is not None else None,
                  source="ladder" if choice.source == "ladder" else "rule", why=choice.how,
                  test_mean=_number(figures.get("mean")), test_std=_number(figures.get("std")),
                  test_n=int(n_test) if isinstance(n_test, int) and n_test > 0 else None)


def decisions_of(ladder: dict[str, Any] | None) -> list[Decision]:
    """A ladder's decision record (the study's ``lora_sweep.ladder``) as `Decision` records."""
    out = []
    for d in (ladder or {}).get("decisions") or []:
        if not isinstance(d, dict):
            continue
        stage, rung = d.get("stage"), d.get("rung")
        evidence = d.get("evidence")
        out.append(Decision(kind=str(d.get("kind", "")), stage=int(stage) if isinstance(stage, int) else None,
                            rung=int(rung) if isinstance(rung, int) else None, text=str(d.get("text", "")),
                            evidence=dict(evidence) if isinstance(evidence, dict) else {}))
    return out


def trial_result_of(trial: Trial, run_id: str) -> TrialResult:
    """The API's record of a trained trial."""
    values = {f.name: getattr(trial.result, f.name) for f in fields(MeasuredTrial)}
    return TrialResult(**values, run_id=run_id, model=trial.model)
