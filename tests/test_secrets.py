"""Secrets stay secret: a URL's password never leaves the process that was given it, except to its server.

The end-to-end test runs a sweep whose Optuna storage is a real PostgreSQL database reached with a password
(127.0.0.1:5432 has trust auth, so any password is accepted, and the URL carries one) and whose tracking
server is a real ``mlflow server`` behind a real basic-auth proxy (tests/authproxy.py: a request without
the right ``Authorization`` header gets 401). The owner starts two fresh worker processes; the storage URL
is handed over in ``LORA_SWEEP_STORAGE``, the tracking URI (password included) is in the sweep's YAML.
While it runs, the process table is sampled. Then ``status``, ``status --json``, ``report`` and ``export``
name the sweep. Both passwords are then searched for in every output, every file under the home, the
user's home folder and the data cache, the MLflow server's files (backend database and artifacts), the
report, the export, the study in PostgreSQL and every ``ps`` sample: found nowhere. The proxy's counts show
that the credentials did reach the server (every request carried them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from authproxy import AuthProxy
from optuna.trial import TrialState
from services import MlflowServer

from sweeps.secrets import (
    has_credentials,
    mask_text,
    mask_url,
    private_file,
    strip_credentials,
    with_env_credentials,
)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the rule on every URL form

@pytest.mark.parametrize(("url", "masked", "stored"), [
    ("postgresql://u:pw@h/db", "postgresql://u:***@h/db", "postgresql://u@h/db"),
    ("postgresql://u:ab/cd@h/db", "postgresql://u:***@h/db", "postgresql://u@h/db"),     # '/' in the password
    ("postgresql://:pw@h/db", "postgresql://:***@h/db", "postgresql://h/db"),             # no user
    ("postgresql://u:p@ss@h:5432/db", "postgresql://u:***@h:5432/db", "postgresql://u@h:5432/db"),  # '@'
    ("postgresql://u:p:w@h/db", "postgresql://u:***@h/db", "postgresql://u@h/db"),        # ':' in the password
    ("postgresql://u@h/db?password=pw", "postgresql://u@h/db?password=***", "postgresql://u@h/db"),
    ("postgresql+psycopg://u:pw@[::1]:5432/db?sslmode=require&password=pw",
     "postgresql+psycopg://u:***@[::1]:5432/db?sslmode=require&password=***",
     "postgresql+psycopg://u@[::1]:5432/db?sslmode=require"),
    ("mysql+pymysql://u:p%40w@h/db", "mysql+pymysql://u:***@h/db", "mysql+pymysql://u@h/db"),  # encoded
    ("http://alice:pw@host:5000", "http://alice:***@host:5000", "http://host:5000"),
    ("https://alice:pw@host/mlflow/", "https://alice:***@host/mlflow/", "https://host/mlflow/"),
    ("http://alice@host:5000", "http://alice@host:5000", "http://host:5000"),              # a user, no password
    ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("/abs/study.journal", "/abs/study.journal", "/abs/study.journal"),
])
def test_mask_and_strip_every_url_form(url: str, masked: str, stored: str) -> None:
    assert mask_url(url) == masked
    assert strip_credentials(url) == stored
    assert has_credentials(url) == (masked != url)
    assert mask_url(masked) == masked  # masking twice changes nothing


def test_mask_text_finds_urls_and_password_parameters_inside_messages() -> None:
    text = ("API request to http://alice:pw1@127.0.0.1:5000/api/2.0/mlflow/runs/get failed (x); "
            "(psycopg.OperationalError) 'postgresql://u:pw2@h/db' host=h password=pw3 dbname=x")
    out = mask_text(text)
    assert not any(p in out for p in ("pw1", "pw2", "pw3")), out
    assert "http://alice:***@127.0.0.1:5000/api" in out and "password=***" in out


def test_a_stored_tracking_uri_gets_its_credentials_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:pw@host:5000")
    assert with_env_credentials("http://host:5000") == "http://alice:pw@host:5000"
    assert with_env_credentials("http://other:5000") == "http://other:5000"  # another server: not its password


def test_private_files_are_the_owners_only(tmp_path: Path) -> None:
    path = private_file(tmp_path / "study.journal")
    assert path.stat().st_mode & 0o777 == 0o600
    loose = tmp_path / "old.journal"
    loose.write_text("x")
    loose.chmod(0o644)
    assert private_file(loose).stat().st_mode & 0o777 == 0o600 and loose.read_text() == "x"


def test_the_storage_comes_from_the_environment_or_a_file_and_a_journal_is_private(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from sweeps.cli.main import main
    from sweeps.config.sweep import load_sweep_config
    from sweeps.engine.study import open_study

    journal = tmp_path / "elsewhere" / "demo.journal"
    config = load_sweep_config(REPO / "examples" / "demo-sweep.yaml",
                               [f"tracking.home={tmp_path / 'home'}", f"search.storage={journal}"])
    open_study(config)
    assert journal.stat().st_mode & 0o777 == 0o600  # the study's journal: its owner's only
    name = config.name
    assert main(["status", name, "--home", str(tmp_path / "home")]) == 2  # not in the default place
    capsys.readouterr()
    monkeypatch.setenv("LORA_SWEEP_STORAGE", str(journal))
    assert main(["status", name, "--home", str(tmp_path / "home")]) == 0
    monkeypatch.delenv("LORA_SWEEP_STORAGE")
    url_file = tmp_path / "storage-url"
    url_file.write_text(f"{journal}\n")
    monkeypatch.setenv("LORA_SWEEP_STORAGE_FILE", str(url_file))
    assert main(["status", name, "--home", str(tmp_path / "home")]) == 0
    assert name in capsys.readouterr().out
    monkeypatch.setenv("LORA_SWEEP_STORAGE_FILE", str(tmp_path / "missing"))
    assert main(["status", name, "--home", str(tmp_path / "home")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read the storage URL file $LORA_SWEEP_STORAGE_FILE") and "hint:" in err


# --------------------------------------------------------------------------- a real sweep with passwords


def _sample_ps(stop: threading.Event, samples: list[str]) -> None:
    while not stop.is_set():
        out = subprocess.run(["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True).stdout
        samples.append(out)
        stop.wait(0.2)


def _files(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()]


def test_no_password_anywhere_after_a_sweep_with_two_fresh_workers(
        tiny_model_dir: Path, tiny_data_file: Path, tmp_path: Path, pg_url: str, mlflow_server: MlflowServer,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    pg_password, mlflow_password = f"PgS3cret{uuid.uuid4().hex[:8]}", f"MfS3cret{uuid.uuid4().hex[:8]}"
    secrets = (pg_password, mlflow_password)
    storage = pg_url.replace("postgresql://postgres@", f"postgresql://postgres:{pg_password}@")
    home, user_home, cache = tmp_path / "home", tmp_path / "user", tmp_path / "cache"
    user_home.mkdir()
    with AuthProxy(mlflow_server.url, "alice", mlflow_password) as proxy:
        name = f"secret-{uuid.uuid4().hex[:6]}"
        doc = {"name": name, "seed": 0, "model": {"name": str(tiny_model_dir), "device": "cpu"},
               "data": {"name": None, "files": str(tiny_data_file), "max_length": 32},
               "train": {"steps": 20, "eval_every": 10, "batch_size": 16},
               "tracking": {"home": str(home), "uri": proxy.url_with_credentials()},
               "search": {"rank": [1, 2], "alpha": "2r", "targets": ["q,v"], "lr": [1e-2], "dropout": [0.0],
                          "seeds": 1, "strategy": "grid", "n_trials": 2, "pruner": "none", "test_eval": False}}
        sweep = tmp_path / "sweep.yaml"  # the user's own file (not under the home): it holds the MLflow password
        sweep.write_text(yaml.safe_dump(doc, sort_keys=False))
        env = {**os.environ, "HOME": str(user_home), "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
               "TRANSFORMERS_VERBOSITY": "error", "LORA_SWEEP_CACHE": str(cache), "LORA_SWEEP_STORAGE": storage,
               "LORA_SWEEP_WORKER_START": "fresh"}
        env.pop("MLFLOW_TRACKING_URI", None)
        samples: list[str] = []
        stop = threading.Event()
        sampler = threading.Thread(target=_sample_ps, args=(stop, samples), daemon=True)
        sampler.start()
        try:
            run = subprocess.run([sys.executable, "-m", "sweeps.cli", "run", str(sweep), "--workers", "2"],
                                 cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        finally:
            stop.set()
            sampler.join(timeout=10)
        outputs = [run.stdout, run.stderr]
        assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
        assert "[worker 1/2" in run.stdout and "[worker 2/2" in run.stdout  # two workers ran trials

        # the other commands name the sweep: the storage from the environment, the tracking URI's password
        # from MLflow's own variable (the study's config holds the URI without it)
        for key, value in (("HOME", str(user_home)), ("HF_HUB_OFFLINE", "1"), ("LORA_SWEEP_CACHE", str(cache)),
                           ("LORA_SWEEP_STORAGE", storage), ("MLFLOW_TRACKING_URI", proxy.url_with_credentials())):
            monkeypatch.setenv(key, value)
        from sweeps.cli.main import main

        capsys.readouterr()
        report, export = tmp_path / "report.html", tmp_path / "best"
        for argv in (["status", name, "--home", str(home)], ["status", name, "--home", str(home), "--json"],
                     ["report", name, "--home", str(home), "--out", str(report)],
                     ["export", name, "--home", str(home), "--out", str(export)]):
            code = main(argv)
            captured = capsys.readouterr()
            outputs += [captured.out, captured.err]
            assert code == 0, f"{argv}: {captured.out[-2000:]}{captured.err[-2000:]}"

    study = optuna.load_study(study_name=name, storage=pg_url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert proxy.accepted > 20 and proxy.refused == []  # the password reached the server, with every request
    commands = "".join(samples)
    assert "sweeps.cli worker" in commands and len(samples) > 10  # the samples saw the workers running
    stored = json.dumps([study.user_attrs, [t.user_attrs for t in study.trials]], default=str)
    texts = {"ps": commands, "outputs": "\n".join(outputs), "study in PostgreSQL": stored}
    files = [*_files(home, user_home, cache, mlflow_server.root, export), report]
    assert len(files) > 20 and any("spool" in str(p) for p in files)  # the spool, the MLflow artifacts, ...
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, f"a password in {path}"
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"a password in the {where}: ...{text[max(0, text.find(secret) - 300):][:600]}"
    spool = home / "spool"  # (its sqlite files are gone: every write was sent) the owner's only
    assert spool.stat().st_mode & 0o077 == 0 and (spool / "experiments.json").stat().st_mode & 0o077 == 0
