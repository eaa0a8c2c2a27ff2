"""``lora-sweep plan``: what a sweep will cost, measured before anything is trained or tracked.

For each distinct configuration the sweep can run (a rank and a target set: alpha, learning rate and
seed change neither memory nor speed), a short probe trains ``PROBE_STEPS`` steps of the real trial on
the real device and data (nothing is tracked; its validation pass is cut to one example) and reads:

- the exact trainable parameters and adapter bytes (what the trial would log);
- the peak memory, as a trial measures it (`sweeps.training.runtime`): on CUDA ``max_memory_allocated``,
  on a CPU the process's peak RSS while the probe ran (the counter is reset per probe; the modules a
  sweep worker holds, MLflow and Optuna, are imported first, and with local tracking an MLflow store is
  opened in a throwaway folder, so the process holds what a worker does);
  or, where larger, the peak of an evaluation pass over the validation split in full batches (measured
  once, on the first configuration: evaluation's memory does not depend on the adapter's rank). On a CPU
  a trial's peak RSS grows over its steps (a step's transient peak depends on how the steps before it left
  the heap; the more steps, the higher the highest), which three steps do not see: before the probes, a
  settle probe (`settle_peak`) trains the first configuration on the first trial's own batches for up to
  ``SETTLE_STEPS`` steps and evaluates the validation split's longest batch, and what its peak exceeds
  that configuration's probe by (``SweepPlan.memory_growth_bytes``) is added to every configuration's
  peak (bench/plan_memory.py: the forecast against what the demo's trials log);
- the step time: the median of the probe's steps after the first (which pays one-time set-up); a
  throwaway warm-up probe (``WARMUP_STEPS``; on a CPU the settle probe) runs first, so the process's own
  start-up is not charged to the first configuration. A step's time follows its batch's padded length, and the trial's batches
  are length-sorted groups (`sweeps.training.stream`), so a few batches drawn as the trial draws them
  could be any length: the probe trains instead on batches that pad to the trial's *median* batch
  length (`probe_examples`), whose step time is the median a trial logs, and on one batch as long as
  the trial's longest, whose activations make the trial's peak memory. The probe's seed is chosen so
  that its stream draws the long batch first (`long_batch_first`): the timed steps are median batches.

One evaluation pass over the validation split is timed once: its longest batch, scaled by the padded
tokens of all its batches (`eval_sample`); with generation, for a causal LM's last evaluation, the whole
split. The sweep's wall time is then predicted for its maximum trial count: every trial's
steps times its configuration's step time, plus its evaluations, plus ``TRIAL_OVERHEAD_S`` for model
copy, tracking and Optuna (measured by bench/sweep_overhead.py), plus the set-up this command measured
itself (data and model loading). For a ladder, the trials of stage 2 run at a rank chosen by stage 1:
the prediction takes the most expensive rank (an upper bound) and says so.

A configuration whose peak memory exceeds the device's (CUDA: total memory; CPU: the memory available
now plus what this process holds) gets a warning, which ``run`` prints too when a plan of the same
sweep was saved (``<home>/plans/<name>.json``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sweeps.config.sweep import SweepConfig
from sweeps.config.trial import TrialConfig
from sweeps.engine.ladder_types import ladder_spec, most_seeds, planned_total
from sweeps.engine.plan_batches import eval_sample, long_batch_first, probe_examples
from sweeps.engine.space import trial_config
from sweeps.engine.study import fingerprint
from sweeps.text import first_line

__all__ = ["PROBE_STEPS", "TRIAL_OVERHEAD_S", "ConfigCost", "SweepPlan", "fit_warnings", "load_plan",
           "plan_sweep", "save_plan"]

log = logging.getLogger(__name__)
PROBE_STEPS = 3                   # the first (untimed: it pays set-up) trains the long batch
WARMUP_STEPS = 1                  # the throwaway probe before the first configuration (CUDA)
SETTLE_STEPS = 40                 # CPU: the first configuration's steps of the trial's own batches
TRIAL_OVERHEAD_S = 2.0


@dataclass
class ConfigCost:
    r: int
    targets: str
    trainable_params: int
    adapter_bytes: int
    peak_memory_bytes: int
    memory_kind: str
    step_time_s: float
    probe_s: float

    @property
    def label(self) -> str:
        return f"r={self.r} {self.targets}"


@dataclass
class SweepPlan:
    name: str
    fingerprint: str
    device: str
    memory_limit_bytes: int | None
    configs: list[ConfigCost]
    eval_s: float                     # one evaluation pass over the validation split
    eval_last_s: float                # the last one (with generation, for a causal LM)
    max_trials: int
    predicted_wall_s: float
    setup_s: float
    probe_s: float                    # this plan's own time
    notes: list[str] = field(default_factory=list)
    memory_growth_bytes: int = 0      # CPU: what a trial's peak RSS grows by over its steps (in every peak)

    def cost(self, r: int, targets: str) -> ConfigCost:
        return next(c for c in self.configs if c.r == r and c.targets == targets)


def distinct_configs(config: SweepConfig) -> list[tuple[int, str]]:
    """The (rank, target set) pairs the sweep can run."""
    search = config.search
    if search.strategy == "ladder":
        spec = ladder_spec(config)
        return [(r, t) for t in spec.targets for r in spec.ranks]
    if search.strategy == "grid":
        return list(dict.fromkeys(search.grid_pairs()))
    return [(r, t) for r in search.rank for t in search.target_choices()]


def _trials(config: SweepConfig, costs: dict[tuple[int, str], ConfigCost]) -> tuple[list[tuple[tuple[int, str], int]], list[str]]:
    """The sweep's trials at their maximum count: ((rank, targets), steps) each, and notes."""
    search, steps = config.search, config.train.steps
    notes: list[str] = []
    if search.strategy == "ladder":
        spec = ladder_spec(config)
        out: list[tuple[tuple[int, str], int]] = []
        if spec.calibration_steps is not None:
            out += [((spec.ranks[0], spec.targets[0]), spec.calibration_steps)] * (len(spec.lrs) * spec.calibration_seeds)
        # an undecided comparison adds seeds up to max_seeds; a bracket can try every rate of the lr grid
        seeds = most_seeds(spec) * (len(set(spec.lrs)) if spec.retune_lr else 1)
        out += [((r, spec.targets[0]), steps) for r in spec.ranks for _ in range(seeds)]
        if spec.stage2 and len(spec.targets) > 1:
            worst = max(spec.ranks, key=lambda r: sum(costs[(r, t)].step_time_s for t in spec.targets[1:]))
            out += [((worst, t), steps) for t in spec.targets[1:] for _ in range(seeds)]
            notes.append(f"stage 2 is counted at r={worst}, the most expensive rank it may choose (an upper bound)")
        assert len(out) == planned_total(spec)
        return out, notes
    pairs = distinct_configs(config)
    if search.strategy == "grid":
        per_pair = max(1, search.grid_size() // max(1, len(pairs)))
        trials = [p for p in pairs for _ in range(per_pair * search.seeds)]
        return [(p, steps) for p in trials[:search.budget()]], notes
    # tpe / random: the sampler's choices are not known ahead; each configuration equally likely
    notes.append(f"{search.strategy}: each configuration counted as equally likely")
    n = search.budget()
    return [(pairs[i % len(pairs)], steps) for i in range(n)], notes


def _evals(steps: int, every: int) -> int:
    return max(1, -(-steps // every))


def memory_limit(device: torch.device) -> int | None:
    """What the device can hold: CUDA's total memory; on a CPU, available RAM plus this process's own."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available = int(info["MemAvailable"].strip().split()[0]) * 1024
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return available + rss
    except (OSError, KeyError, ValueError):
        return None


class _ProbeModels:
    """The probes' base model: what a sweep worker's model cache holds while a trial trains (the pristine
    base and the trial's copy, so the memory is the same), but the copy is made once and, between
    probes, its adapter is taken off again (`lora_core.unload`) instead of copying the base anew: the
    frozen weights a probe trains over are never written, and its head is initialised again by the
    next trial."""

    def __init__(self) -> None:
        from sweeps.models.cache import BaseModelCache

        self.cache = BaseModelCache()
        self.loaded: Any = None

    def get(self, *args: Any, **kwargs: Any) -> Any:
        import lora_core

        if self.loaded is None:
            self.loaded = self.cache.get(*args, **kwargs)
        else:
            lora_core.unload(self.loaded.model)
        return self.loaded


def _open_a_tracking_store() -> Any:
    """An MLflow client on a store like a worker's (SQLAlchemy on sqlite, its tables made, one run logged), in a
    throwaway folder, for the probes to run beside: a worker that tracks to a local store holds about 90 MiB of it while its
    trials run (measured on the built-in demo: the probes' peaks 998 -> 1,089 MiB with it), and a CPU
    trial's peak RSS counts what its process holds. Nothing is written where the sweep tracks."""
    import tempfile

    from mlflow import MlflowClient

    folder = tempfile.mkdtemp(prefix="lora-sweep-plan-")
    try:
        client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
        run = client.create_run(client.create_experiment("plan"))
        client.log_metric(run.info.run_id, "probe", 0.0)
        client.set_terminated(run.info.run_id)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # (the open store lives on, unlinked)
    return client


def eval_batch_size(config: SweepConfig) -> int:
    """The rows of one evaluation batch (a causal LM's are capped: `sweeps.training.evaluate`)."""
    from sweeps.training.evaluate import CAUSAL_EVAL_BATCH

    tr = config.train
    return tr.eval_batch_size if config.model.task == "classification" else min(tr.eval_batch_size, CAUSAL_EVAL_BATCH)


def settle_peak(config: SweepConfig, pair: tuple[int, str], data: Any, models: _ProbeModels,
                say: Any = print) -> tuple[int, int]:
    """A CPU trial's peak RSS after its heap has settled: ``(steps, peak bytes)`` of a probe that trains
    ``pair`` for the trial's first ``SETTLE_STEPS`` steps (or all of them, when fewer) on the first
    trial's own batches (its data and seed: every padded length it draws, in its order), then evaluates
    the validation split's longest batch (`eval_sample`: the batch whose activations make evaluation's
    peak), as the trial's last evaluation comes on top of its training.

    Why: a CPU trial's peak grows over its steps. A step on a long batch after some shorter ones finds
    the heap cut up by theirs and takes fresh memory (measured on the demo, r=1 q,v: the peak after 5
    steps 1,261 MiB, after 20 1,338, after 60 1,359, with the evaluation 1,382; allocator settings change
    the level but not the growth: with ``MALLOC_ARENA_MAX=1`` 1,288 -> 1,335 MiB over steps 5 to 20, with
    ``MALLOC_MMAP_THRESHOLD_=1048576`` 1,122 -> 1,208). The short probes train three steps: their peaks
    missed this growth (forecasts 6-11% below what the demo's trials logged, 15-20% before the probes
    ran beside a tracking store; with it 0.96-1.01 of it: bench/plan_memory.py). The growth does not depend much on the adapter (the frozen model's
    activations dominate), so it is measured once and added to every configuration's probe."""
    base = config.base_trial()
    steps = min(SETTLE_STEPS, base.train.steps)
    sample, _ = eval_sample(data.validation, eval_batch_size(config))
    params = {"r": pair[0], "alpha": float(pair[0]), "targets": pair[1], "lr": base.train.lr,
              "dropout": base.lora.dropout}
    cfg = trial_config(config, params, 0)  # the first trial's seed: its batch stream
    cfg.train.steps, cfg.train.eval_every, cfg.train.generate_samples = steps, steps, 0
    from sweeps.training.trainer import run_trial

    trial = run_trial(cfg, data=dataclasses.replace(data, validation=sample), models=models)  # type: ignore[arg-type]
    res = trial.result
    if res.state == "FAILED":
        raise RuntimeError(f"the settle probe of r={pair[0]} {pair[1]} failed: {res.reason}")
    say(f"  settled r={pair[0]} {pair[1]}: {res.peak_memory_bytes / 2**20:,.0f} MiB peak after {steps} steps "
        f"and an evaluation ({res.memory_kind})")
    return steps, res.peak_memory_bytes


def plan_sweep(config: SweepConfig, say: Any = print) -> SweepPlan:
    """Probe every distinct configuration (see the module docstring); nothing is tracked."""
    from sweeps.engine.loop import prepare_sweep_data
    from sweeps.models.load import resolve_device
    from sweeps.training.evaluate import evaluate
    from sweeps.training.runtime import peak_memory, reset_peak_memory
    from sweeps.training.trainer import run_trial

    t0 = time.perf_counter()
    if not torch.cuda.is_available():  # a CPU trial's peak RSS counts what its worker process holds
        import optuna  # noqa: F401

        import sweeps.tracking.trial_run  # noqa: F401  (MLflow)
        if not (config.tracking.uri or "").startswith(("http://", "https://")):
            held = _open_a_tracking_store()  # noqa: F841  (held while the probes run)
    data = prepare_sweep_data(config)
    models = _ProbeModels()
    pairs = distinct_configs(config)
    base = config.base_trial()
    eval_peak = 0
    train_batch = probe_examples(data.train, base.train.batch_size, base.train.steps, base.seed,
                                 max(PROBE_STEPS, WARMUP_STEPS))
    probe_data = dataclasses.replace(data, validation=data.validation[:1], train=train_batch)  # type: ignore[arg-type]
    probe_seed = long_batch_first(train_batch, base.train.batch_size, base.seed)
    setup_s = time.perf_counter() - t0
    costs: dict[tuple[int, str], ConfigCost] = {}
    device: torch.device | None = None
    eval_s = eval_last_s = 0.0
    def probe_config(r: int, targets: str, steps: int) -> TrialConfig:
        params = {"r": r, "alpha": float(r), "targets": targets, "lr": base.train.lr, "dropout": base.lora.dropout}
        cfg = trial_config(config, params, 0)
        cfg.seed = probe_seed
        cfg.train.steps, cfg.train.eval_every, cfg.train.generate_samples = steps, steps, 0
        return cfg

    # cheapest first (as a sweep climbs the ladder): the CPU's peak RSS only grows within a process
    order = sorted(pairs, key=lambda p: (p[1] != pairs[0][1], p[0]))
    # a warm-up before the probes: a process's first training steps run slow for a while (kernels,
    # allocator and thread pools being set up), which would be charged to the first configuration's step
    # time. On a CPU it is the settle probe (`settle_peak`), whose peak the short probes' lack.
    settled = None
    if resolve_device(config.model.device).type == "cpu":
        settled = settle_peak(config, order[0], data, models, say)
    else:
        run_trial(probe_config(*order[0], WARMUP_STEPS), data=probe_data, models=models)  # type: ignore[arg-type]
    for r, targets in order:
        cfg = probe_config(r, targets, PROBE_STEPS)
        t1 = time.perf_counter()
        trial = run_trial(cfg, data=probe_data, models=models)  # type: ignore[arg-type]
        res = trial.result
        if res.state == "FAILED":
            raise RuntimeError(f"the probe of r={r} {targets} failed: {res.reason}")
        device = next(trial.model.parameters()).device
        if not eval_s:  # one validation pass, timed once (rank changes it little)
            full = base.train.generate_samples > 0 and config.model.task == "causal-lm"
            sample, scale = eval_sample(data.validation, eval_batch_size(config))
            reset_peak_memory(device)  # its peak: that of the largest evaluation batch (the probes evaluate one example)
            t2 = time.perf_counter()
            evaluate(trial.model, dataclasses.replace(data, validation=sample), "validation", cfg,  # type: ignore[arg-type]
                     trial.loaded.tokenizer if trial.loaded else None)
            eval_s = (time.perf_counter() - t2) * scale
            eval_last_s = eval_s
            eval_peak = peak_memory(device)[0]
            if full:
                cfg.train.generate_samples = base.train.generate_samples
                t2 = time.perf_counter()
                evaluate(trial.model, data, "validation", cfg, trial.loaded.tokenizer if trial.loaded else None,
                         generate=True)
                eval_last_s = time.perf_counter() - t2
        costs[(r, targets)] = ConfigCost(r, targets, res.trainable_params, res.adapter_bytes,
                                         max(res.peak_memory_bytes, eval_peak), res.memory_kind, res.step_time_s,
                                         time.perf_counter() - t1)
        say(f"  probed r={r} {targets}: {res.step_time_s * 1000:.0f} ms/step, "
            f"{costs[(r, targets)].peak_memory_bytes / 2**20:,.0f} MiB peak ({res.memory_kind})")
        del trial
    assert device is not None
    trials, notes = _trials(config, costs)
    growth = 0
    if settled is not None:
        settle_steps, peak = settled
        growth = max(0, peak - costs[order[0]].peak_memory_bytes)
        for cost in costs.values():
            cost.peak_memory_bytes += growth
        notes.append(f"CPU peak memory: each probe's peak plus {growth / 2**20:,.0f} MiB, what the heap grows by over "
                     f"a trial's steps (measured: {settle_steps} steps of the trial's own batches at "
                     f"r={order[0][0]} {order[0][1]}, then its evaluation, peaked at {peak / 2**20:,.0f} MiB)")
    every = base.train.eval_every
    wall = setup_s
    for pair, steps in trials:
        n_evals = _evals(steps, min(every, steps))
        wall += steps * costs[pair].step_time_s + (n_evals - 1) * eval_s + eval_last_s + TRIAL_OVERHEAD_S
    return SweepPlan(config.name, fingerprint(config), str(device), memory_limit(device),
                     [costs[p] for p in pairs], eval_s, eval_last_s, len(trials), wall, setup_s,
                     time.perf_counter() - t0, notes, growth)


def fit_warnings(plan: SweepPlan) -> list[str]:
    """One line per configuration that will not fit in the device's memory."""
    if not plan.memory_limit_bytes:
        return []
    out = []
    for c in plan.configs:
        if c.peak_memory_bytes > plan.memory_limit_bytes:
            out.append(f"warning: {c.label} needs about {c.peak_memory_bytes / 2**30:.1f} GiB of memory, the "
                       f"{plan.device} device has {plan.memory_limit_bytes / 2**30:.1f} GiB: it will not fit "
                       "(try train.gradient_checkpointing, model.quantize, or a smaller train.batch_size)")
    return out


def plan_path(config: SweepConfig) -> Path:
    return Path(config.tracking.home).expanduser().resolve() / "plans" / f"{config.name}.json"


def save_plan(config: SweepConfig, plan: SweepPlan) -> Path:
    path = plan_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(plan), indent=2))
    os.replace(tmp, path)
    return path


def load_plan(config: SweepConfig, warn: Callable[[str], None] | None = None) -> SweepPlan | None:
    """The plan ``lora-sweep plan`` saved for this sweep (None when there is none, or the sweep changed). A
    file that is not such a plan (malformed, or from another version) is ignored: ``warn`` (default: a logged
    warning) gets one line naming it."""
    path = plan_path(config)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        data, why = None, first_line(exc)
    else:
        why = "not a plan lora-sweep plan wrote"
    try:
        if not isinstance(data, dict):
            raise TypeError(why)
        if data.get("fingerprint") != fingerprint(config):
            return None
        data["configs"] = [ConfigCost(**c) for c in data["configs"]]
        plan = SweepPlan(**data)
        if not all(isinstance(c.peak_memory_bytes, (int, float)) for c in plan.configs):
            raise TypeError("a configuration's peak memory is not a number")
        return plan
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        (warn or log.warning)(f"warning: ignored the saved plan {path}: {first_line(exc)}; "
                              "run lora-sweep plan again to replace it")
        return None
