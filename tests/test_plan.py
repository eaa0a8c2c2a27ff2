"""``lora-sweep plan``: every configuration probed on the real data (nothing tracked), exact parameter and
adapter sizes (equal to what the trials then log), the ladder's maximum trial count, the saved plan and
the memory warning that ``run`` repeats."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from support import load_study, write_sweep

from sweeps.cli.main import main
from sweeps.config.sweep import load_sweep_config
from sweeps.engine.ladder_types import ladder_spec, planned_total
from sweeps.engine.plan import (
    distinct_configs,
    fit_warnings,
    load_plan,
    plan_sweep,
    save_plan,
)
from sweeps.engine.plan_batches import median_batch_length, probe_examples
from sweeps.names import COST_ATTR

pytestmark = pytest.mark.usefixtures("isolated")


def test_plan_probes_every_configuration_and_matches_what_the_trials_log(
        tiny_model_dir: Path, tiny_data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, home, rank=[1, 4], targets=["q,v", "all-linear"],
                       n_trials=4)
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    for label in ("r=1 q,v", "r=4 q,v", "r=1 all-linear", "r=4 all-linear"):
        assert label in out
    assert "predicted wall time" in out and "for 4 trials" in out
    assert not (home / "mlflow.db").exists() and not (home / "optuna").exists()  # nothing tracked
    config = load_sweep_config(path)
    plan = load_plan(config)
    assert plan is not None and plan.max_trials == 4 and len(plan.configs) == 4
    assert all(c.step_time_s > 0 and c.peak_memory_bytes > 0 for c in plan.configs)
    assert plan.predicted_wall_s > sum(c.step_time_s for c in plan.configs) * config.train.steps
    assert plan.eval_last_s == plan.eval_s  # no generation: the last evaluation is like the others

    assert main(["run", str(path)]) == 0  # the real trials log the same sizes
    for t in load_study(home).trials:
        cost = plan.cost(int(t.params["r"]), str(t.params["targets"]))
        assert t.user_attrs[COST_ATTR]["trainable_params"] == cost.trainable_params


def test_the_ladder_plan_counts_its_maximum_trials(tiny_model_dir: Path, tiny_data_file: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Also: on a CPU, the settle probe's growth over the first configuration's short probe is added to every
    configuration's peak (here the settle probe's peak is made 1 GiB larger than measured, to see it)."""
    import sweeps.engine.plan as plan_module

    path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, tmp_path / "home", strategy="ladder", n_trials=40,
                       ladder={"r_start": 1, "r_max": 4, "targets": ["q,v", "all-linear"], "seeds": 2,
                               "calibration_lrs": [0.01, 0.03], "calibration_steps": 10})
    config = load_sweep_config(path)
    assert distinct_configs(config) == [(1, "q,v"), (2, "q,v"), (4, "q,v"), (1, "all-linear"), (2, "all-linear"),
                                        (4, "all-linear")]
    settled: list[tuple[tuple[int, str], int, int]] = []
    real_settle = plan_module.settle_peak

    def settle(config: Any, pair: tuple[int, str], *args: Any, **kwargs: Any) -> tuple[int, int]:
        steps, peak = real_settle(config, pair, *args, **kwargs)
        settled.append((pair, steps, peak + 2**30))
        return steps, peak + 2**30

    monkeypatch.setattr(plan_module, "settle_peak", settle)
    plan = plan_sweep(config, say=lambda _: None)
    [(pair, steps, peak)] = settled
    assert pair == (1, "q,v") and steps == min(plan_module.SETTLE_STEPS, config.train.steps)
    assert plan.cost(1, "q,v").peak_memory_bytes == peak  # the first configuration: the settle probe's peak
    assert abs(plan.memory_growth_bytes - 2**30) < 2**27  # (1 GiB, plus the real settle probe's own growth)
    assert all(c.peak_memory_bytes > plan.memory_growth_bytes for c in plan.configs)
    assert any(n.startswith("CPU peak memory: each probe's peak plus") for n in plan.notes)
    # max_seeds 4 per configuration, at each of the 2 calibration rates the lr bracket can try
    assert plan.max_trials == planned_total(ladder_spec(config)) == 2 + 4 * 2 * (3 + 1)
    assert any("stage 2 is counted at r=" in n for n in plan.notes)
    # r=4 all-linear counted for stage 2 (the upper bound): more than stage 2 at the cheapest rank
    assert plan.cost(4, "all-linear").trainable_params > plan.cost(1, "all-linear").trainable_params


def test_run_repeats_the_saved_plans_memory_warning(tiny_model_dir: Path, tiny_data_file: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, home, rank=[2], n_trials=1)
    config = load_sweep_config(path)
    plan = plan_sweep(config, say=lambda _: None)
    assert fit_warnings(plan) == []  # a tiny model fits
    small = dataclasses.replace(plan, memory_limit_bytes=plan.configs[0].peak_memory_bytes // 2)
    [line] = fit_warnings(small)
    assert "r=2 q,v needs about" in line and "will not fit" in line
    saved = save_plan(config, small)
    assert json.loads(saved.read_text())["fingerprint"] == plan.fingerprint
    assert main(["run", str(path)]) == 0
    assert "will not fit" in capsys.readouterr().out
    changed = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, home, rank=[2, 4], n_trials=1)
    assert load_plan(load_sweep_config(changed)) is None  # another search space: the plan does not apply


def test_the_probe_trains_on_batches_as_long_as_the_trials_median_and_longest_batch() -> None:
    """A step's time follows its batch's padded length: the probe's batches pad to the length of the
    median batch the trial draws (here lengths 4..99, batches of 8, length-sorted groups), but for one
    that pads to the longest the trial draws (its activations make the trial's peak memory)."""
    from sweeps.training.stream import batches

    lengths = [4 + (i * 37) % 96 for i in range(800)]
    examples = [{"input_ids": [1] * n, "labels": 0} for n in lengths]
    drawn = sorted(max(len(e["input_ids"]) for e in b)
                   for b, _ in zip(batches(examples, 8, seed=3), range(60), strict=False))
    target = median_batch_length(examples, 8, 60, seed=3)
    assert target == drawn[29]  # the lower median of the 60 batches the trial trains on
    assert drawn[0] < target - 20 and drawn[-1] > target + 10  # a few drawn batches could be anything
    examples[5]["input_ids"] = list(range(lengths[5]))  # to see which tokens a cut keeps
    examples[5]["labels"] = [-100] * (lengths[5] - 3) + [7, 8, 9]  # a causal LM's: the completion at the end
    longest = drawn[-1]
    probe = probe_examples(examples, 8, 60, seed=3, probe_steps=4)
    assert len(probe) == 32 and sorted(len(e["input_ids"]) for e in probe) == [target] * 24 + [longest] * 8
    assert sorted(max(len(e["input_ids"]) for e in b) for b, _ in zip(batches(probe, 8, seed=0), range(4), strict=False)) \
        == [target] * 3 + [longest]  # the stream makes one batch of the long rows
    assert lengths[5] > target and examples[5]["input_ids"] == list(range(lengths[5]))  # cut copies, not the data
    cuts = [e for e in probe if e["input_ids"][0] == 0 and e["input_ids"][-1] == lengths[5] - 1]
    assert cuts and all(c["labels"][-3:] == [7, 8, 9] and len(c["labels"]) == len(c["input_ids"])
                        for c in cuts)  # first token and the end kept
    few = [{"input_ids": [1] * n, "labels": 0} for n in (5, 9, 30, 31, 32)]  # too few as long as the longest
    t = median_batch_length(few, 2, 10, seed=0)  # 30; the longest batch drawn pads to 32
    assert t == 30 and sorted(len(e["input_ids"]) for e in probe_examples(few, 2, 10, seed=0, probe_steps=2)) == [t, t, 31, 32]


def test_the_probes_stream_draws_its_long_batch_first_and_evaluation_is_timed_on_its_longest_batch() -> None:
    from sweeps.engine.plan_batches import eval_sample, long_batch_first
    from sweeps.training.stream import batches

    rows = [{"input_ids": [1] * n, "labels": 0} for n in [20] * 16 + [48] * 8]  # two median batches, one long
    seed = long_batch_first(rows, 8, seed=0)
    assert max(len(e["input_ids"]) for e in next(batches(rows, 8, seed))) == 48

    lengths = [10] * 100 + [30] * 100 + [40] * 50  # batches of 100: padded to 10, 30 and 40
    sample, scale = eval_sample([{"input_ids": [1] * n} for n in lengths], 100)
    assert sorted(len(e["input_ids"]) for e in sample) == [30] * 50 + [40] * 50  # the 100 longest
    assert scale == pytest.approx((100 * 10 + 100 * 30 + 50 * 40) / (100 * 40))
    few = [{"input_ids": [1] * n} for n in (3, 5)]
    assert eval_sample(few, 100) == (few, 1.0)


# A CPU trial's peak memory, measured in a fresh process each time, so that nothing the suite ran before (its
# garbage, its heap) is in the numbers. Each script prints JSON: the peak right after the reset (``start``),
# while 64 MiB more are held (``during``), and after they are freed and the counter reset again (``after``).
PEAK_SCRIPT = """
import gc, json, sys
import torch
from sweeps.training.runtime import peak_memory, reset_peak_memory
cpu, mib = torch.device("cpu"), 2**20
case = sys.argv[1]
if case == "heap":
    # glibc serves blocks below its mmap threshold from the heap and keeps what is freed there: raise the
    # threshold (freeing an 8 MiB block sets it to 8 MiB), make 96 MiB of 1 MiB blocks, pin the heap's top
    # with one more so that freeing them is not trimmed at once, free them: 96 MiB free but resident.
    del_me = torch.ones(8 * mib // 4); del del_me
    blocks = [torch.ones(mib // 4) for _ in range(96)]
    pin = torch.ones(mib // 4)
    del blocks
elif case == "garbage":
    # 160 MiB held only by a reference cycle: garbage the collector may free at any moment later
    class Box:
        pass
    box = Box(); box.self = box; box.tensor = torch.ones(160 * mib // 4); del box
gc.disable()  # (the collections below are the test's own)
reset_peak_memory(cpu)
start, kind = peak_memory(cpu)
gc.collect()  # the trial's own collection: it must not hide the trial's growth
held = [torch.ones(mib // 4) for _ in range(64)]  # 64 MiB in 1 MiB blocks (the heap's size class)
during = peak_memory(cpu)[0]
del held
reset_peak_memory(cpu)
after = peak_memory(cpu)[0]
print(json.dumps({"kind": kind, "start": start, "during": during, "after": after}))
"""


@pytest.mark.parametrize("case", ["fresh", "heap", "garbage"])
def test_a_cpu_trials_peak_memory_counts_what_it_allocates_whatever_the_process_held_before(case: str) -> None:
    """After reset_peak_memory, a CPU trial's peak grows with what the trial allocates, even where the heap
    holds freed memory that could serve it (``heap``: the reset gives it back to the kernel first) or
    garbage the collector frees while the trial runs (``garbage``: collected before the counter starts);
    and once freed, it is no longer counted. Each case runs in a fresh process (64 MiB, a margin of 4 MiB)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, case], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = 2**20
    assert got["kind"] == "trial_peak_rss"
    assert got["during"] - got["start"] >= 60 * mib, got
    assert got["after"] <= got["during"] - 60 * mib, got


def test_plan_on_a_causal_lm_with_generation(tiny_llama_dir: Path, copy_task: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A causal LM: the probes reuse one model copy (the adapter taken off between them), evaluation's
    longest batch is timed with the causal batch size, and the last evaluation (with generation) is timed
    on the whole split."""
    home = tmp_path / "home"
    path = write_sweep(tmp_path, tiny_llama_dir, copy_task, home, rank=[1, 4], targets=["q,v", "all-linear"],
                       n_trials=4, train={"steps": 6, "eval_every": 3, "batch_size": 4, "generate_samples": 4,
                                          "max_new_tokens": 4})
    doc = path.read_text().replace("device: cpu", "device: cpu\n  task: causal-lm")
    path.write_text(doc)
    assert main(["plan", str(path)]) == 0
    plan = load_plan(load_sweep_config(path))
    assert plan is not None and sorted(c.label for c in plan.configs) == ["r=1 all-linear", "r=1 q,v",
                                                                           "r=4 all-linear", "r=4 q,v"]
    by_label = {c.label: c for c in plan.configs}
    assert by_label["r=4 all-linear"].trainable_params > by_label["r=1 all-linear"].trainable_params \
        > by_label["r=1 q,v"].trainable_params  # each probe's own adapter, none left from the one before
    # the last evaluation (with generation) timed on its own pass over the split, not copied from the scaled
    # one (which it is without generation); which is longer is timing, not asserted here
    assert plan.eval_s > 0 and plan.eval_last_s > 0 and plan.eval_last_s != plan.eval_s
    assert not (home / "mlflow.db").exists()
