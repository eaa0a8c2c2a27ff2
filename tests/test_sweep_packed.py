"""Packed sweeps (search.pack > 1): the same decisions and numbers as one trial at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState
from support import LADDER, LADDER_SWEEP, Sweeps, load_study, seeded_home, store_uri, write_sweep

from sweeps.cli.main import main
from sweeps.config.sweep import load_sweep_config
from sweeps.engine.loop import run_sweep
from sweeps.names import LADDER_ATTR, PACK_ATTR

pytestmark = pytest.mark.usefixtures("isolated")


def _by_slot(study) -> dict[tuple, tuple[str, float | None]]:
    """(stage, rung, params, seed index) -> (state, value) of every trial that ended."""
    out = {}
    for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)):
        key = (t.user_attrs["lora_sweep.stage"], t.user_attrs["lora_sweep.rung"],
               json.dumps(t.params, sort_keys=True), t.user_attrs["seed_index"])
        out[key] = (t.state.name, t.values[0] if t.values else None)
    return out


def test_a_packed_ladder_makes_the_same_decisions_with_the_same_numbers(
        sweeps: Sweeps, tiny_model_dir: Path, tiny_data_file: Path, empty_store: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    home = seeded_home(tmp_path, empty_store)
    path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, home, name=LADDER, **LADDER_SWEEP, pack=2)
    result = run_sweep(load_sweep_config(path))
    assert result.stopped == "ladder"
    alone, packed = sweeps.study(LADDER), load_study(home, LADDER)
    one, two = alone.user_attrs[LADDER_ATTR], packed.user_attrs[LADDER_ATTR]
    assert [d["text"] for d in two["decisions"]] == [d["text"] for d in one["decisions"]]
    assert two["recommendation"]["params"] == one["recommendation"]["params"]
    a, b = _by_slot(alone), _by_slot(packed)
    assert a.keys() == b.keys() and len(a) >= 10
    for key, (state, value) in a.items():
        assert b[key][0] == state, key
        assert b[key][1] == pytest.approx(value, abs=1e-4), key
    # Every trial of the packed sweep trained in a pack of two (the calibration trials and each rung's
    # seeds share one) and says so; the single-trial sweep's trials do not.
    client = MlflowClient(tracking_uri=store_uri(home))
    ended = packed.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert all(PACK_ATTR in t.user_attrs for t in ended)
    sizes = [client.get_run(t.user_attrs["mlflow_run_id"]).data.metrics["pack_size"] for t in ended]
    assert max(sizes) == 2
    assert not any(PACK_ATTR in t.user_attrs for t in alone.get_trials())
    # status shows which trials shared a pack (--json: the same pack id)
    capsys.readouterr()
    assert main(["status", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_number = {row["number"]: row["pack"] for row in rows}
    assert all(by_number[t.number] == t.user_attrs[PACK_ATTR] for t in ended)
    assert main(["status", str(path)]) == 0
    table = capsys.readouterr().out
    assert " pack " in table and " p1 " in table
