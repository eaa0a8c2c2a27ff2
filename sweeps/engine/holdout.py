"""The test split, read once at the end of a sweep: an unbiased figure for the configurations it chose.

Every decision of a sweep (the sampler, the pruner, the ladder, the best trial, the recommendation) is
taken on the validation split, so the chosen configuration's validation figure is biased upwards (it won
because it was high). The data's test split (:class:`sweeps.data.prepare.PreparedData` ``.test``: the
source's own, or carved from train by the split seed) is read by nothing during the sweep. After its last
decision, the process that owns the sweep (`sweeps.engine.loop.run_sweep` with ``owner=True``,
`sweeps.engine.workers.supervise`) calls :func:`evaluate_test_split`:

- the configurations are `sweeps.engine.selection.held_out_choices`: the recommended one and the
  best-quality one (a ladder's, or for other sweeps the best seed mean and the cheapest configuration
  shown within the margin of it, the report's rule), each with every COMPLETE seed;
- each seed's trial is evaluated by reloading its logged adapter onto the base model, the way
  ``lora-sweep export`` does (`sweeps.export.verify.load_checked`: strict keys, shapes, scaling), not
  by training again; the validation split is evaluated too and must reproduce the trial's logged
  objective and eval_loss within ``sweeps.export.verify.TOLERANCE``, so the test figure is known to
  belong to the model the sweep judged; then the test split, with the trial's own metric code
  (`sweeps.training.evaluate`);
- the figures are stored in the study (user attr ``TEST_ATTR``, a JSON record: per trial, and per
  choice the validation and test mean ± std over seeds), logged on each evaluated trial's run
  (``test_<metric>``) and on the parent run (``<role>_test_<objective>_mean`` / ``_std`` beside
  ``<role>_validation_<objective>_mean`` / ``_std`` for role ``recommended`` and ``best_quality``, and
  ``test_split.json``), and read back by ``lora-sweep run``'s printout, the report and the model card.

Each trial is evaluated once: a resumed sweep reuses the stored figures of the same data (by its
fingerprint) and evaluates only trials it has no figure for (the choices changed, or a trial failed to
evaluate before). Nothing reads the record to decide anything. ``search.test_eval: false`` turns it
off; a data set whose test split has no rows gets a note instead of figures. A trial that cannot be
evaluated (its adapter is gone, its validation figure does not reproduce) is reported, not fatal.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_core import LoraError
from sweeps import stats
from sweeps.config.sweep import SweepConfig
from sweeps.engine.selection import TEST_ROLES, held_out_choices
from sweeps.names import SEED_INDEX, TEST_ATTR
from sweeps.text import first_line
from sweeps.tracking.store import quiet_mlflow

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient
    from optuna.trial import FrozenTrial

    from sweeps.data.prepare import PreparedData

__all__ = ["ROLE_LABELS", "TEST_FILE", "HoldoutResult", "evaluate_test_split", "figures_text", "parent_metric"]

TEST_FILE = "test_split.json"     # the record, on the parent run
ROLE_LABELS = {"recommended": "recommended", "best_quality": "best quality"}


@dataclass
class HoldoutResult:
    """What the end of a sweep says about the test split: the record (None when nothing was evaluated)
    and a note for the printout when there is no figure or something is missing."""

    record: dict[str, Any] | None
    note: str | None = None
    evaluated: int = 0             # trials evaluated by this call (0: every figure was stored already)
    seconds: float = 0.0           # the time those evaluations took (reloads included)


def parent_metric(role: str, split: str, objective: str, stat: str) -> str:
    """``recommended_test_accuracy_mean``: the parent run's metric for a choice's figure on a split."""
    return f"{role}_{split}_{objective}_{stat}"


def _spread(values: list[float]) -> dict[str, Any]:
    return {"mean": stats.mean(values), "std": stats.std(values), "n": len(values), "values": values}


def figures_text(figures: dict[str, Any] | None) -> str:
    """``0.9123 ± 0.0100 (n=2)``; ``-`` without figures."""
    if not figures or figures.get("mean") is None:
        return "-"
    std = f" ± {figures['std']:.4f}" if figures.get("std") is not None else ""
    return f"{figures['mean']:.4f}{std} (n={figures['n']})"


def evaluate_test_split(study: optuna.Study, config: SweepConfig, data: PreparedData, client: MlflowClient,
                        parent_run_id: str, say: Callable[[str], None]) -> HoldoutResult:
    """Evaluate the chosen configurations' seeds on the test split (see the module docstring); ``say``
    gets one line per trial evaluated. Store, log and return the figures."""
    if not config.search.test_eval:
        return HoldoutResult(None, "the test split was not evaluated (search.test_eval: false)")
    rows = len(data.test)
    if rows == 0:
        return HoldoutResult(None, f"the data has no test split ({data.source}): no test figure")
    chosen = held_out_choices(study, config)
    if not chosen:
        why = ("a two-objective sweep has no single recommendation" if len(study.directions) > 1 else
               "the ladder has not recommended a configuration yet" if config.search.strategy == "ladder" else
               "no trial is COMPLETE")
        return HoldoutResult(None, f"the test split was not evaluated: {why}")
    objective = config.search.objective_name(config.model.task)
    old = study.user_attrs.get(TEST_ATTR)
    old = old if isinstance(old, dict) else {}
    same_data = old.get("data") == data.fingerprint and old.get("objective") == objective
    known: dict[str, Any] = dict(old.get("trials") or {}) if same_data else {}
    trials = {t.number: t for group in chosen.values() for t in group}
    todo = [n for n in sorted(trials) if str(n) not in known]
    failed: dict[str, str] = {}
    evaluated: dict[str, Any] = {}
    seconds = 0.0
    if todo:
        left = _drain(client)  # a spooled trial's adapter must be on the server before it is downloaded
        if left:
            return HoldoutResult(None, f"the test split was not evaluated: {left} MLflow write(s) of this sweep have "
                                       "not reached the tracking server yet (the adapters are read from it); the next "
                                       "run of the sweep evaluates it")
        started = time.perf_counter()
        for n in todo:
            role = " and ".join(ROLE_LABELS[r] for r in TEST_ROLES if n in {t.number for t in chosen.get(r, [])})
            say(f"test split: evaluating trial {n} ({role}) on {rows} held-out rows")
            try:
                evaluated[str(n)] = _evaluate_trial(config, trials[n], data, objective)
            except Exception as exc:  # one trial's problem (its adapter gone, a mismatch): a note, not the sweep's end
                failed[str(n)] = first_line(exc) or type(exc).__name__
                say(f"test split: trial {n} not evaluated: {failed[str(n)]}")
        seconds = time.perf_counter() - started
    known.update(evaluated)
    record: dict[str, Any] = {"objective": objective, "direction": config.search.objective_direction(config.model.task),
                              "data": data.fingerprint, "rows": rows, "source": data.source,
                              "trials": known, "failed": failed, "choices": {}}
    for role in TEST_ROLES:
        group = chosen.get(role)
        if not group:
            continue
        tested = [known[str(t.number)]["test"][objective] for t in group if str(t.number) in known]
        record["choices"][role] = {"params": dict(group[0].params), "trials": [t.number for t in group],
                                   "validation": _spread([float(t.values[0]) for t in group]),
                                   "test": _spread([float(v) for v in tested])}
    if record != old:
        study.set_user_attr(TEST_ATTR, record)
        _log(client, parent_run_id, record, evaluated)
    note = None
    if failed:
        note = (f"{len(failed)} trial(s) could not be evaluated on the test split ({', '.join(failed)}); "
                "their figures are left out and the next run of the sweep tries them again")
    return HoldoutResult(record, note, len(evaluated), seconds)


def _drain(client: MlflowClient) -> int:
    """Wait (at most the spool's drain timeout) for this process's spooled writes; the writes left."""
    from sweeps.tracking.spool_client import DRAIN_TIMEOUT_S, SpoolingClient

    return client.flush(DRAIN_TIMEOUT_S) if isinstance(client, SpoolingClient) else 0


def _evaluate_trial(config: SweepConfig, frozen: FrozenTrial, data: PreparedData, objective: str) -> dict[str, Any]:
    """Reload trial ``frozen``'s adapter (as export does), check its validation figure, evaluate the test split."""
    from sweeps.engine.space import trial_config
    from sweeps.export.source import check_run_matches, logged_metrics, trial_run
    from sweeps.export.verify import compare, load_checked
    from sweeps.tracking.artifacts import download_adapter
    from sweeps.tracking.store import client_for, short_http_retries
    from sweeps.training.evaluate import evaluate

    cfg = trial_config(config, frozen.params, int(frozen.user_attrs.get(SEED_INDEX, 0)))
    with short_http_retries():  # a server that went away: a note now, a retry at the next run
        run_id, run = trial_run(client_for(config.tracking), config, frozen)
    check_run_matches(run, cfg, frozen.number)
    keys = [objective] + (["eval_loss"] if objective != "eval_loss" else [])
    logged = logged_metrics(run, keys, frozen.number)
    generate = cfg.model.task == "causal-lm" and objective == "exact_match"
    with tempfile.TemporaryDirectory(prefix="lora-sweep-test-") as tmp:
        with short_http_retries():
            adapter = download_adapter(config.tracking, run_id, Path(tmp) / "adapter")
        loaded, model = load_checked(cfg, data, adapter, run_id, frozen.number)
    try:
        validation = evaluate(model, data, "validation", cfg, loaded.tokenizer, generate=generate)
        compare(validation, logged, frozen.number, "reloaded adapter", lambda _: None)
        test = evaluate(model, data, "test", cfg, loaded.tokenizer, generate=generate)
    finally:
        del model, loaded
        _free_cuda()
    if not all(math.isfinite(v) for v in test.values()):
        raise LoraError(f"trial {frozen.number}'s test metrics are not finite: {test}",
                        hint="the adapter gives NaN or inf on the test split")
    return {"run_id": run_id, "test": {k: float(v) for k, v in test.items()},
            "validation": {k: float(v) for k, v in validation.items()}}


def _free_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _log(client: MlflowClient, parent_run_id: str, record: dict[str, Any], evaluated: dict[str, Any]) -> None:
    """``test_<metric>`` on each newly evaluated trial's run; the choices' figures and the record on the parent."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    objective = record["objective"]
    with quiet_mlflow():
        for entry in evaluated.values():
            client.log_batch(entry["run_id"], metrics=[Metric(f"test_{k}", v, now, 0) for k, v in entry["test"].items()],
                             synchronous=True)
        metrics = [Metric("test_rows", float(record["rows"]), now, 0)]
        for role, choice in record["choices"].items():
            for split in ("validation", "test"):
                for stat in ("mean", "std"):
                    value = choice[split].get(stat)
                    if value is not None:
                        metrics.append(Metric(parent_metric(role, split, objective, stat), float(value), now, 0))
        client.log_batch(parent_run_id, metrics=metrics, synchronous=True)
        client.log_dict(parent_run_id, record, TEST_FILE)
