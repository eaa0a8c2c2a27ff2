"""Shared fixtures: tiny transformers models built from configs (no downloads), fixed seeds.

The ``tiny`` fixture hands out :class:`Tiny`, a namespace of factories and helpers:

    model = tiny.llama(seed=0)          # same seed -> bit-identical weights
    ids = tiny.ids()                    # (2, 7) token ids, fixed
    tiny.randomize_lora(model, seed=1)  # give B (and A) fixed nonzero values
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
)

# Tests never touch the network: MLflow's telemetry would fetch its config from the internet when
# mlflow is imported (at collection time, before pytest sets PYTEST_CURRENT_TEST, which also disables it).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from support import FILLER, KEYWORDS, LABELS, MAIN, Sweeps, build_sweeps

from sweeps.data import prepare as sweeps_data
from sweeps.models.load import load_tokenizer

# Under pytest-xdist (``make test`` runs ``-n 2``) each worker process, and every process a test starts from
# it, runs torch on one thread: two workers share the machine's cores instead of each spinning up a pool
# as wide as the machine (OpenMP threads waiting for a core they share run many times slower). The tiny
# models of most tests are as fast on one thread; the few tests that time or compare thread counts set
# their own.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_name] = "1"
    torch.set_num_threads(1)

VOCAB = 64

# Tolerance for comparing two float32 computations of the same function that differ only in the order of
# operations: PEFT's ``s * (x A^T) B^T`` against ours, merged against unmerged weights, another BLAS kernel
# or library release. Each differs from exact arithmetic by rounding, a few float32 eps per operation
# relative to the magnitudes involved, growing with depth and inner dimension. The hidden states these tiny
# models carry are O(1) (LayerNorm/RMSNorm outputs), so the error is relative to max(1, max|reference|).
# 64 eps (7.6e-6 at that scale) leaves a margin of about 8x over the largest difference measured here
# (9.8e-7 = 8 eps: BERT with q, k, v, o adapted, against PEFT), while the faults these comparisons exist
# to catch (a wrong alpha/r, a missing adapter, a wrong fused slice) move the logits by more than 1e-3.
F32_EPS = torch.finfo(torch.float32).eps
F32_ULPS = 64

COPY_WORDS = ["alpha", "beta", "gamma", "delta", "omega"]  # the copy task's words


def _built(model_cls, config, seed: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    return model.to(dtype)


class Tiny:
    """Factories for tiny models (1-2 layers, hidden 16-32) and small helpers used across the suite."""

    VOCAB = VOCAB

    # ------------------------------------------------------------------ models
    @staticmethod
    def llama(seed: int = 0, hidden: int = 16, layers: int = 2, dtype: torch.dtype = torch.float32) -> nn.Module:
        """Llama: hidden 16, 2 heads of 8, 1 KV head (k/v out = 8), MLP 32, untied lm_head."""
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                             max_position_embeddings=32, tie_word_embeddings=False)
        return _built(LlamaForCausalLM, config, seed, dtype)

    @staticmethod
    def bert(seed: int = 0, hidden: int = 16, layers: int = 1, num_labels: int = 3) -> nn.Module:
        """BertForSequenceClassification: hidden 16, 2 heads, MLP 32, ``classifier`` head with 3 labels.

        initializer_range 0.2 (not 0.02) so that the logits are O(1), not O(0.01).
        """
        config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=32,
                            num_labels=num_labels, initializer_range=0.2)
        return _built(BertForSequenceClassification, config, seed, torch.float32)

    @staticmethod
    def gpt2(seed: int = 0, hidden: int = 16, layers: int = 2) -> nn.Module:
        """GPT-2 LM: Conv1D layers, fused ``c_attn`` (16 -> 48), MLP 64, lm_head tied to wte."""
        config = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=2, n_positions=32,
                            bos_token_id=0, eos_token_id=0)
        return _built(GPT2LMHeadModel, config, seed, torch.float32)

    @staticmethod
    def neox(seed: int = 0, hidden: int = 16, layers: int = 1) -> nn.Module:
        """GPT-NeoX: fused ``query_key_value`` with q/k/v interleaved per head (2 heads of 8)."""
        config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=32,
                               rotary_pct=0.5, bos_token_id=0, eos_token_id=0)
        return _built(GPTNeoXForCausalLM, config, seed, torch.float32)

    @staticmethod
    def phi3(seed: int = 0, hidden: int = 16, layers: int = 1) -> nn.Module:
        """Phi-3: fused ``qkv_proj`` with 2 query heads and 1 KV head of 8 (q 16 rows, k 8, v 8)."""
        config = Phi3Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                            max_position_embeddings=32, original_max_position_embeddings=32,
                            bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
        return _built(Phi3ForCausalLM, config, seed, torch.float32)

    # ------------------------------------------------------------------ inputs / outputs
    @staticmethod
    def ids(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(1, VOCAB, (batch, length), generator=gen)

    @staticmethod
    def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids).logits.detach().clone()

    @staticmethod
    def f32_atol(reference: torch.Tensor) -> float:
        """The absolute tolerance for ``reference`` under a reordered float32 computation (see F32_ULPS)."""
        return F32_ULPS * F32_EPS * max(1.0, reference.detach().abs().max().item())

    @staticmethod
    def assert_f32_close(actual: torch.Tensor, expected: torch.Tensor, msg: str | None = None) -> None:
        """``actual`` equals ``expected`` up to float32 rounding of a reordered computation (rtol 0)."""
        torch.testing.assert_close(actual, expected, atol=Tiny.f32_atol(expected), rtol=0, msg=msg)

    # ------------------------------------------------------------------ LoRA helpers
    @staticmethod
    def randomize_lora(model: nn.Module, seed: int = 1, scale: float = 0.5, name: str | None = None) -> None:
        """Give every LoRA matrix of adapter ``name`` fixed random values (B is zero after injection)."""
        import lora_core

        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, w in sorted(lora_core.lora_weights(model, name).items()):
                w.lora_A.copy_(torch.randn(w.lora_A.shape, generator=gen) * scale)
                w.lora_B.copy_(torch.randn(w.lora_B.shape, generator=gen) * scale)

    @staticmethod
    def perturb_saved(model: nn.Module, seed: int = 2, scale: float = 0.5, name: str | None = None) -> None:
        """Change the values of adapter ``name``'s modules_to_save (e.g. the classifier head)."""
        import lora_core

        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for path in lora_core.adapter_info(model, name).saved_paths:
                for p in model.get_submodule(path).parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * scale)

    @staticmethod
    def lora_module_paths(model: nn.Module) -> list[str]:
        """Paths of modules that carry LoRA machinery (empty for a clean model)."""
        return [p for p, m in model.named_modules() if hasattr(m, "lora") or type(m).__name__.startswith("Lora")]


# pytest-xdist: ``make test`` runs ``--dist loadfile`` (a file's tests on one worker), because under pytest 9.2
# and xdist 3.8 ``--dist loadgroup`` no longer honours these marks (xdist writes the group into ``_nodeid``,
# which pytest 9 does not read); with loadgroup working again, the marks below would also keep the users of
# one session fixture together. The tests that share an expensive fixture run on one worker, so that it
# is made once: a module's module-scoped fixtures (a PostgreSQL cluster, an MLflow server, a trained trial)
# keep its tests together, and the session fixtures below keep all their users together. Every other test
# goes to whichever worker is free.
SHARED_GROUPS = {"sweeps": "report-sweeps", "main_report": "report-sweeps", "mlflow_server": "mlflow-server"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        shared = sorted({SHARED_GROUPS[name] for name in info.name2fixturedefs if name in SHARED_GROUPS})
        own = any(defs[-1].scope == "module" for defs in info.name2fixturedefs.values())
        if shared or own:
            item.add_marker(pytest.mark.xdist_group(shared[0] if shared else item.module.__name__))


@pytest.fixture
def tiny() -> type[Tiny]:
    return Tiny


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- the tiny model, data and store
# Used by the trial, sweep, status, export, report and worker tests: built once per session.

@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BertForSequenceClassification (3 labels) with the minilm-l6 tokenizer, saved as safetensors."""
    from transformers import BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = load_tokenizer("minilm-l6")  # the real model cache; nothing is fetched
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=3,
                        initializer_range=0.2)  # O(1) activations in so small a model
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    return out


@pytest.fixture(scope="session")
def tiny_data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 JSON lines, 80 per class: seeded filler words around one keyword of the row's class."""
    rng = random.Random(0)
    rows = []
    for i in range(240):
        label = LABELS[i % 3]
        words = [rng.choice(FILLER) for _ in range(rng.randint(4, 10))]
        words.insert(rng.randint(0, len(words)), rng.choice(KEYWORDS[label]))
        rows.append({"text": " ".join(words), "label": label})
    path = tmp_path_factory.mktemp("tiny-data") / "topics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LlamaForCausalLM (hidden 32, 2 layers, 1 KV head) with the smollm2 tokenizer, saved."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def copy_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prompt: a word; completion: the same word (learnable by a tiny model in a few dozen steps)."""
    path = tmp_path_factory.mktemp("data") / "copy.jsonl"
    rows = [{"prompt": f"Say {w}.", "completion": w} for w in COPY_WORDS for _ in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def bert_tok() -> Any:
    """The minilm-l6 tokenizer (from the real model cache; nothing is fetched)."""
    return load_tokenizer("minilm-l6")


@pytest.fixture(scope="session")
def lm_tok() -> Any:
    """The smollm2-135m tokenizer (from the real model cache)."""
    return load_tokenizer("smollm2-135m")


@pytest.fixture
def fresh_data_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A private tokenized-data cache and empty in-memory caches (the tokenizers load before this, from
    the real model cache)."""
    monkeypatch.setenv("LORA_SWEEP_CACHE", str(tmp_path / "cache"))
    sweeps_data.clear_memory_cache()
    yield
    sweeps_data.clear_memory_cache()


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow sqlite store with its tables created, to be copied into each test's home."""
    path = tmp_path_factory.mktemp("store-template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def isolated(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """(Used by the modules that train: ``pytestmark = pytest.mark.usefixtures("isolated")``.) Hub offline,
    no progress bars, the environment ``main`` sets restored afterwards, and (for the
    tiny tests) a private tokenized-data cache."""
    import huggingface_hub.constants
    from transformers.utils import logging as hf_logging

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for name, value in (("MLFLOW_DISABLE_TELEMETRY", "true"), ("TRANSFORMERS_VERBOSITY", "error"),
                        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        monkeypatch.setenv(name, value)  # main() only sets defaults; this restores whatever was there
    if request.node.get_closest_marker("integration") is None:
        monkeypatch.setenv("LORA_SWEEP_CACHE", str(tmp_path / "cache"))  # built-in models resolve before this
    sweeps_data.clear_memory_cache()
    # transformers was imported (by conftest) before main() could disable its loading bars, which the
    # real command line does; without this they would land on the captured stderr.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    yield
    if bars:
        hf_logging.enable_progress_bar()
    sweeps_data.clear_memory_cache()



@pytest.fixture(scope="session")
def sweeps(tiny_model_dir: Path, tiny_data_file: Path, empty_store: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Sweeps:
    """The report tests' three sweeps, run once per session."""
    return build_sweeps(tiny_model_dir, tiny_data_file, empty_store, tmp_path_factory)


@pytest.fixture(scope="session")
def main_report(sweeps: Sweeps) -> Path:
    """The report of tiny-report made by the command line (default place), once per session."""
    from sweeps.cli.main import main

    with pytest.MonkeyPatch.context() as patch:
        import huggingface_hub.constants

        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        for name, value in (("HF_HUB_OFFLINE", "1"), ("MLFLOW_DISABLE_TELEMETRY", "true"),
                            ("TRANSFORMERS_VERBOSITY", "error"), ("LORA_SWEEP_CACHE", str(sweeps.folder / "cache"))):
            patch.setenv(name, value)
        assert main(["report", str(sweeps.main_yaml)]) == 0
    return sweeps.home / "reports" / f"{MAIN}.html"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One real ``mlflow server`` (sqlite backend, proxied artifacts) for the tests that only log to it, started
    on first use and stopped at the end of the session (of each pytest-xdist worker). Each test names its own
    experiments. (A test that stops or restarts a server starts its own: test_tracking_outage.py.)"""
    from services import MlflowServer

    root = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(root, f"sqlite:///{root / 'backend.db'}")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url() -> Any:
    """A fresh database on the machine's PostgreSQL (127.0.0.1:5432, trust auth, user postgres) for this test,
    dropped afterwards; the plain URL (psycopg 3). The name is unique across processes (pytest-xdist workers)."""
    import uuid

    import psycopg

    server = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
    try:
        admin = psycopg.connect(dbname="postgres", connect_timeout=5, autocommit=True, **server)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable on 127.0.0.1:5432 ({str(exc).strip()}); this test needs it "
                    "(trust auth, user postgres)")
    name = f"lora_sweep_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
