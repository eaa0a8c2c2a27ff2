"""The adapter directory on disk (lora_core.files): atomic writes with ordinary permissions, reading the
files without a model, and never unpickling a ``.bin``."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_core
from lora_core import LoraConfig, LoraError, inject, load_adapter, save_adapter
from lora_core.io import read_adapter_files

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def saved_llama(tiny, path: Path) -> torch.nn.Module:
    model = tiny.llama()
    inject(model, LoraConfig(r=4, alpha=8, targets=["q", "v"]))
    tiny.randomize_lora(model)
    save_adapter(model, path)
    return model


def test_saved_files_get_ordinary_permissions(tiny, tmp_path):
    saved_llama(tiny, tmp_path)
    umask = os.umask(0o022)
    os.umask(umask)
    for name in (CONFIG, WEIGHTS):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_save_is_atomic_when_writing_fails(tiny, tmp_path, monkeypatch):
    model = tiny.llama()
    inject(model, LoraConfig(r=2, alpha=4, targets=["q"]))
    target = tmp_path / "adapter"

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lora_core.files.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, target)
    assert not target.exists()  # the directory appears whole or not at all
    assert os.listdir(tmp_path) == []  # and no staging directory is left behind
    monkeypatch.undo()
    save_adapter(model, target)
    old = (target / WEIGHTS).read_bytes()
    monkeypatch.setattr("lora_core.files.save_file", boom)
    with pytest.raises(OSError):
        save_adapter(model, target)
    assert sorted(os.listdir(target)) == [CONFIG, WEIGHTS]
    assert (target / WEIGHTS).read_bytes() == old  # the previous adapter is intact


def test_read_adapter_files_needs_no_model(tiny, tmp_path):
    model = tiny.gpt2()
    inject(model, LoraConfig(r=2, alpha=4, targets=["q", "v"]))
    tiny.randomize_lora(model)
    save_adapter(model, tmp_path)
    files = read_adapter_files(tmp_path)
    assert files.path == tmp_path
    assert files.config == json.loads((tmp_path / CONFIG).read_text())
    on_disk = load_file(tmp_path / WEIGHTS)
    assert sorted(files.tensors) == sorted(on_disk)
    assert all(torch.equal(files.tensors[k], v) for k, v in on_disk.items())
    meta = files.lora_core_meta()
    assert meta is not None and meta["config"] == LoraConfig(r=2, alpha=4, targets=["q", "v"]).to_dict()
    # A fused layer's layout: A holds one (r, in) block per role, in this order, writing to these rows.
    assert meta["fused"]["transformer.h.0.attn.c_attn"] == {"r": 2, "roles": {"q": [[0, 16]], "v": [[32, 48]]}}
    a = files.tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    w = lora_core.lora_weights(model)["transformer.h.0.attn.c_attn"]
    assert a.shape == (4, 16) and torch.equal(a, w.lora_A)
    # A file PEFT wrote has no lora_core entry.
    save_file(load_file(tmp_path / WEIGHTS), tmp_path / WEIGHTS, metadata={"format": "pt"})
    assert read_adapter_files(tmp_path).lora_core_meta() is None
    with pytest.raises(LoraError, match="does not exist"):
        read_adapter_files(tmp_path / "nope")
    (tmp_path / WEIGHTS).unlink()
    with pytest.raises(LoraError, match=r"adapter_model\.safetensors is missing"):
        read_adapter_files(tmp_path)


class _Marker:
    """Unpickling this creates a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_bin_is_refused_and_never_unpickled(tiny, tmp_path):
    marker = tmp_path / "unpickled"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Marker(str(marker))))
    (adapter / CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                              "target_modules": ["q_proj"]}))
    model, ids = tiny.llama(), tiny.ids()
    before = tiny.logits(model, ids)
    with pytest.raises(LoraError, match=r"holds a pickled adapter_model\.bin; lora_core reads only safetensors"):
        load_adapter(model, adapter)
    assert not marker.exists()
    assert tiny.lora_module_paths(model) == [] and lora_core.adapter_names(model) == []
    assert torch.equal(tiny.logits(model, ids), before)
