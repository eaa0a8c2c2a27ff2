"""Packed sweeps (``search.pack`` K > 1): a worker keeps up to K trials training together in one pack.

Each trial is still its own Optuna trial (asked, heartbeat, pruning decisions, told) and its own MLflow
child run with its own adapter artifact; only the training shares the base model
(:class:`sweeps.training.packed.PackedTrainer`), which gives each trial the numbers it gives alone.
A slot freed by a trial that ends is filled by the next trial the sweep allows (budget, timeout, the
ladder's plan), asked at that moment: TPE then samples with the trials still running as constant
liars; grid and ladder trials are the enqueued ones. Each trial records the pack it ran in
(``lora_sweep.pack``: worker and pack number) and its pack size.

The budget look before a slot asks (`budget_allows`) can be passed by several workers at once; a trial
obtained past the budget is released unrun by `sweeps.engine.trial.begin_trial` (which then returns
None, and the slot looks at the budget again), so ``n_trials`` is never exceeded.

A SIGKILL leaves all of the pack's trials RUNNING with stale heartbeats: the next run fails and
re-queues each of them, as for a single trial. Ctrl-C or an error ends every trial of the pack: each
is told FAIL (``interrupted`` for Ctrl-C, re-queued by the next run) and its run ends KILLED or FAILED.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import optuna
import torch
from optuna.trial import TrialState

from lora_core import LoraError
from sweeps.config.sweep import SweepConfig
from sweeps.data.prepare import PreparedData
from sweeps.engine.ladder_types import LadderSpec
from sweeps.engine.liveness import Worker
from sweeps.engine.progress import SweepProgress
from sweeps.engine.trial import BegunTrial, TrialOutcome, abort_trial, begin_trial, finish_trial
from sweeps.models.cache import BaseModelCache
from sweeps.names import PACK_ATTR
from sweeps.training.packed import PackedTrainer, PackMember, Waiting
from sweeps.training.trainer import Trial

if TYPE_CHECKING:
    from mlflow import MlflowClient

def space_of(config: SweepConfig, ladder: LadderSpec | None) -> tuple[list[str], int]:
    """Every target a trial of this sweep may adapt, and its largest rank (what a pack must hold)."""
    search = config.search
    if ladder is not None:
        choices, ranks = ladder.targets, ladder.ranks
    else:
        choices = [t for _, t in search.grid_pairs()] if search.strategy == "grid" else search.target_choices()
        ranks = [r for r, _ in search.grid_pairs()] if search.strategy == "grid" else list(search.rank)
    targets = sorted({t.strip() for choice in choices for t in choice.split(",") if t.strip()})
    return targets, max(ranks)


def pack_size(config: SweepConfig, device: torch.device) -> int:
    """``search.pack`` as a number: ``auto`` is 1 on the CPU (a 2-core CPU is saturated by one trial) and,
    on CUDA, -1: probe (:func:`probe_pack`) once the model is loaded."""
    pack = config.search.pack
    if pack != "auto":
        return int(pack)
    return 1 if device.type != "cuda" else -1  # -1: probe once the trainer exists


def probe_pack(trainer: PackedTrainer, config: SweepConfig, targets: list[str], max_rank: int, cap: int = 8) -> int:
    """On CUDA: how many trials fit in 80% of the free memory, by what one step of the heaviest trial
    of the sweep (its largest rank on every target) adds to ``trainer``'s empty one-slot pack."""
    cfg = config.base_trial()
    cfg.lora.r, cfg.lora.targets = max_rank, list(targets)
    per_trial = trainer.measure_trial_bytes(cfg.validate())
    free, _ = torch.cuda.mem_get_info(trainer.loaded.device)
    return max(1, min(cap, int(0.8 * free // max(1, per_trial))))


def run_pack_session(trainer: PackedTrainer, study: optuna.Study, config: SweepConfig, client: MlflowClient,
                     parent_run_id: str, me: Worker, state: SweepProgress, refresh: Callable[[str], None],
                     include_plotlyjs: bool | str, ladder: LadderSpec | None,
                     allowed: Callable[[], bool], on_outcome: Callable[[TrialOutcome], None],
                     number: int = 1) -> int:
    """Train trials in ``trainer``'s pack until ``allowed()`` refuses a new one and the pack is empty.
    ``on_outcome`` sees each ended trial's outcome (it may raise to stop the sweep); ``number`` numbers
    this worker's pack sessions (the pack's id is ``<host>:<pid>:<number>``). Returns the number of
    trials started."""
    pack_id = f"{me.host}:{me.pid}:{number}"
    begun: dict[int, BegunTrial] = {}
    started = 0

    def supply() -> Waiting | None:
        nonlocal started
        while allowed():
            b = begin_trial(study, config, client, parent_run_id, me, state, refresh, include_plotlyjs, ladder,
                            extra_attrs={PACK_ATTR: pack_id})
            if b is None:  # the queued trial another worker took meanwhile, or one released past the budget
                if config.search.strategy == "grid":  # nothing to start now (the session ends when its pack empties)
                    return None
                continue  # the ladder plans again; every strategy looks at its budget again
            started += 1
            begun[b.trial.number] = b
            return Waiting(b.cfg, b.report, b.progress, tag=b.trial.number)
        return None

    def done(member: PackMember) -> None:
        b = begun.pop(int(member.tag))
        trial = Trial(member.config, member.result, trainer.loaded.model, None, trainer.data)
        outcome = finish_trial(b, trial, study, config, state, refresh,
                               write_adapter=lambda folder: trainer.pack.save_slot(member.slot, folder))
        on_outcome(outcome)

    try:
        trainer.run(supply, on_done=done)
    except BaseException as exc:
        for b in begun.values():
            abort_trial(b, study, state, refresh, exc)
        trainer.drop_all()
        raise
    return started


def make_trainer(config: SweepConfig, data: PreparedData, models: BaseModelCache,
                 ladder: LadderSpec | None) -> PackedTrainer:
    """A pack for this sweep's trials on a fresh copy of the base model (``search.pack`` slots)."""
    m = config.model
    loaded = models.get(m.name, m.task, num_labels=data.num_labels, dtype=m.dtype, device=m.device,
                        trust_remote_code=m.trust_remote_code, quantize=m.quantize)
    targets, max_rank = space_of(config, ladder)
    k = pack_size(config, loaded.device)
    lora = config.base_trial().lora
    if k < 0:  # auto on CUDA: a one-slot pack measures the activations, then the real one
        probe = PackedTrainer(loaded, data, 1, targets, max_rank, lora.modules_to_save, m.task)
        k = probe_pack(probe, config, targets, max_rank)
        probe.pack.remove()
        del probe, loaded
        torch.cuda.empty_cache()
        loaded = models.get(m.name, m.task, num_labels=data.num_labels, dtype=m.dtype, device=m.device,
                            trust_remote_code=m.trust_remote_code, quantize=m.quantize)
    return PackedTrainer(loaded, data, k, targets, max_rank, lora.modules_to_save, m.task)


def budget_allows(study: optuna.Study, budget: int, deadline: float | None) -> bool:
    """Whether the sweep may start another trial now: before the deadline and under the budget
    (COMPLETE + PRUNED + RUNNING trials). A first look only: workers passing it together are settled
    after the ask (`sweeps.engine.trial.begin_trial`)."""
    if deadline is not None and time.perf_counter() >= deadline:
        return False
    counted = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    return len(counted) < budget


def check_packable(config: SweepConfig) -> None:
    """A packed sweep needs LoRA trials (a head-only baseline cannot share a pack)."""
    if not config.base_trial().lora.enabled:
        raise LoraError("search.pack > 1 needs LoRA trials (lora.enabled is false)", hint="set search.pack: 1")
