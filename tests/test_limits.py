"""Bounded input and stored configs as data (issue 25).

Every size a user types has a limit, checked before anything runs: one error line (and a hint), exit
code 2, nothing written. A config read back from a study cannot turn on ``trust_remote_code`` or name a
model that is not on this machine without ``--trust-stored-config``. A ``.json`` array is streamed, the
datasets cache is pruned, ``report --out`` keeps an existing file without ``--force``, a malformed plan is
ignored with a warning, and an export removes the staging folders a killed export left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import assert_user_error, write_sweep

from lora_core import LoraError
from sweeps.cli.main import main
from sweeps.config.sweep import load_sweep_config
from sweeps.data import jsonfile
from sweeps.data.dscache import GRACE_S, prune_datasets_cache
from sweeps.data.sources import read_file
from sweeps.engine.plan import load_plan, plan_path
from sweeps.engine.study import fingerprint, open_study
from sweeps.export.exporter import remove_leftovers

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "examples" / "demo-sweep.yaml")


# --------------------------------------------------------------------------- sizes in the config


@pytest.mark.parametrize(("setting", "expected"), [
    ("search.n_trials=1000000000", "search.n_trials must be <= 100,000"),
    ("search.seeds=5000", "search.seeds must be <= 1,000"),
    ("seed=-1", "seed must be in 0 .."),
    (f"seed={2**32}", "seed must be in 0 .."),
    ("search.sampler_seed=-3", "search.sampler_seed must be in 0 .."),
    ("search.rank=[4,1000000]", "search.rank must be <= 65,536"),
    ("search.pack=1000", "search.pack must be <= 256"),
    ("data.max_length=10000000", "data.max_length must be <= 131,072"),
    ("train.steps=1000000000", "train.steps must be <= 10,000,000"),
    ("train.batch_size=10000000", "train.batch_size must be <= 65,536"),
    ("train.eval_batch_size=10000000", "train.eval_batch_size must be <= 65,536"),
    ("train.generate_samples=-1", "train.generate_samples must be >= 0"),
    ("train.generate_samples=1000000", "train.generate_samples must be <= 100,000"),
    ("train.max_new_tokens=0", "train.max_new_tokens must be >= 1"),
    ("train.max_new_tokens=100000", "train.max_new_tokens must be <= 32,768"),
    ("data.max_train_samples=0", "data.max_train_samples must be >= 1"),
])
def test_each_size_has_a_limit(setting: str, expected: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", DEMO, "--home", str(tmp_path / "home"), "--set", setting])
    assert_user_error(code, capsys.readouterr().err, expected)
    assert not (tmp_path / "home").exists()  # nothing ran, nothing was written


def test_a_billion_trials_under_a_4_gb_address_space_is_a_validation_error(tmp_path: Path) -> None:
    """The acceptance line of issue 25: a validation error, not a MemoryError."""
    cmd = (f"ulimit -v 4000000 && exec {sys.executable} -m sweeps.cli run {DEMO} --home {tmp_path / 'home'} "
           "--set search.n_trials=1000000000")
    proc = subprocess.run(["bash", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "MemoryError" not in proc.stderr
    assert_user_error(proc.returncode, proc.stderr, "search.n_trials must be <= 100,000")


def test_rank_and_length_are_checked_against_the_model(tiny_model_dir: Path, tiny_data_file: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    sweep = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, home, rank=[4, 64])
    code = main(["run", str(sweep)])
    assert_user_error(code, capsys.readouterr().err, "search.rank 64 is above the dimension of a layer")
    code = main(["run", str(sweep), "--set", "search.rank=[4]", "--set", "data.max_length=512"])
    assert_user_error(code, capsys.readouterr().err, "data.max_length 512 is above the 128 positions")
    code = main(["train", "--set", f"model.name={tiny_model_dir}", "--set", "data.name=null",
                 "--set", f"data.files={tiny_data_file}", "--set", f"tracking.home={home}", "--set", "lora.r=33"])
    assert_user_error(code, capsys.readouterr().err, "lora.r 33 is above the dimension of a layer")
    assert not (home / "optuna").exists() and not (home / "mlflow.db").exists()


@pytest.mark.parametrize(("argv", "expected"), [
    (["run", DEMO, "--workers", "100000"], "--workers must be <= 256 on one machine"),
    (["run", DEMO, "--workers", "-1"], "--workers must be >= 0"),
    (["worker", "some-sweep", "--wait", "-5"], "--wait must be in 0 .."),
    (["sync", "--timeout", "0"], "--timeout must be in (0, 604800]"),
])
def test_command_line_sizes_have_limits(argv: list[str], expected: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code = main([*argv, "--home", str(tmp_path / "home")])
    assert_user_error(code, capsys.readouterr().err, expected)


# --------------------------------------------------------------------------- a stored config is data


def _stored_sweep(tmp_path: Path, tiny_model_dir: Path, tiny_data_file: Path, **model: object) -> tuple[str, Path]:
    home = tmp_path / "home"
    path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, home)
    sets = [f"model.{k}={v}" for k, v in model.items()]
    open_study(load_sweep_config(path, sets))  # the study, with the config as given, stored in it
    return "tiny-sweep", home


def test_trust_remote_code_from_a_stored_config_needs_the_flag(tiny_model_dir: Path, tiny_data_file: Path,
                                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name, home = _stored_sweep(tmp_path, tiny_model_dir, tiny_data_file, trust_remote_code="true")
    for command in ("worker", "export", "report", "plan"):
        extra = ["--out", str(tmp_path / "x")] if command in ("export", "report") else []
        code = main([command, name, "--home", str(home), *extra])
        err = capsys.readouterr().err
        assert_user_error(code, err, "turns on model.trust_remote_code")
        assert "--trust-stored-config" in err.splitlines()[0]
    # the flag lets it through (to the next check: the sweep has no trial to export)
    code = main(["export", name, "--home", str(home), "--out", str(tmp_path / "x"), "--trust-stored-config"])
    err = capsys.readouterr().err
    assert_user_error(code, err, "has no COMPLETE trial to export")
    assert main(["status", name, "--home", str(home)]) == 0  # status loads no model: nothing to refuse


def test_a_stored_config_cannot_fetch_a_model_from_a_new_place(tiny_model_dir: Path, tiny_data_file: Path,
                                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name, home = _stored_sweep(tmp_path, tiny_model_dir, tiny_data_file, name="someone/not-on-this-machine")
    code = main(["worker", name, "--home", str(home)])
    assert_user_error(code, capsys.readouterr().err, "loads model 'someone/not-on-this-machine', which is not on")
    # either lets it through, to the next check: the flag to "no trial yet", another model to "another sweep"
    for flag, then in ((["--trust-stored-config"], "has no COMPLETE trial to export"),
                       (["--set", f"model.name={tiny_model_dir}"], "is not the sweep 'tiny-sweep' that ran")):
        code = main(["export", name, "--home", str(home), "--out", str(tmp_path / "x"), *flag])
        assert_user_error(code, capsys.readouterr().err, then)


# --------------------------------------------------------------------------- files


def test_a_json_array_is_streamed_into_json_lines(tmp_path: Path, fresh_data_caches: None) -> None:
    rows = [{"text": f"row {i} " + "w" * (i % 700), "label": ["a", "b"][i % 2], "n": i * 1.5} for i in range(2000)]
    path = tmp_path / "rows.json"
    path.write_text("  [\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    assert path.stat().st_size > 4 * (1 << 16)  # records cross many 64 KiB windows
    out = tmp_path / "rows.jsonl"
    assert jsonfile.array_to_lines(path, out) == 2000
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    split = read_file(str(path))  # through the streamed copy into Arrow, memory-mapped
    assert len(split.rows) == 2000 and split.rows[1999]["n"] == 1999 * 1.5
    copies = list((Path(os.environ["LORA_SWEEP_CACHE"]) / "datasets").glob("json-*.jsonl"))
    assert len(copies) == 1 and copies[0].read_text().count("\n") == 2000
    bad = tmp_path / "bad.json"
    bad.write_text('[{"text": "a", "label": "x"} {"text": "b"}]')
    with pytest.raises(LoraError, match="expected ',' or ']'"):
        jsonfile.array_to_lines(bad, tmp_path / "bad.jsonl")
    assert not (tmp_path / "bad.jsonl").exists()  # nothing half-written


def test_a_large_json_document_of_column_lists_is_refused(tmp_path: Path, fresh_data_caches: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "cols.json"
    path.write_text(json.dumps({"text": ["a b c"] * 500, "label": ["x"] * 500}))
    monkeypatch.setattr("sweeps.data.sources.MAX_DOCUMENT_BYTES", 1000)
    with pytest.raises(LoraError, match=r"is one JSON document of 0 MiB \(read whole up to 0 MiB\)") as caught:
        read_file(str(path))
    assert "write it as JSON lines" in (caught.value.hint or "")


def test_the_datasets_cache_is_pruned_by_age_and_size(tmp_path: Path) -> None:
    folder = tmp_path / "datasets"
    now = time.time()
    for name, age_days, size in (("old", 40, 10), ("a", 5, 400), ("b", 3, 400), ("c", 1, 400), ("fresh", 0, 400),
                                 ("in-use", 60, 400)):
        entry = folder / name
        entry.mkdir(parents=True)
        (entry / "data.arrow").write_bytes(b"x" * size)
        stamp = now - age_days * 86400 - (0 if age_days else GRACE_S / 2)
        os.utime(entry, (stamp, stamp))
    removed = prune_datasets_cache(folder, keep={"in-use"}, max_bytes=1600, now=now)
    assert removed == ["old", "a"]  # too old; then the least recently used until 1,600 bytes or less
    assert sorted(p.name for p in folder.iterdir()) == ["b", "c", "fresh", "in-use"]


def test_report_out_keeps_an_existing_file_without_force(tiny_model_dir: Path, tiny_data_file: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    name, home = _stored_sweep(tmp_path, tiny_model_dir, tiny_data_file)
    mine = tmp_path / "mine.html"
    mine.write_text("my notes")
    code = main(["report", name, "--home", str(home), "--out", str(mine)])
    err = capsys.readouterr().err
    assert_user_error(code, err, "exists: the report does not replace a file")
    assert "--force" in err and mine.read_text() == "my notes"


def test_a_malformed_plan_is_ignored_with_a_warning(tmp_path: Path) -> None:
    config = load_sweep_config(DEMO, [f"tracking.home={tmp_path}"])
    path = plan_path(config)
    path.parent.mkdir(parents=True)
    warnings: list[str] = []
    this = fingerprint(config)
    for text in ("{not json", json.dumps({"configs": 5, "fingerprint": this}), "[1, 2]",
                 json.dumps({"fingerprint": this, "configs": [{"r": "x"}]})):
        path.write_text(text)
        assert load_plan(config, warn=warnings.append) is None
    path.write_text(json.dumps({"fingerprint": "another sweep", "configs": 5}))
    assert load_plan(config, warn=warnings.append) is None  # a plan of another version of the sweep: no warning
    assert len(warnings) == 4 and all(w.startswith("warning: ignored the saved plan") for w in warnings)
    path.unlink()
    assert load_plan(config, warn=warnings.append) is None and len(warnings) == 4  # no plan: nothing to say


def test_an_export_removes_what_a_killed_export_left(tmp_path: Path) -> None:
    dest = tmp_path / "best"
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = tmp_path / f".best.{dead.pid}-abc123.tmp"
    old = tmp_path / ".best.q1w2e3.tmp"  # an older naming: removed once an hour old
    mine = tmp_path / f".best.{os.getpid()}-zzz.tmp"  # this process's own: in use
    other = tmp_path / ".other.1-abc.tmp"  # another export's
    for folder in (left, old, mine, other):
        (folder / "adapter").mkdir(parents=True)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert sorted(p.name for p in remove_leftovers(dest)) == sorted([left.name, old.name])
    assert mine.exists() and other.exists() and not left.exists() and not old.exists()
