"""Several adapters on one model: switching, disabling (incl. modules_to_save heads), deleting."""

from __future__ import annotations

import pytest
import torch

import lora_core
from lora_core import (
    LoraConfig,
    LoraError,
    active_adapter,
    adapter_names,
    adapters_disabled,
    delete_adapter,
    disable_adapters,
    enable_adapters,
    inject,
    load_adapter,
    save_adapter,
    set_active_adapter,
)

CONFIGS = {
    "one": LoraConfig(r=2, alpha=4, targets=["q", "v"], modules_to_save=["classifier"]),
    "two": LoraConfig(r=4, alpha=4, targets=["all-linear"], modules_to_save=["classifier"]),
    "three": LoraConfig(r=1, alpha=2, targets=["o", "mlp"]),  # no saved head: uses the base classifier
}


@pytest.fixture
def saved_bert(tiny, tmp_path):
    """Three BERT adapters saved to disk, and each single-adapter model's logits."""
    ids = tiny.ids()
    logits = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        model = tiny.bert()
        inject(model, cfg)
        tiny.randomize_lora(model, seed=10 + i)
        if cfg.modules_to_save:
            tiny.perturb_saved(model, seed=20 + i)
        logits[name] = tiny.logits(model, ids)
        save_adapter(model, tmp_path / name)
    return tmp_path, logits


def test_switching_between_loaded_adapters(tiny, saved_bert):
    path, single = saved_bert
    ids = tiny.ids()
    base = tiny.logits(tiny.bert(), ids)
    model = tiny.bert()
    for name in CONFIGS:
        load_adapter(model, path / name, name=name)
    assert adapter_names(model) == ["one", "two", "three"]
    assert active_adapter(model) == "three"  # the last one loaded
    for name in ["one", "two", "three", "two", "one", "three"]:
        set_active_adapter(model, name)
        assert active_adapter(model) == name
        tiny.assert_f32_close(tiny.logits(model, ids), single[name])
    scale = base.abs().max()  # BERT's tiny classifier gives logits of ~0.01
    for a in single:  # the adapters really differ from each other and from the base
        assert (single[a] - base).abs().max() > 0.05 * scale
    assert (single["one"] - single["two"]).abs().max() > 0.05 * scale


def test_load_without_activating(tiny, saved_bert):
    path, single = saved_bert
    ids = tiny.ids()
    model = tiny.bert()
    load_adapter(model, path / "one", name="one")
    load_adapter(model, path / "two", name="two", activate=False)
    assert active_adapter(model) == "one"
    tiny.assert_f32_close(tiny.logits(model, ids), single["one"])


def test_disable_gives_exact_base_output_and_enable_restores(tiny, saved_bert):
    path, single = saved_bert
    ids = tiny.ids()
    fresh = tiny.bert()
    base = tiny.logits(fresh, ids)
    model = tiny.bert()
    for name in CONFIGS:
        load_adapter(model, path / name, name=name)
    set_active_adapter(model, "two")
    disable_adapters(model)
    assert torch.equal(tiny.logits(model, ids), base)
    assert torch.equal(model.classifier.weight, fresh.classifier.weight)  # base head values are back
    assert torch.equal(model.classifier.bias, fresh.classifier.bias)
    enable_adapters(model)
    assert active_adapter(model) == "two"
    tiny.assert_f32_close(tiny.logits(model, ids), single["two"])
    with adapters_disabled(model):
        assert torch.equal(tiny.logits(model, ids), base)
    tiny.assert_f32_close(tiny.logits(model, ids), single["two"])
    # set_active_adapter re-enables.
    disable_adapters(model)
    set_active_adapter(model, "one")
    tiny.assert_f32_close(tiny.logits(model, ids), single["one"])


def test_adapters_disabled_restores_after_an_exception(tiny, saved_bert):
    path, single = saved_bert
    ids = tiny.ids()
    model = load_adapter(tiny.bert(), path / "one", name="one")
    with pytest.raises(RuntimeError, match="inside"), adapters_disabled(model):
        raise RuntimeError("inside")
    tiny.assert_f32_close(tiny.logits(model, ids), single["one"])


def test_trained_head_values_are_kept_per_adapter(tiny):
    """Training adapter 'a' (its head included), then switching to 'b' and back, keeps a's values."""
    ids = tiny.ids()
    model = tiny.bert()
    inject(model, CONFIGS["one"], name="a")
    inject(model, CONFIGS["two"], name="b")
    set_active_adapter(model, "a")
    lora_core.set_trainable(model, "a")
    tiny.randomize_lora(model, name="a")
    with torch.no_grad():
        model.classifier.weight.add_(1.0)  # "training" a's head in place
    a_out = tiny.logits(model, ids)
    a_head = model.classifier.weight.detach().clone()
    set_active_adapter(model, "b")
    assert torch.equal(model.classifier.weight, tiny.bert().classifier.weight)  # b's head starts at base
    with torch.no_grad():
        model.classifier.weight.sub_(1.0)
    set_active_adapter(model, "a")
    assert torch.equal(model.classifier.weight, a_head)
    assert torch.equal(tiny.logits(model, ids), a_out)


def layers_by_adapter(model) -> dict[str, list[str]]:
    """``{layer path: names of the adapters it holds}`` for every layer that carries LoRA."""
    return {p: list(m.lora) for p, m in model.named_modules() if hasattr(m, "lora")}


def test_delete_adapter(tiny, saved_bert, tmp_path):
    path, single = saved_bert
    ids = tiny.ids()
    base = tiny.logits(tiny.bert(), ids)
    model = tiny.bert()
    for name in CONFIGS:
        load_adapter(model, path / name, name=name)
    q, o = "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.output.dense"
    assert layers_by_adapter(model)[q] == ["one", "two"] and layers_by_adapter(model)[o] == ["two", "three"]
    set_active_adapter(model, "two")
    delete_adapter(model, "one")
    assert adapter_names(model) == ["two", "three"]
    assert active_adapter(model) == "two"
    tiny.assert_f32_close(tiny.logits(model, ids), single["two"])
    # Every layer holds exactly the remaining adapters that adapt it: "one" is gone, the others stay.
    expected = {p: [n for n in ("two", "three") if p in lora_core.adapter_info(model, n).paths]
                for n0 in ("two", "three") for p in lora_core.adapter_info(model, n0).paths}
    assert layers_by_adapter(model) == expected
    assert expected[q] == ["two"] and expected[o] == ["two", "three"]

    # Deleting the active adapter leaves none active: the base model's output (base classifier values too)...
    delete_adapter(model, "two")
    assert adapter_names(model) == ["three"]
    assert active_adapter(model) is None
    assert set(layers_by_adapter(model)) == set(lora_core.adapter_info(model, "three").paths)
    assert torch.equal(tiny.logits(model, ids), base)
    # ...calls that default to the active adapter say so, and nothing was activated behind the caller's back.
    for call in (lambda: lora_core.merge(model), lambda: save_adapter(model, tmp_path / "x"),
                 lambda: lora_core.set_trainable(model), lambda: lora_core.lora_weights(model)):
        with pytest.raises(LoraError, match="no adapter is active") as info:
            call()
        assert "set_active_adapter" in info.value.hint and "three" in info.value.hint
    assert active_adapter(model) is None and not (tmp_path / "x").exists()
    with pytest.raises(LoraError, match="no adapter named 'two'"):
        set_active_adapter(model, "two")
    set_active_adapter(model, "three")
    tiny.assert_f32_close(tiny.logits(model, ids), single["three"])

    delete_adapter(model, "three")
    assert adapter_names(model) == []
    assert active_adapter(model) is None
    assert tiny.lora_module_paths(model) == []
    assert torch.equal(tiny.logits(model, ids), base)
    assert list(model.state_dict()) == list(tiny.bert().state_dict())
    with pytest.raises(LoraError, match="this model has no LoRA adapter"):
        delete_adapter(model, "three")


def test_delete_then_reload_same_name(tiny, saved_bert):
    path, single = saved_bert
    ids = tiny.ids()
    model = tiny.bert()
    load_adapter(model, path / "one", name="x")
    delete_adapter(model, "x")
    load_adapter(model, path / "two", name="x")
    tiny.assert_f32_close(tiny.logits(model, ids), single["two"])


def test_unknown_adapter_names(tiny):
    model = tiny.llama()
    inject(model, LoraConfig(r=2, alpha=2, targets=["q"]))
    with pytest.raises(LoraError, match="no adapter named 'nope'") as info:
        set_active_adapter(model, "nope")
    assert "default" in info.value.hint
    with pytest.raises(LoraError, match="no adapter named 'nope'"):
        delete_adapter(model, "nope")
    with pytest.raises(LoraError, match="this model has no LoRA adapter"):
        disable_adapters(tiny.llama())


def test_each_adapter_has_its_own_trainable_set(tiny):
    model = tiny.llama()
    inject(model, LoraConfig(r=2, alpha=2, targets=["q"]), name="a")
    inject(model, LoraConfig(r=2, alpha=2, targets=["v"]), name="b")
    assert active_adapter(model) == "b"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".v_proj.lora.b." in n for n in trainable)
    lora_core.set_trainable(model, "a")
    assert active_adapter(model) == "a"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".q_proj.lora.a." in n for n in trainable)


def test_only_the_active_adapter_runs(tiny):
    ids = tiny.ids()
    model = tiny.llama()
    inject(model, LoraConfig(r=2, alpha=2, targets=["q"]), name="a")
    tiny.randomize_lora(model, name="a", seed=1)
    a_only = tiny.logits(model, ids)
    inject(model, LoraConfig(r=2, alpha=2, targets=["q"]), name="b")  # same layers, B = 0
    assert torch.equal(tiny.logits(model, ids), tiny.logits(tiny.llama(), ids))  # b active, a off
    set_active_adapter(model, "a")
    assert torch.equal(tiny.logits(model, ids), a_only)
