"""Adapter files: what save_adapter writes, and strict, all-or-nothing loading."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora_core
from lora_core import LoraConfig, LoraError, inject, load_adapter, save_adapter
from lora_core.analysis import parameter_count

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def saved_llama(tiny, path: Path, **cfg) -> torch.nn.Module:
    model = tiny.llama()
    inject(model, LoraConfig(**{"r": 4, "alpha": 8, "targets": ["q", "v"], **cfg}))
    tiny.randomize_lora(model)
    save_adapter(model, path)
    return model


def rewrite_weights(path: Path, edit) -> None:
    """Load the safetensors file, let ``edit`` change the dict, write it back with the same metadata."""
    file = path / WEIGHTS
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata=metadata)


def assert_untouched(tiny, model, ids, expected) -> None:
    """A failed load leaves no trace: no LoRA layers, no adapter, the same outputs."""
    assert tiny.lora_module_paths(model) == []
    assert lora_core.adapter_names(model) == []
    assert "_lora_registry" not in model.__dict__
    assert torch.equal(tiny.logits(model, ids), expected)


# ----------------------------------------------------------------------------------------- save


def test_saved_files_and_config_fields(tiny, tmp_path):
    model = saved_llama(tiny, tmp_path, dropout=0.05)
    assert sorted(os.listdir(tmp_path)) == [CONFIG, WEIGHTS]  # no temp files left behind
    cfg = json.loads((tmp_path / CONFIG).read_text())
    assert cfg["peft_type"] == "LORA"
    assert cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["lora_dropout"] == 0.05
    assert cfg["target_modules"] == ["q_proj", "v_proj"]
    assert cfg["fan_in_fan_out"] is False
    assert cfg["use_rslora"] is False and cfg["use_dora"] is False and cfg["bias"] == "none"
    assert cfg["modules_to_save"] is None
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
    tensors = load_file(tmp_path / WEIGHTS)
    assert sorted(tensors) == sorted(
        f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
        for i in range(2) for m in ("q_proj", "v_proj") for ab in "AB")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 16)
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (8, 4)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    w = lora_core.lora_weights(model)["model.layers.1.self_attn.v_proj"]
    assert torch.equal(tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"], w.lora_B)


def test_file_size_is_the_tensor_bytes(tiny, tmp_path):
    model = saved_llama(tiny, tmp_path, targets=["all-linear"])
    numel = parameter_count(model).lora
    assert numel == 2 * 4 * ((16 + 16) + 2 * (16 + 8) + (16 + 16) + 2 * (16 + 32) + (32 + 16))
    size = (tmp_path / WEIGHTS).stat().st_size
    # The header holds 28 key names with shapes/offsets (~120 bytes each) plus our metadata.
    assert 4 * numel < size <= 4 * numel + 6 * 1024
    # Our metadata (config, fused layout) costs under 1.5 KB over a bare file of the same tensors.
    save_file(load_file(tmp_path / WEIGHTS), tmp_path / "bare.safetensors")
    assert 0 < size - (tmp_path / "bare.safetensors").stat().st_size <= 1536


def test_gpt2_config_says_fan_in_fan_out(tiny, tmp_path):
    model = tiny.gpt2()
    inject(model, LoraConfig(r=2, alpha=4, targets=["q", "v"]))
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / CONFIG).read_text())
    assert cfg["fan_in_fan_out"] is True
    assert cfg["target_modules"] == ["c_attn"]
    # q and v slices: one rank-2r LoRA per c_attn, alpha doubled so that alpha/r is unchanged.
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    tensors = load_file(tmp_path / WEIGHTS)
    b = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert b.shape == (48, 4)
    assert torch.count_nonzero(b[16:32]) == 0  # k rows are structurally zero


def test_save_into_a_file_path_is_an_error(tiny, tmp_path):
    model = tiny.llama()
    inject(model, LoraConfig(r=2, alpha=4, targets=["q"]))
    (tmp_path / "file").write_text("x")
    with pytest.raises(LoraError, match="exists and is not a directory"):
        save_adapter(model, tmp_path / "file")


def test_save_without_adapter_is_an_error(tiny, tmp_path):
    with pytest.raises(LoraError, match="this model has no LoRA adapter"):
        save_adapter(tiny.llama(), tmp_path)


# ----------------------------------------------------------------------------------------- load


@pytest.mark.parametrize(
    ("family", "cfg"),
    [
        ("llama", {"targets": ["q", "v"], "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}}),
        ("gpt2", {"targets": ["q", "v", "o"]}),
        ("neox", {"targets": ["v", "k"], "rslora": True}),
        ("phi3", {"targets": ["q", "mlp"]}),
        ("bert", {"targets": ["all-linear"], "modules_to_save": ["classifier"], "init": "gaussian"}),
    ],
)
def test_round_trip_ours(tiny, tmp_path, family, cfg):
    ids = tiny.ids()
    model = getattr(tiny, family)()
    config = LoraConfig(r=3, alpha=5, **cfg)
    inject(model, config)
    tiny.randomize_lora(model)
    if config.modules_to_save:
        tiny.perturb_saved(model)
    expected = tiny.logits(model, ids)
    save_adapter(model, tmp_path)
    loaded = load_adapter(getattr(tiny, family)(), tmp_path)
    assert torch.equal(tiny.logits(loaded, ids), expected)
    info = lora_core.adapter_info(loaded)
    assert info.config == config
    assert info.paths == lora_core.adapter_info(model).paths
    for path, w in lora_core.lora_weights(loaded).items():
        src = lora_core.lora_weights(model)[path]
        assert torch.equal(w.lora_A, src.lora_A) and torch.equal(w.lora_B, src.lora_B)
        assert w.roles == src.roles and w.scaling == src.scaling
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if ".lora." in n)


def test_load_trainable_flag(tiny, tmp_path):
    saved_llama(tiny, tmp_path)
    frozen = load_adapter(tiny.llama(), tmp_path)
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if ".lora." in n)
    trainable = load_adapter(tiny.llama(), tmp_path, trainable=True)
    assert all(p.requires_grad for n, p in trainable.named_parameters() if ".lora." in n)


def test_missing_lora_b_key(tiny, tmp_path):
    saved_llama(tiny, tmp_path)
    rewrite_weights(tmp_path, lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"))
    model, ids = tiny.llama(), tiny.ids()
    before = tiny.logits(model, ids)
    with pytest.raises(LoraError, match=r"adapter is missing lora_B for model\.layers\.1\.self_attn\.v_proj"):
        load_adapter(model, tmp_path)
    assert_untouched(tiny, model, ids, before)


def test_unexpected_lora_key(tiny, tmp_path):
    saved_llama(tiny, tmp_path)

    def add(t):
        t["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 16)
        t["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"] = torch.zeros(32, 4)

    rewrite_weights(tmp_path, add)
    model, ids = tiny.llama(), tiny.ids()
    before = tiny.logits(model, ids)
    with pytest.raises(LoraError, match=r"weights for model\.layers\.0\.mlp\.up_proj, which its target_modules"):
        load_adapter(model, tmp_path)
    assert_untouched(tiny, model, ids, before)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("base_model.model.model.layers.0.self_attn.q_proj.extra", r"unexpected key base_model\.model\.model\.layers"
                                                                     r"\.0\.self_attn\.q_proj\.extra"),
        ("something.else", r"unexpected key 'something\.else'"),
        ("base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight",
         r"weights for model\.layers\.9\.self_attn\.q_proj, which this model does not have"),
    ],
)
def test_unexpected_other_keys(tiny, tmp_path, key, message):
    saved_llama(tiny, tmp_path)
    rewrite_weights(tmp_path, lambda t: t.__setitem__(key, torch.zeros(4, 16)))
    model, ids = tiny.llama(), tiny.ids()
    before = tiny.logits(model, ids)
    with pytest.raises(LoraError, match=message):
        load_adapter(model, tmp_path)
    assert_untouched(tiny, model, ids, before)


def test_adapter_for_another_base_model(tiny, tmp_path):
    saved_llama(tiny, tmp_path)  # hidden_size 16
    model, ids = tiny.llama(hidden=32), tiny.ids()
    before = tiny.logits(model, ids)
    with pytest.raises(LoraError) as info:
        load_adapter(model, tmp_path)
    assert info.value.message.startswith("shape mismatch at model.layers.0.self_attn.q_proj: adapter has A (4, 16)")
    assert "another base model" in info.value.hint
    assert_untouched(tiny, model, ids, before)


def test_adapter_for_model_with_fewer_layers(tiny, tmp_path):
    saved_llama(tiny, tmp_path)  # two layers
    model, ids = tiny.llama(layers=1), tiny.ids()
    before = tiny.logits(model, ids)
    with pytest.raises(LoraError, match=r"model\.layers\.1\.self_attn\.q_proj, which this model does not have"):
        load_adapter(model, tmp_path)
    assert_untouched(tiny, model, ids, before)


def test_rank_in_config_must_match_weights(tiny, tmp_path):
    saved_llama(tiny, tmp_path)
    cfg = json.loads((tmp_path / CONFIG).read_text())
    cfg["r"] = 8
    (tmp_path / CONFIG).write_text(json.dumps(cfg))
    model, ids = tiny.llama(), tiny.ids()
    before = tiny.logits(model, ids)
    with pytest.raises(LoraError, match=r"rank mismatch at model\.layers\.0\.self_attn\.q_proj"):
        load_adapter(model, tmp_path)
    assert_untouched(tiny, model, ids, before)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / CONFIG).unlink(), r"adapter_config\.json is missing"),
        (lambda p: (p / WEIGHTS).unlink(), r"adapter_model\.safetensors is missing"),
        (lambda p: (p / CONFIG).write_text("{not json"), r"adapter_config\.json is not valid JSON"),
        (lambda p: (p / CONFIG).write_text("[1, 2]"), r"adapter_config\.json holds a JSON list, not an object"),
        (lambda p: (p / WEIGHTS).write_bytes(b"\x00" * 12), r"cannot read .*adapter_model\.safetensors"),
        (lambda p: _edit_config(p, peft_type="IA3"), r"holds a IA3 adapter"),
        (lambda p: _edit_config(p, use_dora=True), r"PEFT option use_dora=True is not supported"),
        (lambda p: _edit_config(p, layer_replication=[[0, 2], [1, 2]]), r"PEFT option layer_replication="),
        (lambda p: _edit_config(p, use_qalora=True), r"PEFT option use_qalora=True"),
        (lambda p: _edit_config(p, alora_invocation_tokens=[1, 2]), r"PEFT option alora_invocation_tokens"),
        (lambda p: _edit_config(p, target_modules=None), r"has no target_modules"),
        (lambda p: _edit_config(p, r="four"), r"r and lora_alpha must be numbers"),
    ],
)
def test_damaged_adapter_directories(tiny, tmp_path, damage, message):
    saved_llama(tiny, tmp_path)
    damage(tmp_path)
    model, ids = tiny.llama(), tiny.ids()
    before = tiny.logits(model, ids)
    with pytest.raises(LoraError, match=message):
        load_adapter(model, tmp_path)
    assert_untouched(tiny, model, ids, before)


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / CONFIG).read_text())
    cfg.update(changes)
    (path / CONFIG).write_text(json.dumps(cfg))


def _drop_metadata(path: Path) -> None:
    tensors = load_file(path / WEIGHTS)
    save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})


def test_invalid_config_values_fail_before_touching_the_model(tiny, tmp_path):
    """A PEFT-style file (no lora_core metadata) whose alpha is invalid must not leave LoRA layers behind."""
    saved_llama(tiny, tmp_path)
    _drop_metadata(tmp_path)
    _edit_config(tmp_path, lora_alpha=-1)
    model, ids = tiny.llama(), tiny.ids()
    before = tiny.logits(model, ids)
    with pytest.raises(LoraError, match="alpha must be a positive number"):
        load_adapter(model, tmp_path)
    assert_untouched(tiny, model, ids, before)


def test_corrupt_lora_core_metadata(tiny, tmp_path):
    saved_llama(tiny, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    save_file(tensors, tmp_path / WEIGHTS, metadata={"format": "pt", "lora_core": "{oops"})
    model, ids = tiny.llama(), tiny.ids()
    before = tiny.logits(model, ids)
    with pytest.raises(LoraError, match="unreadable lora_core metadata"):
        load_adapter(model, tmp_path)
    assert_untouched(tiny, model, ids, before)


def test_missing_and_mismatched_saved_module(tiny, tmp_path):
    model = tiny.bert()
    inject(model, LoraConfig(r=2, alpha=4, targets=["q"], modules_to_save=["classifier"]))
    save_adapter(model, tmp_path)
    ids = tiny.ids()

    rewrite_weights(tmp_path, lambda t: t.pop("base_model.model.classifier.bias"))
    fresh = tiny.bert()
    before = tiny.logits(fresh, ids)
    with pytest.raises(LoraError, match=r"adapter is missing classifier\.bias \(modules_to_save\)"):
        load_adapter(fresh, tmp_path)
    assert_untouched(tiny, fresh, ids, before)

    rewrite_weights(tmp_path, lambda t: t.pop("base_model.model.classifier.weight"))
    with pytest.raises(LoraError, match=r"adapter is missing classifier\.weight \(modules_to_save\)"):
        load_adapter(fresh, tmp_path)
    assert_untouched(tiny, fresh, ids, before)

    five_labels = tiny.bert(num_labels=5)
    save_adapter(model, tmp_path)
    before = tiny.logits(five_labels, ids)
    with pytest.raises(LoraError, match=r"shape mismatch at classifier\.weight"):
        load_adapter(five_labels, tmp_path)
    assert_untouched(tiny, five_labels, ids, before)


def test_edited_fused_block_structure_is_an_error(tiny, tmp_path):
    model = tiny.gpt2()
    inject(model, LoraConfig(r=2, alpha=4, targets=["q", "v"]))
    save_adapter(model, tmp_path)

    def poke(t):
        t["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"][20, 0] = 1.0  # a k row

    rewrite_weights(tmp_path, poke)
    fresh, ids = tiny.gpt2(), tiny.ids()
    before = tiny.logits(fresh, ids)
    with pytest.raises(LoraError, match=r"fused lora_B of transformer\.h\.1\.attn\.c_attn has values outside"):
        load_adapter(fresh, tmp_path)
    assert_untouched(tiny, fresh, ids, before)


def test_load_errors_for_names_and_directories(tiny, tmp_path):
    saved_llama(tiny, tmp_path / "a")
    model = tiny.llama()
    with pytest.raises(LoraError, match="does not exist"):
        load_adapter(model, tmp_path / "nope")
    with pytest.raises(LoraError, match="adapter name 'x/y' is not valid"):
        load_adapter(model, tmp_path / "a", name="x/y")
    load_adapter(model, tmp_path / "a")
    with pytest.raises(LoraError, match="adapter 'default' already exists"):
        load_adapter(model, tmp_path / "a")
    assert lora_core.adapter_names(model) == ["default"]


def test_load_does_not_consume_the_global_random_state(tiny, tmp_path):
    model = tiny.llama()
    inject(model, LoraConfig(r=2, alpha=4, targets=["q", "v"]))
    save_adapter(model, tmp_path / "a")
    fresh = tiny.llama()
    torch.manual_seed(123)
    load_adapter(fresh, tmp_path / "a")
    after_load = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(after_load, torch.rand(4))
