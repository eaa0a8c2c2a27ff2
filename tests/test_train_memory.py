"""Fitting a trial into memory (sweeps.training.memory): gradient checkpointing gives the same training,
and a trial that runs out of device memory early starts again with half the micro-batch.

Through the real ``run_trial`` path: a LoRA trial is a pack of one (PackedTrainer), a head-only trial or
one on a fused q/k/v layer (GPT-2) trains alone (TrialSlot). Float32 on the CPU. The out-of-memory
error is injected: the model's forward raises ``torch.OutOfMemoryError`` in training when its batch
has more than a chosen number of rows.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers.modeling_utils
from support import tiny_sets
from torch import nn
from transformers import BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from lora_core import LoraConfig, LoraError
from lora_core.packed import Pack
from sweeps.config.trial import TrialConfig, load_trial_config
from sweeps.data.prepare import prepare_data
from sweeps.models.load import load_model, load_tokenizer
from sweeps.training.memory import is_checkpointing, loss_count, set_checkpointing, split_batch, summed_loss
from sweeps.training.trainer import run_trial

pytestmark = pytest.mark.usefixtures("isolated")

# Micro-batches against the whole batch in one forward (float32, dropout 0): the same rows and loss,
# other kernel shapes and padding widths. Measured: 2.4e-7 (BERT), 9.5e-7 (llama) over 20 steps' losses.
WHOLE = 1e-5


def _bert(model_dir: Path, data: Path, *extra: str) -> TrialConfig:
    """20 steps of the tiny BERT classifier, batch 16, evaluated at steps 10 and 20; LoRA dropout 0 (the
    model's own hidden dropout, 0.1, is on: a pack draws it per slot)."""
    return load_trial_config(None, tiny_sets(model_dir, data, None, "train.steps=20", "lora.targets=[q, k, v, o]",
                                             *extra))


def _llama(model_dir: Path, data: Path, *extra: str) -> TrialConfig:
    """20 steps of the tiny llama on the copy task, batch 8, all-linear r = 4."""
    sets = [f"model.name={model_dir}", "model.task=causal-lm", "model.device=cpu", "data.name=null",
            f"data.files={data}", "data.prompt_template={prompt}\\nAnswer:", "data.max_length=32", "lora.r=4",
            "lora.alpha=8", "lora.targets=[all-linear]", "train.steps=20", "train.batch_size=8", "train.lr=1e-2",
            "train.eval_every=10", "train.generate_samples=4", "train.max_new_tokens=3"]
    return load_trial_config(None, [*sets, *extra])


def _curve(config: TrialConfig) -> tuple[list[float], dict[str, float], Any]:
    result = run_trial(config).result
    assert result.state == "COMPLETE", result.reason
    return [loss for _, loss in result.train_curve], result.final_metrics, result


def _max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.fixture
def checkpoint_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The keyword arguments of every torch checkpoint call transformers makes."""
    calls: list[dict[str, Any]] = []
    original = transformers.modeling_utils.checkpoint

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting)
    return calls


@pytest.fixture(scope="module")
def tiny_bert_no_dropout_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT with its own dropout off (hidden and attention 0): micro-batches draw other dropout
    masks than the whole batch (other shapes, more forwards), so that comparison needs no dropout."""
    folder = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    for item in tiny_model_dir.iterdir():
        shutil.copy(item, folder / item.name)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT2LMHeadModel (fused c_attn: trained alone, with ordinary LoRA layers) with the smollm2 tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tok = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- gradient checkpointing

@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2-alone"])
def test_checkpointing_trains_the_same(kind: str, dropout: float, tiny_model_dir: Path, tiny_data_file: Path,
                                       tiny_llama_dir: Path, tiny_gpt2_dir: Path, copy_task: Path,
                                       checkpoint_calls: list[dict[str, Any]]) -> None:
    """The same loss curve and metrics, bit for bit, with and without gradient checkpointing, with LoRA
    dropout 0 and 0.1: a pack's masks (LoRA's, and BERT's own hidden dropout, keyed by the batch layout that
    Pack.recompute_context puts back) and an ordinary adapter's (torch's generator, whose state the
    checkpoint restores) are drawn again identically in the recompute. The BERT classifier head is a
    packed module (vmap); GPT-2's fused c_attn trains alone with ordinary LoRA layers."""
    if kind == "bert":
        config = _bert(tiny_model_dir, tiny_data_file, f"lora.dropout={dropout}")
    elif kind == "llama":
        config = _llama(tiny_llama_dir, copy_task, f"lora.dropout={dropout}")
    else:
        config = _llama(tiny_gpt2_dir, copy_task, f"lora.dropout={dropout}", "lora.targets=[q, v, mlp]",
                        "train.steps=10", "train.eval_every=5")
    plain, plain_metrics, _ = _curve(config)
    assert not checkpoint_calls
    config.train.gradient_checkpointing = True
    trial = run_trial(config)
    assert trial.result.state == "COMPLETE"
    layers = 2
    assert len(checkpoint_calls) == layers * config.train.steps  # one per layer per training forward
    assert all(c["use_reentrant"] is False for c in checkpoint_calls)
    assert ("context_fn" in checkpoint_calls[0]) is (kind != "gpt2-alone")  # a pack's layout for the recompute
    assert not is_checkpointing(trial.model)  # the returned model is as loaded
    curve = [loss for _, loss in trial.result.train_curve]
    assert plain[0] != plain[-1]
    assert curve == plain  # bit for bit (measured; the issue asks for 1e-5)
    assert trial.result.final_metrics == plain_metrics


def test_head_only_trial_with_checkpointing(tiny_model_dir: Path, tiny_data_file: Path,
                                            checkpoint_calls: list[dict[str, Any]]) -> None:
    """The head-only baseline (TrialSlot; the frozen encoder keeps nothing for a backward) trains the
    same with checkpointing on (BERT's dropout 0.1 from torch's generator)."""
    config = _bert(tiny_model_dir, tiny_data_file, "lora.enabled=false", "train.steps=10")
    plain, _, _ = _curve(config)
    config.train.gradient_checkpointing = True
    curve, _, _ = _curve(config)
    assert checkpoint_calls
    assert curve == plain


def test_a_model_without_checkpointing_is_a_clear_error(tiny_model_dir: Path, tiny_data_file: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(BertForSequenceClassification, "supports_gradient_checkpointing", False)
    config = _bert(tiny_model_dir, tiny_data_file, "train.gradient_checkpointing=true")
    with pytest.raises(LoraError) as info:
        run_trial(config)
    assert info.value.message == "BertForSequenceClassification does not support gradient checkpointing"
    assert "train.gradient_checkpointing: false" in (info.value.hint or "")
    with pytest.raises(LoraError, match="does not support gradient checkpointing"):
        set_checkpointing(nn.Linear(2, 2), True)
    set_checkpointing(nn.Linear(2, 2), False)  # off: nothing to do


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_pack_recompute_draws_the_same_masks(tiny, kind: str) -> None:
    """lora_core alone: a pack of two slots with LoRA dropout 0.3 and the base model's dropout replaced
    (per-slot masks), a saved module *inside* the checkpointed layers (a LayerNorm / RMSNorm: a packed
    module run with vmap), backward after the ``pack.batch`` block: checkpointed gradients equal the
    plain ones. Without Pack.recompute_context the recompute finds no layout, a clear error."""
    inner = "bert.encoder.layer.0.output.LayerNorm" if kind == "bert" else "model.layers.1.post_attention_layernorm"
    saved = (inner, "classifier") if kind == "bert" else (inner,)
    configs = [LoraConfig(r=4, alpha=8, targets=("all-linear",), dropout=0.3, modules_to_save=saved),
               LoraConfig(r=2, alpha=2, targets=("q", "v"), dropout=0.3, modules_to_save=saved)]

    def grads(checkpointing: bool, context: bool = True) -> list[torch.Tensor]:
        model = tiny.bert(seed=0) if kind == "bert" else tiny.llama(seed=0)
        pack = Pack(model, 2, ["all-linear"], max_rank=4, modules_to_save=saved)
        assert pack.replace_dropout() > 0 or kind == "llama"
        for slot, config in enumerate(configs):
            pack.load(slot, config, seed=slot, generator=torch.Generator().manual_seed(slot))
            with torch.no_grad():
                for branch in pack.branches.values():
                    branch.lora_B[slot].normal_(generator=torch.Generator().manual_seed(10 + slot))
        model.train()
        if checkpointing:
            set_checkpointing(model, True, context_fn=pack.recompute_context if context else None)
        ids = tiny.ids(batch=5, length=6)
        with pack.batch([(0, 3), (1, 2)]):
            logits = model(input_ids=ids).logits
        logits.float().pow(2).mean().backward()  # after the block: the recompute runs here
        return [p.grad.clone() for p in pack.parameters()]

    plain, again, checkpointed = grads(False), grads(False), grads(True)
    for a, b in zip(plain, again, strict=True):
        assert torch.equal(a, b)  # the masks are a function of the layout: the same twice
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    with pytest.raises(LoraError, match=r"outside `with pack\.batch"):
        grads(True, context=False)


# --------------------------------------------------------------------------- micro-batches

def test_the_micro_batch_split_keeps_the_token_mean_exact(tiny_llama_dir: Path, copy_task: Path) -> None:
    """Causal LM with right padding and different numbers of supervised tokens per row: the parts'
    summed losses over the whole batch's token count add up to the full batch's token-mean loss (to
    float rounding), while the mean of the parts' own means does not."""
    config = _llama(tiny_llama_dir, copy_task)
    data = prepare_data(config.data, "causal-lm", load_tokenizer(str(tiny_llama_dir)), seed=0)
    model = load_model(str(tiny_llama_dir), "causal-lm", dtype="float32", device="cpu").model.eval()
    rows = sorted(data.train[:6], key=lambda r: len(r["input_ids"]))  # lengths differ: padding
    rows[0] = {**rows[0], "labels": [-100] * (len(rows[0]["labels"]) - 1) + rows[0]["labels"][-1:]}  # 1 token
    assert len({loss_count([r], "causal-lm") for r in rows}) > 1

    def mean_loss(part: list[dict[str, Any]]) -> torch.Tensor:
        batch = data.collate(part)
        labels = batch.pop("labels")
        return summed_loss(model(**batch).logits, labels, "causal-lm") / loss_count(part, "causal-lm")

    with torch.no_grad():
        full = model(**data.collate(rows)).loss  # the model's own token mean over the whole batch
        assert float(mean_loss(rows)) == pytest.approx(float(full), abs=1e-6)
        parts = split_batch(rows, 4)
        assert [len(p) for p in parts] == [4, 2]
        count = loss_count(rows, "causal-lm")
        split = sum(summed_loss(model(**{k: v for k, v in data.collate(p).items() if k != "labels"}).logits,
                                data.collate(p)["labels"], "causal-lm") for p in parts) / count
        means = sum(mean_loss(p) for p in parts) / len(parts)
    assert float(split) == pytest.approx(float(full), abs=1e-6)
    assert abs(float(means) - float(full)) > 1e-3  # why the parts' means are not averaged


@pytest.fixture
def oom_above(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """``oom_above["rows"] = K``: a training forward (grad on, training mode) over more than K rows of
    BERT or llama raises torch.OutOfMemoryError; ``oom_above["after_step"] = S`` only from the S-th
    training forward on. Records the row counts of the training forwards."""
    setting: dict[str, Any] = {"rows": None, "after_step": 0, "seen": []}

    def patch(cls: type[nn.Module]) -> None:
        forward = cls.forward

        def guarded(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if self.training and torch.is_grad_enabled() and ids is not None:
                setting["seen"].append(ids.shape[0])
                limit = setting["rows"]
                if limit is not None and ids.shape[0] > limit and len(setting["seen"]) > setting["after_step"]:
                    raise torch.OutOfMemoryError(f"CUDA out of memory (injected: {ids.shape[0]} rows)")
            return forward(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", guarded)

    patch(BertForSequenceClassification)
    patch(LlamaForCausalLM)
    yield setting


@pytest.mark.parametrize("kind", ["bert", "llama", "bert-head-only"])
def test_out_of_memory_halves_the_micro_batch(kind: str, tiny_bert_no_dropout_dir: Path, tiny_data_file: Path,
                                              tiny_llama_dir: Path, copy_task: Path, oom_above: dict[str, Any],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Batches over 5 rows do not fit: batch 16 (BERT) restarts at 8, then trains at 4; batch 8 (llama)
    trains at 4. The trial completes with ``micro_batch_size`` 4 (a summary metric), one printed line per
    halving, and the loss curve of the same trial run with micro-batch 4 directly (bit for bit); against
    the whole batch in one forward, within WHOLE."""
    if kind == "llama":
        config = _llama(tiny_llama_dir, copy_task)
    else:
        config = _bert(tiny_bert_no_dropout_dir, tiny_data_file, *(["lora.enabled=false", "train.lr=5e-2"]
                                                                   if kind == "bert-head-only" else []))
    whole, whole_metrics, _ = _curve(config)
    oom_above["rows"] = 5
    oom_above["seen"].clear()
    retried, metrics, result = _curve(config)
    assert result.micro_batch_size == 4 and result.summary()["micro_batch_size"] == 4
    halvings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("out of device memory")]
    start = config.train.batch_size
    assert [line.split("micro-batch ")[1].split(":")[0] for line in halvings] == \
        [str(start >> i) for i in range(len(halvings))]
    assert halvings[-1].endswith(f"with micro-batch 4 ({start // 4} per batch of {start})")
    assert set(oom_above["seen"][-8:]) == {4}
    config.train.micro_batch_size = 4
    oom_above["rows"] = None
    direct, direct_metrics, direct_result = _curve(config)
    assert direct_result.micro_batch_size == 4
    assert retried == direct  # bit for bit: the restart rebuilt everything from the seed
    assert metrics == direct_metrics
    assert _max_diff(retried, whole) <= WHOLE, (retried, whole)
    # perplexity is exp(eval_loss): an absolute difference in the loss is a relative one in it
    assert {k: v for k, v in metrics.items() if k != "perplexity"} == \
        pytest.approx({k: v for k, v in whole_metrics.items() if k != "perplexity"}, abs=WHOLE)
    assert metrics.get("perplexity", 0.0) == pytest.approx(whole_metrics.get("perplexity", 0.0), rel=WHOLE)


def test_out_of_memory_at_one_row_or_after_an_evaluation_fails_clearly(
        tiny_model_dir: Path, tiny_data_file: Path, oom_above: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    config = _bert(tiny_model_dir, tiny_data_file)
    oom_above["rows"] = 0  # nothing fits
    with pytest.raises(LoraError) as info:
        run_trial(config)
    assert info.value.message.startswith("out of device memory at micro-batch 1: one row of train.batch_size 16")
    assert "gradient_checkpointing" in (info.value.hint or "")
    assert len([ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("out of device memory")]) == 4
    oom_above.update(rows=8, after_step=12)  # step 13 (after the evaluation at step 10) needs more memory
    oom_above["seen"].clear()
    with pytest.raises(LoraError) as info:
        run_trial(config)
    assert info.value.message.startswith("out of device memory in training step 13 at micro-batch 16, after "
                                         "the trial's first evaluation")
    assert "train.micro_batch_size: 8" in (info.value.hint or "")


def test_micro_batch_config() -> None:
    base = ["model.device=cpu"]
    assert load_trial_config(None, base).train.micro_batch_size is None
    assert load_trial_config(None, [*base, "train.micro_batch_size=64"]).train.micro_batch_size == 64  # > batch: all
    with pytest.raises(LoraError, match=r"train\.micro_batch_size must be >= 1"):
        load_trial_config(None, [*base, "train.micro_batch_size=0"])
    with pytest.raises(LoraError, match=r"train\.gradient_checkpointing must be true or false"):
        load_trial_config(None, [*base, "train.gradient_checkpointing=sometimes"])
