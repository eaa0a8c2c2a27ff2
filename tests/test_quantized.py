"""A quantized frozen base (``model.quantize: 4bit | 8bit``): bitsandbytes layers under lora_core's LoRA.

Everything runs on the CPU (bitsandbytes 0.49+ has a CPU backend) on the tiny llama and the tiny BERT of
conftest: the adapter files load in PEFT onto the same quantized base and give the same logits (measured:
bit-identical, both run the base layer's own forward and the LoRA branch in float32; asserted within
``PEFT_ATOL``); training after an evaluation still reaches every layer; a pack wraps quantized layers;
merging into a quantized layer is refused and ``dequantize`` merges into a 16-bit copy; a whole trial
completes and the export check reproduces its logged metric on the base loaded quantized the same way.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from support import argv, assert_user_error, tiny_sets
from torch import nn

import lora_core
from lora_core import LoraConfig, LoraError
from lora_core.dequantize import dequantize
from lora_core.model import lora_layers
from lora_core.packed import Pack
from lora_core.quantized import dequantized_weight, quant_kind

bnb = pytest.importorskip("bitsandbytes")

from sweeps.cli.main import main  # noqa: E402
from sweeps.config.trial import load_trial_config  # noqa: E402
from sweeps.export.verify import TOLERANCE, compare, evaluate, load_checked, write_merged  # noqa: E402
from sweeps.models import quantize as quantize_module  # noqa: E402
from sweeps.models.cache import BaseModelCache  # noqa: E402
from sweeps.models.load import load_model  # noqa: E402
from sweeps.training.trainer import run_trial  # noqa: E402

pytestmark = pytest.mark.usefixtures("isolated")  # hub offline, a private data cache, quiet progress bars

PEFT_ATOL = 1e-5   # PEFT vs lora_core logits on the same quantized base (measured: 0.0 for 4bit and 8bit)
TARGETS = ("q", "v", "o", "mlp")
BNB_CLASS = {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}
# The quantized model (4bit: bf16 compute; 8bit: int8 activations) vs its float32 dequantized copy.
DEQUANTIZED_ATOL = {"4bit": 0.02, "8bit": 0.02}  # measured 0.004 and 0.007 (logits ~0.5)


def _llama(folder: Path, quantize: str) -> nn.Module:
    return load_model(str(folder), "causal-lm", device="cpu", quantize=quantize).model  # type: ignore[arg-type]


def _tokens() -> torch.Tensor:
    return torch.randint(5, 900, (4, 12), generator=torch.Generator().manual_seed(3))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=ids).logits
    return out


@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_peft_loads_our_adapter_on_the_same_quantized_base(quantize: str, tiny_llama_dir: Path,
                                                           tmp_path: Path) -> None:
    from peft import PeftModel

    cache = BaseModelCache()
    loaded = cache.get(str(tiny_llama_dir), "causal-lm", device="cpu", quantize=quantize)  # type: ignore[arg-type]
    model = loaded.model
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == BNB_CLASS[quantize] and quant_kind(q_proj) == quantize
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32  # the head is not quantized
    if quantize == "4bit":
        assert q_proj.weight.quant_state.quant_type == "nf4" and q_proj.weight.quant_state.nested  # double quant
        assert q_proj.compute_dtype == torch.bfloat16

    lora_core.inject(model, LoraConfig(r=4, alpha=8, targets=TARGETS))
    params = lora_core.set_trainable(model)
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = _tokens()
    for step in range(4):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        if step == 3:  # after an evaluation (below): every A and B still gets a gradient through the 4-bit layers
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        opt.step()
        opt.zero_grad()
        if step == 1:
            _logits(model, ids)  # an evaluation between steps (bitsandbytes would repack its 4-bit weights here)
    ours = _logits(model, ids)
    lora_core.save_adapter(model, tmp_path / "adapter")

    base = cache.get(str(tiny_llama_dir), "causal-lm", device="cpu", quantize=quantize).model  # type: ignore[arg-type]
    assert (_logits(base, ids) - ours).abs().max() > 1e-3  # the adapter changed the model
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    peft_layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(peft_layer).__module__ == "peft.tuners.lora.bnb" and type(peft_layer).__name__ == BNB_CLASS[quantize]
    assert (_logits(peft_model, ids) - ours).abs().max() <= PEFT_ATOL

    again = lora_core.load_adapter(_llama(tiny_llama_dir, quantize), tmp_path / "adapter")
    assert torch.equal(_logits(again, ids), ours)


def test_a_pack_wraps_quantized_layers_and_its_slots_save_as_adapters(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model = _llama(tiny_llama_dir, "4bit")
    pack = Pack(model, 2, ["all-linear"], max_rank=4)
    pack.load(0, LoraConfig(r=2, alpha=4, targets=("q", "v")), seed=1)
    pack.load(1, LoraConfig(r=4, alpha=8, targets=("all-linear",)), seed=2)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for branch in pack.branches.values():
            branch.lora_B.copy_(torch.randn(branch.lora_B.shape, generator=gen) * 0.3 * (branch.lora_A != 0).any(-1)[:, None, :])
    ids = _tokens()
    model.eval()
    with torch.no_grad(), pack.batch([(0, 2), (1, 2)]):
        packed = model(input_ids=ids).logits
    for slot, rows in ((0, slice(0, 2)), (1, slice(2, 4))):
        pack.save_slot(slot, tmp_path / f"slot{slot}")
        alone = lora_core.load_adapter(_llama(tiny_llama_dir, "4bit"), tmp_path / f"slot{slot}")
        assert (_logits(alone, ids[rows]) - packed[rows]).abs().max() <= 1e-5


@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_merging_into_a_quantized_layer_is_refused_and_a_dequantized_copy_merges(quantize: str,
                                                                                tiny_llama_dir: Path) -> None:
    from safetensors.torch import load_file

    model = _llama(tiny_llama_dir, quantize)
    original = load_file(str(tiny_llama_dir / "model.safetensors"))
    lora_core.inject(model, LoraConfig(r=4, alpha=8, targets=TARGETS))
    with torch.no_grad():
        for w in lora_core.lora_weights(model).values():
            w.lora_B.normal_(0, 0.3)
    ids = _tokens()
    adapted = _logits(model, ids)
    with pytest.raises(LoraError, match=f"cannot merge an adapter into the {quantize} quantized layer"):
        lora_core.merge(model)
    with pytest.raises(LoraError, match="cannot merge"):
        lora_core.merge_and_unload(model)
    assert torch.equal(_logits(model, ids), adapted)  # refused before any layer changed

    # The dequantized weights are bitsandbytes' values: within the quantization step of the float32 originals.
    path = "model.layers.0.mlp.down_proj"
    w0 = original[f"{path}.weight"]
    deq = dequantized_weight(model.get_submodule(path))
    if quantize == "8bit":  # int8 rows times absmax/127: off by at most half a step per row
        absmax = w0.abs().amax(1, keepdim=True)
        assert ((deq - w0).abs() <= absmax / 254 + absmax * 2**-10).all()  # (+ float16 rounding before quantizing)
    else:  # NF4 in blocks of 64: off by at most ~14% of the block's absmax (the widest gap between NF4 levels)
        blocks = w0.reshape(-1, 64)
        assert ((deq.reshape(-1, 64) - blocks).abs() <= 0.15 * blocks.abs().amax(1, keepdim=True)).all()

    swapped = dequantize(model, torch.float32)  # (sweeps' export --merged asks for bfloat16)
    adapted_paths = set(lora_core.lora_weights(model))
    assert len(swapped) == 14 and len(adapted_paths) == 12  # k_proj is not a target
    assert all(type(model.get_submodule(p)).__name__ == ("LoraLinear" if p in adapted_paths else "Linear") for p in swapped)
    layer = model.get_submodule(path)
    assert layer.weight.dtype == torch.float32 and torch.equal(layer.weight, deq)
    before = _logits(model, ids)  # the dequantized copy, adapter unmerged: near the quantized model
    assert (before - adapted).abs().max() < DEQUANTIZED_ATOL[quantize]
    lora_core.merge_and_unload(model)
    assert not any(quant_kind(m) for m in model.modules()) and not lora_core.adapter_names(model)
    assert (_logits(model, ids) - before).abs().max() < 1e-5  # W0 + dW in float32


def test_modules_to_save_cannot_hold_a_quantized_layer(tiny_llama_dir: Path) -> None:
    model = _llama(tiny_llama_dir, "8bit")
    with pytest.raises(LoraError, match=re.escape("modules_to_save 'model.layers.1.mlp' holds the quantized layer "
                                                  "model.layers.1.mlp.gate_proj")):
        lora_core.inject(model, LoraConfig(r=2, alpha=4, targets=("q",), modules_to_save=("model.layers.1.mlp",)))
    assert not lora_core.adapter_names(model)


def _trial_sets(task: str, model_dir: Path, data: Path, home: Path, quantize: str) -> list[str]:
    if task == "classification":
        return tiny_sets(model_dir, data, home, f"model.quantize={quantize}", "train.steps=20")
    return [f"model.name={model_dir}", "model.task=causal-lm", "model.device=cpu", "data.name=null",
            f"data.files={data}", "data.prompt_template={prompt}\\nAnswer:", "data.max_length=32", "lora.r=4",
            "lora.alpha=8", "lora.targets=[q, v, o, mlp]", "train.steps=20", "train.batch_size=8", "train.lr=1e-2",
            "train.eval_every=10", "train.generate_samples=4", "train.max_new_tokens=4", f"tracking.home={home}",
            f"model.quantize={quantize}"]


@pytest.mark.parametrize(("task", "quantize"), [("causal-lm", "4bit"), ("classification", "4bit"),
                                                ("classification", "8bit")])
def test_a_quantized_trial_completes_and_the_export_check_reproduces_it(
        task: str, quantize: str, tiny_llama_dir: Path, copy_task: Path, tiny_model_dir: Path, tiny_data_file: Path,
        tmp_path: Path) -> None:
    model_dir, data_file = (tiny_llama_dir, copy_task) if task == "causal-lm" else (tiny_model_dir, tiny_data_file)
    cfg = load_trial_config(None, _trial_sets(task, model_dir, data_file, tmp_path / "home", quantize))
    assert cfg.model.quantize == quantize
    trial = run_trial(cfg)
    r = trial.result
    assert r.state == "COMPLETE", r.reason
    assert r.steps_done == 20 and len(r.history) == 2
    assert trial.loaded.quantize == quantize
    adapted = [m for _, m in lora_layers(trial.model)]
    assert adapted and all(quant_kind(m) == quantize for m in adapted)
    if task == "classification":
        assert type(trial.model.classifier) is nn.Linear and trial.model.classifier.weight.dtype == torch.float32
    lora_core.save_adapter(trial.model, tmp_path / "adapter")  # what the trial's run logs

    logged = {k: r.final_metrics[k] for k in ([r.objective, "eval_loss"] if task == "classification" else ["eval_loss"])}
    loaded, model = load_checked(cfg, trial.data, tmp_path / "adapter", "run", 0)  # the export's check
    assert loaded.quantize == quantize and quant_kind(model.get_submodule(next(iter(lora_core.lora_weights(model)))))
    reproduced = evaluate(model, trial.data, cfg, loaded.tokenizer, generate=False)
    lines: list[str] = []
    compare(reproduced, logged, 0, "adapter", lines.append)  # raises beyond TOLERANCE
    assert all(abs(reproduced[k] - v) <= TOLERANCE for k, v in logged.items())

    merged = write_merged(model, loaded, trial.data, cfg, tmp_path / "merged", logged, 0, False, lines.append)
    assert any(f"merging into a bfloat16 copy of the {quantize} base" in line for line in lines)
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in saved and saved["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    plain = auto.from_pretrained(tmp_path / "merged")
    assert not any(quant_kind(m) for m in plain.modules()) and not any("lora" in n for n, _ in plain.named_parameters())
    assert abs(merged["eval_loss"] - logged["eval_loss"]) < 0.05  # 16-bit, dequantized: close, not equal


def test_the_card_says_the_merged_model_is_a_dequantized_copy(tiny_model_dir: Path, tiny_data_file: Path,
                                                              tmp_path: Path) -> None:
    from optuna.distributions import IntDistribution
    from optuna.trial import create_trial

    from sweeps.config.sweep import load_sweep_config
    from sweeps.data.prepare import prepare_data
    from sweeps.export.card import model_card
    from sweeps.export.exporter import ExportResult
    from sweeps.models.load import load_tokenizer

    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps({"name": "q", "model": {"name": str(tiny_model_dir), "device": "cpu", "quantize": "4bit"},
                                "data": {"name": None, "files": str(tiny_data_file), "max_length": 32},
                                "tracking": {"home": str(tmp_path / "home")}, "search": {"rank": [2, 4]}}))
    config = load_sweep_config(path)
    cfg = config.base_trial()
    data = prepare_data(cfg.data, cfg.model.task, load_tokenizer(cfg.model.name), seed=0)
    frozen = create_trial(params={"r": 2}, distributions={"r": IntDistribution(2, 4)}, value=0.5)
    run = SimpleNamespace(data=SimpleNamespace(params={"version.torch": torch.__version__}),
                          info=SimpleNamespace(run_id="abc"))
    metrics = {"accuracy": 0.5, "eval_loss": 1.0}
    result = ExportResult(tmp_path / "out", 0, "abc", "accuracy", metrics, metrics, merged=tmp_path / "out" / "merged",
                          merged_metrics={"accuracy": 0.49, "eval_loss": 1.01}, merged_dtype="bfloat16")
    counts: dict[str, Any] = {"trainable": 10, "lora": 8, "saved": 2, "base": 1000, "fraction": 0.01,
                              "modules": ["a"], "saved_paths": ["classifier"]}
    card = model_card(config, cfg, frozen, run, data, counts, result, best=True, tracking="sqlite://", storage="journal")  # type: ignore[arg-type]
    assert "| base quantized | 4bit with bitsandbytes (NF4, double quantization, bf16 compute)" in card
    assert "is the 4bit base dequantized to bfloat16" in card and "reported, not checked" in card
    assert 'bnb_4bit_quant_type="nf4"' in card and 'quantize="4bit"' in card


def test_without_bitsandbytes_train_stops_with_one_line_and_the_install_hint(
        tiny_model_dir: Path, tiny_data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    real = quantize_module.importlib.util.find_spec
    monkeypatch.setattr(quantize_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(LoraError) as err:
        load_model(str(tiny_model_dir), "classification", num_labels=3, device="cpu", quantize="4bit")
    assert err.value.message == "model.quantize: 4bit needs bitsandbytes, which is not installed"
    assert err.value.hint == "pip install 'lora-sweep[quantize]'"
    home = tmp_path / "home"
    code = main(argv(tiny_sets(tiny_model_dir, tiny_data_file, home, "model.quantize=4bit")))
    assert_user_error(code, capsys.readouterr().err, "needs bitsandbytes")
    assert not (home / "mlflow.db").exists()  # refused before the MLflow run exists


def test_a_device_bitsandbytes_cannot_run_on_is_a_lora_error(tiny_model_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bnb, "supported_torch_devices", {"cuda"})
    with pytest.raises(LoraError, match="has no backend for the cpu device"):
        load_model(str(tiny_model_dir), "classification", num_labels=3, device="cpu", quantize="8bit")


def test_the_config_takes_none_4bit_or_8bit() -> None:
    assert load_trial_config(None, []).model.quantize == "none"
    assert load_trial_config(None, ["model.quantize=8bit"]).model.quantize == "8bit"
    with pytest.raises(LoraError, match=re.escape("model.quantize must be one of 'none' | '4bit' | '8bit', got '2bit'")):
        load_trial_config(None, ["model.quantize=2bit"])


def test_the_int8_cast_notice_is_dropped(tiny_llama_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = _llama(tiny_llama_dir, "8bit")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"):
        _logits(model, _tokens())
    assert not [r for r in caplog.records if "will be cast" in r.getMessage()]


def test_a_packed_sweep_trains_on_the_quantized_base(tiny_model_dir: Path, tiny_data_file: Path,
                                                     tmp_path: Path) -> None:
    """search.pack > 1: the pack's base is loaded quantized as a trial's is (else export could not
    reproduce its metric)."""
    from support import write_sweep

    from sweeps.config.sweep import load_sweep_config
    from sweeps.engine.loop import prepare_sweep_data
    from sweeps.engine.packing import make_trainer

    path = write_sweep(tmp_path, tiny_model_dir, tiny_data_file, tmp_path / "home", rank=[2, 4], pack=2)
    config = load_sweep_config(path, ["model.quantize=4bit"])
    trainer = make_trainer(config, prepare_sweep_data(config), BaseModelCache(), None)
    kinds = {quant_kind(m) for m in trainer.pack.model.modules() if isinstance(m, nn.Linear)}
    assert "4bit" in kinds
