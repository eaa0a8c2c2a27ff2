"""Interoperability with PEFT (a test dependency only): files both ways, and identical arithmetic.

(a) ours -> PEFT: ``save_adapter`` then ``peft.PeftModel.from_pretrained`` on a fresh base (same seed):
    every tensor in our file lands in PEFT's state dict (same keys, same values) and logits agree.
(b) PEFT -> ours: ``get_peft_model`` + ``save_pretrained``, then ``lora_core.load_adapter``.
(c) the same A and B in both implementations give the same output.
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import lora_core
from lora_core import LoraConfig, inject, load_adapter, lora_weights, save_adapter

# family, our config, PEFT target_modules that selects the same layers (for (b) and (c))
OURS_CASES = [
    pytest.param("llama", {"targets": ["q", "v"]}, id="llama-qv"),
    pytest.param("llama", {"targets": ["all-linear"]}, id="llama-all-linear"),
    pytest.param("bert", {"targets": ["q", "v"], "modules_to_save": ["classifier"]}, id="bert-qv-classifier"),
    pytest.param("bert", {"targets": ["all-linear"], "modules_to_save": ["classifier"]}, id="bert-all-linear"),
    pytest.param("gpt2", {"targets": ["q", "v"]}, id="gpt2-qv-slices"),
    pytest.param("gpt2", {"targets": ["c_attn", "c_proj"]}, id="gpt2-whole-layers"),
    pytest.param("gpt2", {"targets": ["all-linear"]}, id="gpt2-all-linear"),
    pytest.param("gpt2", {"targets": ["q", "v", "mlp"], "rslora": True}, id="gpt2-slices-rslora"),
    pytest.param("neox", {"targets": ["q", "v"]}, id="neox-qv-slices"),
    pytest.param("phi3", {"targets": ["k", "v", "o"]}, id="phi3-kv-slices"),
    pytest.param("llama", {"targets": ["attn"], "rslora": True}, id="llama-rslora"),
    pytest.param("llama", {"targets": ["q", "v", "o"], "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"o_proj": 24}},
                 id="llama-patterns"),
]


def peft_load(model, path):
    """PeftModel.from_pretrained, failing on any warning about keys."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(model, str(path))
    key_warnings = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert key_warnings == []
    # PEFT's own load report, for a second copy of the adapter: nothing missing, nothing unexpected.
    report = pm.load_adapter(str(path), adapter_name="check")
    assert report.missing_keys == [] and report.unexpected_keys == []
    pm.delete_adapter("check")
    pm.set_adapter("default")
    return pm.eval()


def peft_logits(pm, ids):
    with torch.no_grad():
        return pm(input_ids=ids).logits


@pytest.mark.parametrize(("family", "cfg"), OURS_CASES)
def test_ours_to_peft(tiny, tmp_path, family, cfg):
    ids = tiny.ids()
    model = getattr(tiny, family)()
    inject(model, LoraConfig(r=4, alpha=8, **cfg))
    tiny.randomize_lora(model)
    if cfg.get("modules_to_save"):
        tiny.perturb_saved(model)
    ours = tiny.logits(model, ids)
    assert (ours - tiny.logits(getattr(tiny, family)(), ids)).abs().max() > 1e-2  # the adapter matters
    save_adapter(model, tmp_path)

    pm = peft_load(getattr(tiny, family)(), tmp_path)
    tiny.assert_f32_close(peft_logits(pm, ids), ours)
    # Every tensor of the file is in PEFT's adapter state dict, and nothing else is.
    file_sd = load_file(tmp_path / "adapter_model.safetensors")
    peft_sd = peft.get_peft_model_state_dict(pm)
    assert sorted(peft_sd) == sorted(file_sd)
    for key, value in file_sd.items():
        assert torch.equal(peft_sd[key], value), key
    n_lora = sum(1 for k in file_sd if ".lora_" in k)
    assert n_lora == 2 * len(lora_core.adapter_info(model).paths)


@pytest.mark.parametrize(
    ("family", "peft_kwargs"),
    [
        pytest.param("llama", {"target_modules": ["q_proj", "v_proj"]}, id="llama-qv"),
        pytest.param("llama", {"target_modules": "all-linear"}, id="llama-all-linear"),
        pytest.param("llama", {"target_modules": r".*\.layers\.1\..*(k|o)_proj"}, id="llama-regex-string"),
        pytest.param("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"], "use_rslora": True,
                               "rank_pattern": {"q_proj": 2, "layers.1.self_attn.v_proj": 6},
                               "alpha_pattern": {"down_proj": 3}}, id="llama-rslora-patterns"),
        pytest.param("bert", {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
                     id="bert-classifier"),
        pytest.param("bert", {"target_modules": ["query", "value"], "task_type": "SEQ_CLS"}, id="bert-seq-cls"),
        pytest.param("gpt2", {"target_modules": ["c_attn"], "fan_in_fan_out": True}, id="gpt2-c_attn"),
        pytest.param("gpt2", {"target_modules": "all-linear", "fan_in_fan_out": True}, id="gpt2-all-linear"),
        pytest.param("neox", {"target_modules": ["query_key_value", "dense"]}, id="neox"),
    ],
)
def test_peft_to_ours_and_back(tiny, tmp_path, family, peft_kwargs):
    ids = tiny.ids()
    kwargs = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **peft_kwargs}  # False: B is random, not 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(getattr(tiny, family)(), peft.LoraConfig(**kwargs)).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(4)
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen))
    ref = peft_logits(pm, ids)
    assert (ref - tiny.logits(getattr(tiny, family)(), ids)).abs().max() > 1e-2
    pm.save_pretrained(tmp_path / "peft")

    model = load_adapter(getattr(tiny, family)(), tmp_path / "peft")
    tiny.assert_f32_close(tiny.logits(model, ids), ref)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora." in n)

    # ...and back to PEFT: the same tensors, the same logits.
    save_adapter(model, tmp_path / "ours")
    again = peft_load(getattr(tiny, family)(), tmp_path / "ours")
    tiny.assert_f32_close(peft_logits(again, ids), ref)
    original = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(original)
    for key in original:
        assert torch.equal(ours[key], original[key]), key


def copy_into_peft(model, pm, adapter: str = "default") -> None:
    with torch.no_grad():
        for path, w in lora_weights(model).items():
            layer = pm.base_model.model.get_submodule(path)
            layer.lora_A[adapter].weight.copy_(w.lora_A)
            layer.lora_B[adapter].weight.copy_(w.expanded_B())


@pytest.mark.parametrize(
    ("family", "ours", "theirs"),
    [
        pytest.param("llama", {"targets": ["q", "v"]}, {"target_modules": ["q_proj", "v_proj"]}, id="llama"),
        pytest.param("llama", {"targets": ["mlp"], "rslora": True},
                     {"target_modules": ["gate_proj", "up_proj", "down_proj"], "use_rslora": True}, id="llama-rslora"),
        pytest.param("bert", {"targets": ["attn"]},
                     {"target_modules": ["query", "key", "value", "attention.output.dense"]}, id="bert"),
        pytest.param("gpt2", {"targets": ["c_attn", "c_fc"]},
                     {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True}, id="gpt2-conv1d"),
        # q and v slices as one rank-2r LoRA with block-structured B and alpha doubled (same alpha/r).
        pytest.param("gpt2", {"targets": ["q", "v"]},
                     {"target_modules": ["c_attn"], "fan_in_fan_out": True, "r": 8, "lora_alpha": 24},
                     id="gpt2-fused-as-block-B"),
    ],
)
def test_identical_matrices_give_identical_outputs(tiny, family, ours, theirs):
    ids = tiny.ids()
    model = getattr(tiny, family)()
    inject(model, LoraConfig(r=4, alpha=12, **ours))
    tiny.randomize_lora(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(getattr(tiny, family)(),
                                 peft.LoraConfig(**{"r": 4, "lora_alpha": 12, **theirs})).eval()
    copy_into_peft(model, pm)
    tiny.assert_f32_close(tiny.logits(model, ids), peft_logits(pm, ids))
    # Merged, too: PEFT's merge_and_unload and ours give the same weights.
    ref = pm.merge_and_unload()
    lora_core.merge_and_unload(model)
    for (n, p), (m, q) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        assert n == m
        tiny.assert_f32_close(p, q, msg=n)


def test_pattern_config_fields_reach_peft(tiny, tmp_path):
    model = tiny.llama()
    inject(model, LoraConfig(r=4, alpha=8, targets=["q", "v"], rank_pattern={"layers.1.self_attn.q_proj": 2},
                             alpha_pattern={"v_proj": 2}))
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    # Per-layer values that differ from the most common one are written as escaped full paths.
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["rank_pattern"] == {r"model\.layers\.1\.self_attn\.q_proj": 2}
    assert cfg["alpha_pattern"] == {r"model\.layers\.0\.self_attn\.v_proj": 2, r"model\.layers\.1\.self_attn\.v_proj": 2}
    pm = peft_load(tiny.llama(), tmp_path)
    layer = pm.base_model.model.model.layers[1].self_attn
    assert layer.q_proj.r["default"] == 2 and layer.q_proj.scaling["default"] == 4.0
    assert layer.v_proj.scaling["default"] == 0.5


def test_seq_cls_model_without_saved_head_loads_in_peft(tiny, tmp_path):
    """PEFT adds classifier/score to modules_to_save for SEQ_CLS and then requires their tensors; an
    adapter that does not save the head must not claim that task type."""
    ids = tiny.ids()
    model = tiny.bert()
    inject(model, LoraConfig(r=2, alpha=4, targets=["q", "v"]))
    tiny.randomize_lora(model)
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] is None
    pm = peft_load(tiny.bert(), tmp_path)
    tiny.assert_f32_close(peft_logits(pm, ids), tiny.logits(model, ids))
    again = load_adapter(tiny.bert(), tmp_path)
    torch.testing.assert_close(tiny.logits(again, ids), tiny.logits(model, ids), atol=0, rtol=0)
