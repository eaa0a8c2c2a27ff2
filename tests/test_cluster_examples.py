"""The Slurm and Kubernetes examples of ``examples/cluster``, checked and run on this machine.

The manifests must parse and fit together (the ConfigMap's sweep is ``examples/cluster/sweep.yaml``, the
workers name that sweep, ask for one GPU each, and every ``$(VAR)`` of a command is declared in its
container's env), and the sbatch scripts must pass ``bash -n``. Then the commands run as written against
real services: a fresh database on the machine's PostgreSQL (127.0.0.1:5432, user postgres, trust auth)
as the Optuna storage and an ``mlflow server`` (tests/services.py) as the tracking server. The owner is
``slurm-open.sbatch`` run by bash (``lora-sweep run SWEEP.yaml --workers 0``); the workers are
``slurm-workers.sbatch`` (``srun`` standing for itself) and the Kubernetes worker Job's container command
with its ``$(VAR)``s expanded as Kubernetes does, each with a home and data cache of its own as on
separate machines, started at once so that ``--wait`` has to wait for the owner. Every trial is COMPLETE
exactly once; the Kubernetes owner's command is checked with the command-line parser.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState
from services import MlflowServer
from support import planned, write_sweep

from sweeps.cli.main import build_parser
from sweeps.config.sweep import load_sweep_config
from sweeps.names import WORKER_TAG_PREFIX

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "examples" / "cluster"
K8S = CLUSTER / "k8s"
SBATCH = ("slurm-open.sbatch", "slurm-workers.sbatch")
VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")  # Kubernetes' $(VAR) in command and args


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object of examples/cluster/k8s, by (kind, name)."""
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def container(job: dict[str, Any]) -> dict[str, Any]:
    (only,) = job["spec"]["template"]["spec"]["containers"]
    return only


def k8s_command(spec: dict[str, Any], values: dict[str, str]) -> list[str]:
    """The container's command line with each ``$(VAR)`` replaced by ``values[VAR]``, as Kubernetes does
    with the container's env (every VAR must be declared there)."""
    declared = {e["name"] for e in spec.get("env", [])}

    def value(m: re.Match[str]) -> str:
        assert m[1] in declared, f"$({m[1]}) is not in the container's env"
        return values[m[1]]

    return [VAR.sub(value, arg) for arg in [*spec.get("command", []), *spec.get("args", [])]]


def sweep_name() -> str:
    return load_sweep_config(CLUSTER / "sweep.yaml").name


# --------------------------------------------------------------------------- the files themselves


def test_the_manifests_parse_and_fit_together() -> None:
    objects = manifests()
    assert set(objects) == {("Secret", "lora-sweep-storage"), ("ConfigMap", "lora-sweep"),
                            ("Job", "lora-sweep-open"), ("Job", "lora-sweep-workers")}
    config = objects[("ConfigMap", "lora-sweep")]["data"]
    assert yaml.safe_load(config["sweep.yaml"]) == yaml.safe_load((CLUSTER / "sweep.yaml").read_text())
    name = sweep_name()

    workers = objects[("Job", "lora-sweep-workers")]
    assert workers["spec"]["completionMode"] == "Indexed"
    assert workers["spec"]["completions"] == workers["spec"]["parallelism"] >= 2
    worker = container(workers)
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 1 == worker["resources"]["limits"]["nvidia.com/gpu"]
    args = build_parser().parse_args(k8s_command(worker, {v: "x" for v in ("LORA_SWEEP_STORAGE", "LORA_SWEEP_HOME",
                                                                            "MLFLOW_TRACKING_URI")})[1:])
    assert (args.command, args.sweep, args.storage, args.wait) == ("worker", name, None, 600)  # storage: env

    opener = objects[("Job", "lora-sweep-open")]
    owner = container(opener)
    assert "nvidia.com/gpu" not in str(owner["resources"])  # it trains nothing
    args = build_parser().parse_args(k8s_command(owner, {v: "x" for v in ("LORA_SWEEP_STORAGE", "LORA_SWEEP_HOME",
                                                                          "MLFLOW_TRACKING_URI")})[1:])
    assert (args.command, args.workers, args.storage, args.set) == ("run", 0, None, ["tracking.uri=x"])
    mount = next(m for m in owner["volumeMounts"] if m["name"] == "sweep")
    volume = next(v for v in opener["spec"]["template"]["spec"]["volumes"] if v["name"] == "sweep")
    assert volume["configMap"]["name"] == "lora-sweep"
    assert args.sweep == f"{mount['mountPath']}/{volume['configMap']['items'][0]['path']}"

    for spec in (worker, owner):  # the env comes from the Secret and the ConfigMap, by keys they have
        secret_env = {e["name"] for e in spec["env"] if "secretKeyRef" in e.get("valueFrom", {})}
        assert {"LORA_SWEEP_STORAGE", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= secret_env
        assert "--storage" not in spec["command"]  # a password never on a command line
        for env in spec["env"]:
            ref = env.get("valueFrom", {})
            if "secretKeyRef" in ref:
                secret = objects[("Secret", ref["secretKeyRef"]["name"])]
                assert ref["secretKeyRef"]["key"] in secret["stringData"]
            if "configMapKeyRef" in ref:
                assert ref["configMapKeyRef"]["key"] in objects[("ConfigMap", ref["configMapKeyRef"]["name"])]["data"]


def test_the_sbatch_scripts_are_valid_bash_and_name_the_sweep() -> None:
    for name in SBATCH:
        subprocess.run(["bash", "-n", str(CLUSTER / name)], check=True, capture_output=True, timeout=30)
    workers = (CLUSTER / "slurm-workers.sbatch").read_text()
    assert "#SBATCH --gres=gpu:1\n" in workers and "#SBATCH --array=" in workers
    assert re.search(r"^SWEEP=\$\{SWEEP:-(\S+)\}", workers, re.M)[1] == sweep_name()
    opener = (CLUSTER / "slurm-open.sbatch").read_text()
    assert "--gres" not in opener
    default_yaml = re.search(r"^SWEEP_YAML=\$\{SWEEP_YAML:-(\S+)\}", opener, re.M)[1]
    assert (REPO / default_yaml).resolve() == (CLUSTER / "sweep.yaml").resolve()
    for text, command in ((opener, "lora-sweep run"), (workers, "srun lora-sweep worker")):
        (line,) = [line for line in text.splitlines() if line.startswith(command)]
        assert "--storage" not in line and "LORA_SWEEP_STORAGE" not in line  # read from the environment


# --------------------------------------------------------------------------- run as written


@pytest.fixture
def storage_url() -> Iterator[str]:
    """A fresh database on the machine's PostgreSQL, dropped afterwards."""
    def psql(sql: str) -> None:
        subprocess.run(["psql", "-h", "127.0.0.1", "-p", "5432", "-U", "postgres", "-d", "postgres", "-v",
                        "ON_ERROR_STOP=1", "-c", sql], check=True, capture_output=True, timeout=60)

    name = f"lora_sweep_cluster_{uuid.uuid4().hex[:12]}"
    try:
        psql(f'CREATE DATABASE "{name}"')
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.fail(f"PostgreSQL is not reachable on 127.0.0.1:5432 ({exc}); this test needs it (trust auth, "
                    "user postgres)")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def machine(tmp_path: Path, name: str, **env: str) -> dict[str, str]:
    """The environment of one "machine": a home and a data cache of its own, lora-sweep on PATH, a fake srun."""
    bin_dir = tmp_path / "bin"
    if not (bin_dir / "srun").exists():
        bin_dir.mkdir(exist_ok=True)
        (bin_dir / "srun").write_text('#!/bin/sh\nexec "$@"\n')
        (bin_dir / "srun").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
            "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "TRANSFORMERS_VERBOSITY": "error",
            "OMP_NUM_THREADS": "1", "LORA_SWEEP_THREADS": "1", "LORA_SWEEP_HOME": str(tmp_path / name / "home"),
            "LORA_SWEEP_CACHE": str(tmp_path / name / "cache"), **env}


def test_the_slurm_and_kubernetes_commands_run_a_sweep(tiny_model_dir: Path, tiny_data_file: Path, tmp_path: Path,
                                                       storage_url: str, mlflow_server: MlflowServer) -> None:
    name = sweep_name()  # the tiny sweep takes the example's name: the worker commands name it
    sweep = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, tmp_path / "unused-home", name=name,
                        rank=[1, 2], seeds=2, n_trials=4)
    servers = {"LORA_SWEEP_STORAGE": storage_url, "MLFLOW_TRACKING_URI": mlflow_server.url}
    k8s_worker = container(manifests()[("Job", "lora-sweep-workers")])
    k8s_env = {**machine(tmp_path, "pod"), **{e["name"]: e["value"] for e in k8s_worker["env"] if "value" in e}}
    k8s_env.update(servers, LORA_SWEEP_HOME=str(tmp_path / "pod" / "home"))
    commands = {
        "owner": (["bash", str(CLUSTER / "slurm-open.sbatch")],
                  machine(tmp_path, "login", SWEEP_YAML=str(sweep), **servers)),
        "slurm worker": (["bash", str(CLUSTER / "slurm-workers.sbatch")],
                         machine(tmp_path, "node", SLURM_ARRAY_TASK_ID="0", **servers)),
        "k8s worker": (k8s_command(k8s_worker, k8s_env), k8s_env),
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = {what: tmp_path / f"{what.replace(' ', '-')}.log" for what in commands}
    try:
        for what, (cmd, env) in commands.items():  # all at once: the workers --wait for the owner to open it
            with logs[what].open("wb") as log:
                procs[what] = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL)
        for proc in procs.values():
            proc.wait(timeout=600)  # bounds a hang only
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    out = {what: path.read_text(errors="replace") for what, path in logs.items()}
    for what, proc in procs.items():
        assert proc.returncode == 0, f"{what}: {shlex.join(commands[what][0])}\n{out[what][-3000:]}"
    assert "no workers here" in out["owner"]

    study = optuna.load_study(study_name=name, storage=storage_url)
    seen = [(t.number, t.state.name, t.params, t.user_attrs) for t in study.trials]
    assert Counter(t.state for t in study.trials) == {TrialState.COMPLETE: 4}, seen
    assert sorted(planned(study).values()) == [1] * 4  # each (configuration, seed) exactly once
    client = MlflowClient(tracking_uri=mlflow_server.url)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=100)
    parent = next(r for r in runs if r.data.tags.get("lora_sweep.kind") == "sweep")
    children = [r for r in runs if r.data.tags.get("lora_sweep.kind") == "trial"]
    assert len(runs) == 5 and parent.info.status == "FINISHED"  # one parent run: the workers waited for it
    assert sorted(r.info.status for r in children) == ["FINISHED"] * 4
    assert sum(r.data.tags.get("lora_sweep.best") == "true" for r in children) == 1
    # both workers ran to their end and recorded themselves on the parent run; the owner ran no trial
    assert len([k for k in parent.data.tags if k.startswith(WORKER_TAG_PREFIX)]) == 2, parent.data.tags
