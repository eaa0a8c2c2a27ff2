"""LoraConfig validation: every bad value is a LoraError (a ValueError) whose message names the field."""

from __future__ import annotations

import math

import pytest

from lora_core import LoraConfig, LoraError
from lora_core.config import pattern_matches, scaling


def make(**overrides):
    kwargs = {"r": 4, "alpha": 8, "targets": ["q", "v"]}
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def test_lora_error_is_value_error_with_hint():
    assert issubclass(LoraError, ValueError)
    err = LoraError("bad thing", hint="do this")
    assert err.message == "bad thing" and err.hint == "do this"
    assert str(err) == "bad thing\n  hint: do this"


@pytest.mark.parametrize("r", [0, -1, 2.5, True, False, "4", None])
def test_rank_must_be_positive_int(r):
    with pytest.raises(LoraError, match=r"^r must be an integer >= 1"):
        make(r=r)


@pytest.mark.parametrize("alpha", [0, -1, -0.5, math.nan, math.inf, -math.inf, True, "16", None])
def test_alpha_must_be_positive_finite(alpha):
    with pytest.raises(LoraError, match=r"^alpha must be a positive number"):
        make(alpha=alpha)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, math.nan, True, "0.1", None])
def test_dropout_range(dropout):
    with pytest.raises(LoraError, match=r"^dropout must be"):
        make(dropout=dropout)


@pytest.mark.parametrize("dropout", [0, 0.0, 0.05, 0.999])
def test_dropout_accepted(dropout):
    assert make(dropout=dropout).dropout == float(dropout)


@pytest.mark.parametrize("targets", ["", " , ", [], (), ["", "  "]])
def test_targets_must_be_nonempty(targets):
    with pytest.raises(LoraError, match=r"^targets is empty"):
        make(targets=targets)


@pytest.mark.parametrize("targets", [5, [1, 2], ["q", None]])
def test_targets_must_be_strings(targets):
    with pytest.raises(LoraError, match=r"^targets must"):
        make(targets=targets)


def test_comma_separated_targets_are_split_and_stripped():
    assert make(targets="q, v,,o ").targets == ("q", "v", "o")
    assert make(targets=["q_proj", " v_proj "]).targets == ("q_proj", "v_proj")
    assert make(modules_to_save="classifier, score").modules_to_save == ("classifier", "score")


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_init_accepted(init):
    assert make(init=init).init == init


@pytest.mark.parametrize("init", ["xavier", "", "Kaiming", None])
def test_init_rejected(init):
    with pytest.raises(LoraError, match=r"^init must be one of kaiming, gaussian"):
        make(init=init)


def test_rslora_must_be_bool():
    with pytest.raises(LoraError, match=r"^rslora must be"):
        make(rslora=1)


@pytest.mark.parametrize("value", [0, -2, 1.5, True])
def test_rank_pattern_values_validated(value):
    with pytest.raises(LoraError, match=r"^rank_pattern\['q_proj'\] must be an integer >= 1"):
        make(rank_pattern={"q_proj": value})


@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf])
def test_alpha_pattern_values_validated(value):
    with pytest.raises(LoraError, match=r"^alpha_pattern\['v_proj'\] must be a positive number"):
        make(alpha_pattern={"v_proj": value})


def test_config_is_frozen():
    cfg = make()
    with pytest.raises(AttributeError):
        cfg.r = 8  # type: ignore[misc]


def test_scaling_alpha_over_r_and_rslora():
    assert make(r=4, alpha=8).scaling_for("x.q_proj") == 2.0
    assert make(r=4, alpha=8, rslora=True).scaling_for("x.q_proj") == 4.0
    assert scaling(16, 8.0, False) == 0.5
    assert scaling(16, 8.0, True) == 2.0


def test_rank_and_alpha_patterns_override_per_module():
    cfg = make(r=4, alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={r"re:.*layers\.1\..*v_proj": 32})
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert cfg.rank_for("model.layers.0.self_attn.v_proj") == 4
    assert cfg.alpha_for("model.layers.1.self_attn.v_proj") == 32.0
    assert cfg.alpha_for("model.layers.0.self_attn.v_proj") == 8.0
    assert cfg.scaling_for("model.layers.0.self_attn.q_proj") == 4.0  # 8 / 2
    assert cfg.scaling_for("model.layers.1.self_attn.v_proj") == 8.0  # 32 / 4


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("q_proj", "model.layers.0.self_attn.q_proj", True),
        ("self_attn.q_proj", "model.layers.0.self_attn.q_proj", True),
        ("layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", False),
        ("proj", "model.layers.0.self_attn.q_proj", False),  # suffixes are whole dotted names
        ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj", True),
        (r"re:.*layers\.[01]\.self_attn\.(q|v)_proj", "model.layers.1.self_attn.v_proj", True),
        (r"re:.*layers\.[01]\.self_attn\.(q|v)_proj", "model.layers.1.self_attn.k_proj", False),
        (r".*\.q_proj", "model.layers.0.self_attn.q_proj", True),  # regex characters -> regex
        ("[", "model.layers.0.self_attn.q_proj", False),  # a broken regex matches nothing
    ],
)
def test_pattern_matches(pattern, path, expected):
    assert pattern_matches(pattern, path) is expected


def test_dict_round_trip_and_unknown_keys():
    cfg = make(r=2, alpha=3, dropout=0.1, init="gaussian", rslora=True, modules_to_save=["classifier"],
               rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 6})
    again = LoraConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(LoraError, match=r"unknown LoRA config key\(s\): lora_alpha"):
        LoraConfig.from_dict({**cfg.to_dict(), "lora_alpha": 3})


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
@pytest.mark.parametrize("bad", [{1: 2}, {"": 2}, {None: 2}])
def test_pattern_keys_validated(field, bad):
    with pytest.raises(LoraError, match=rf"^{field} keys must be module names or patterns"):
        make(**{field: bad})


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_patterns_must_be_mappings(field):
    with pytest.raises(LoraError, match=rf"^{field} must be a mapping"):
        make(**{field: [("q_proj", 2)]})
