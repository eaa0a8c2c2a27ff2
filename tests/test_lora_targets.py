"""Target resolution: presets per architecture family, exact paths, suffixes, regexes, and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_core import LoraConfig, LoraError, adapter_info, inject
from lora_core.targets import family_of, resolve_targets

LLAMA_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")


def llama_paths(*names: str, layers: int = 2) -> list[str]:
    """Paths in model order (layer by layer, then the module order of the layer)."""
    order = {n: i for i, n in enumerate(LLAMA_ATTN + LLAMA_MLP)}
    out = []
    for layer in range(layers):
        for n in sorted(names, key=order.__getitem__):
            part = "self_attn" if n in LLAMA_ATTN else "mlp"
            out.append(f"model.layers.{layer}.{part}.{n}")
    return out


def paths(model: nn.Module, targets, modules_to_save=()) -> list[str]:
    return [s.path for s in resolve_targets(model, targets, modules_to_save)]


@pytest.mark.parametrize(
    ("targets", "names"),
    [
        (["q"], ("q_proj",)),
        (["k"], ("k_proj",)),
        (["v"], ("v_proj",)),
        (["o"], ("o_proj",)),
        (["q", "v"], ("q_proj", "v_proj")),
        (["attn"], LLAMA_ATTN),
        (["mlp"], LLAMA_MLP),
        (["all-linear"], LLAMA_ATTN + LLAMA_MLP),
        (["attn", "mlp"], LLAMA_ATTN + LLAMA_MLP),
    ],
)
def test_llama_presets(tiny, targets, names):
    model = tiny.llama()
    assert family_of(model).name == "llama"
    assert paths(model, targets) == llama_paths(*names)
    assert all(s.rows is None for s in resolve_targets(model, targets))


def test_llama_all_linear_excludes_lm_head(tiny):
    model = tiny.llama()
    assert "lm_head" not in paths(model, ["all-linear"])
    assert len(paths(model, ["all-linear"])) == 14


BERT_LAYER = "bert.encoder.layer.0."


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (["q"], [BERT_LAYER + "attention.self.query"]),
        (["k"], [BERT_LAYER + "attention.self.key"]),
        (["v"], [BERT_LAYER + "attention.self.value"]),
        (["o"], [BERT_LAYER + "attention.output.dense"]),
        (["mlp"], [BERT_LAYER + "intermediate.dense", BERT_LAYER + "output.dense"]),
        (["attn"], [BERT_LAYER + f"attention.{m}" for m in ("self.query", "self.key", "self.value", "output.dense")]),
        (["all-linear"], [BERT_LAYER + f"attention.{m}" for m in ("self.query", "self.key", "self.value", "output.dense")]
         + [BERT_LAYER + "intermediate.dense", BERT_LAYER + "output.dense", "bert.pooler.dense"]),
    ],
)
def test_bert_presets(tiny, targets, expected):
    model = tiny.bert()
    assert family_of(model).name == "bert"
    assert paths(model, targets) == expected


def test_bert_all_linear_never_includes_classifier(tiny):
    model = tiny.bert()
    assert "classifier" not in paths(model, ["all-linear"])
    assert "classifier" not in paths(model, ["all-linear"], modules_to_save=["classifier"])
    # Named explicitly, the classifier can be adapted.
    assert paths(model, ["classifier"]) == ["classifier"]


def test_bert_modules_to_save_is_never_a_lora_target(tiny):
    model = tiny.bert()
    inject(model, LoraConfig(r=2, alpha=2, targets=["all-linear", "classifier"], modules_to_save=["classifier"]))
    assert "classifier" not in adapter_info(model).paths
    assert adapter_info(model).saved_paths == ["classifier"]


GPT2_H = "transformer.h.{}."


@pytest.mark.parametrize(
    ("targets", "expected", "roles"),
    [
        (["q"], ["attn.c_attn"], ("q",)),
        (["k"], ["attn.c_attn"], ("k",)),
        (["q", "v"], ["attn.c_attn"], ("q", "v")),
        (["v", "q"], ["attn.c_attn"], ("q", "v")),  # roles always in q, k, v order
        (["attn"], ["attn.c_attn", "attn.c_proj"], ("q", "k", "v")),
        (["o"], ["attn.c_proj"], None),
        (["mlp"], ["mlp.c_fc", "mlp.c_proj"], None),
        (["all-linear"], ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"], None),
        (["c_attn"], ["attn.c_attn"], None),  # by name: the whole fused layer
        (["q", "c_attn"], ["attn.c_attn"], None),  # whole wins over slices
    ],
)
def test_gpt2_presets(tiny, targets, expected, roles):
    model = tiny.gpt2()
    assert family_of(model).name == "gpt2"
    sites = resolve_targets(model, targets)
    assert [s.path for s in sites] == [GPT2_H.format(i) + e for i in range(2) for e in expected]
    c_attn = [s for s in sites if s.path.endswith("c_attn")]
    for site in c_attn:
        if roles is None:
            assert site.rows is None
        else:
            assert site.roles == roles
            for role in roles:
                start = "qkv".index(role) * 16
                assert torch.equal(site.rows[role], torch.arange(start, start + 16))


def test_gpt2_all_linear_excludes_tied_lm_head(tiny):
    model = tiny.gpt2()
    assert "lm_head" not in paths(model, ["all-linear"])
    assert paths(model, ["lm_head"]) == ["lm_head"]


def test_neox_and_phi3_presets(tiny):
    neox = tiny.neox()
    assert family_of(neox).name == "gpt_neox"
    base = "gpt_neox.layers.0."
    assert paths(neox, ["o"]) == [base + "attention.dense"]
    assert paths(neox, ["mlp"]) == [base + "mlp.dense_h_to_4h", base + "mlp.dense_4h_to_h"]
    assert paths(neox, ["all-linear"]) == [base + m for m in ("attention.query_key_value", "attention.dense",
                                                               "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")]
    phi3 = tiny.phi3()
    assert family_of(phi3).name == "phi3"
    assert paths(phi3, ["attn"]) == ["model.layers.0.self_attn.o_proj", "model.layers.0.self_attn.qkv_proj"]
    assert paths(phi3, ["mlp"]) == ["model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj"]


def test_exact_path_suffix_and_regex_targets(tiny):
    model = tiny.llama()
    assert paths(model, ["model.layers.1.self_attn.q_proj"]) == ["model.layers.1.self_attn.q_proj"]
    assert paths(model, ["layers.0.mlp.down_proj"]) == ["model.layers.0.mlp.down_proj"]
    assert paths(model, ["q_proj"]) == llama_paths("q_proj")
    assert paths(model, ["self_attn.o_proj"]) == llama_paths("o_proj")
    assert paths(model, [r"re:.*layers\.1\.self_attn\.(q|k)_proj"]) == ["model.layers.1.self_attn.q_proj",
                                                                       "model.layers.1.self_attn.k_proj"]
    assert paths(model, [r"re:.*_proj"]) == llama_paths(*LLAMA_ATTN, *LLAMA_MLP)  # never lm_head
    # Targets combine as a union, without duplicates, in model order.
    assert paths(model, ["v_proj", "q", "model.layers.0.self_attn.q_proj"]) == llama_paths("q_proj", "v_proj")


def test_suffix_must_match_whole_dotted_names(tiny):
    model = tiny.llama()
    with pytest.raises(LoraError, match="target 'proj' matches no linear layer"):
        paths(model, ["proj"])


def test_target_matching_nothing_lists_linear_layers(tiny):
    model = tiny.llama()
    with pytest.raises(LoraError) as info:
        inject(model, LoraConfig(r=2, alpha=2, targets=["q", "query_proj"]))
    err = info.value
    assert err.message == "target 'query_proj' matches no linear layer of this model"
    for name in ("model.layers.*.self_attn.q_proj", "model.layers.*.mlp.down_proj", "lm_head"):
        assert name in err.hint
    # The failed inject left nothing behind.
    assert not any(".lora." in n for n, _ in model.named_parameters())


def test_embedding_is_not_a_linear_target(tiny):
    with pytest.raises(LoraError, match="'embed_tokens' matches no linear layer"):
        paths(tiny.llama(), ["embed_tokens"])


class Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(8, 8)
        self.decoder = nn.Linear(8, 8)


@pytest.mark.parametrize("preset", ["q", "v", "attn", "mlp"])
def test_preset_on_unknown_model_is_an_error(preset):
    model = Unknown()
    assert family_of(model) is None
    with pytest.raises(LoraError) as info:
        resolve_targets(model, [preset])
    assert info.value.message == f"preset {preset!r} is not defined for this model (model_type=None)"
    assert "encoder" in info.value.hint and "decoder" in info.value.hint


def test_unknown_model_by_name_and_all_linear():
    model = Unknown()
    assert paths(model, ["all-linear"]) == ["encoder", "decoder"]
    assert paths(model, ["decoder"]) == ["decoder"]


def test_family_by_layer_names_when_model_type_unknown(tiny):
    model = tiny.llama()
    model.config.model_type = "my-llama-clone"
    assert family_of(model).name == "llama"
    assert paths(model, ["q"]) == llama_paths("q_proj")
