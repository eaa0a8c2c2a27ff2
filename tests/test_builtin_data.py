"""Tests for the built-in, download-free datasets made from standard-library docstrings."""

from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from datasets import ClassLabel, DatasetDict

from lora_core import LoraError
from sweeps import builtin_data as bd

# Imports every walked module first, in reverse order, then builds: the result must not depend on
# import order, on the hash seed, or on running under pytest (which replaces pdb.set_trace).
_FINGERPRINT_CODE = """
import hashlib, importlib, warnings
warnings.simplefilter("ignore")
from sweeps import builtin_data as bd
for name in sorted(bd.MODULE_AREAS, reverse=True):
    try:
        importlib.import_module(name)
    except ImportError:
        pass
print(hashlib.sha256(repr((bd.topic_examples(), bd.name_examples())).encode()).hexdigest())
"""


def _fingerprint() -> str:
    return hashlib.sha256(repr((bd.topic_examples(), bd.name_examples())).encode()).hexdigest()


def _resolve(qualname: str) -> Any:
    """Import the longest importable module prefix of ``qualname``, then getattr the rest."""
    parts = qualname.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise AssertionError(f"no importable prefix in {qualname!r}")


@pytest.fixture(scope="module")
def topics() -> DatasetDict:
    return bd.load_builtin_dataset("pydoc-topics", seed=0)


@pytest.fixture(scope="module")
def names() -> DatasetDict:
    return bd.load_builtin_dataset("pydoc-names", seed=0)


# --- registry and errors -------------------------------------------------------------------------


def test_dataset_names() -> None:
    assert bd.builtin_dataset_names() == ("pydoc-topics", "pydoc-names")


@pytest.mark.parametrize("call", [bd.load_builtin_dataset, bd.describe])
def test_unknown_name_lists_valid_names(call: Any) -> None:
    with pytest.raises(LoraError) as info:
        call("pydoc-nope")
    assert "pydoc-nope" in info.value.message
    assert info.value.hint is not None
    for name in bd.builtin_dataset_names():
        assert name in info.value.hint


# --- the area table --------------------------------------------------------------------------------


def test_module_area_table_is_consistent() -> None:
    assert set(bd.MODULE_AREAS.values()) == set(bd.TOPIC_LABELS)
    listed = [module for modules in bd._AREA_MODULES.values() for module in modules]
    assert len(listed) == len(set(listed)) == len(bd.MODULE_AREAS)  # no module in two areas
    for unsafe in ("this", "antigravity", "idlelib", "turtledemo", "readline", "tkinter"):
        assert unsafe not in bd.MODULE_AREAS


# --- cleaning --------------------------------------------------------------------------------------


def test_clean_docstring_strips_signatures_and_short_texts() -> None:
    doc = "sin(x) -> float\n\n    Return the sine of x (measured in radians), as a float value.\n"
    assert bd.clean_docstring(doc, 600) == "Return the sine of x (measured in radians), as a float value."
    assert bd.clean_docstring("Point(x, y)", 600) is None
    assert bd.clean_docstring("Too short.", 600) is None
    assert bd.clean_docstring(None, 600) is None


def test_clean_docstring_keeps_whole_paragraphs_then_cuts_at_a_word() -> None:
    first = "First paragraph, long enough to pass the minimum length filter."
    second = "Second paragraph " + "word " * 30
    assert bd.clean_docstring(f"{first}\n\n{second}", 100) == first
    assert bd.clean_docstring(f"{first}\n\n{second}", 1000) == f"{first}\n\n{second.rstrip()}"
    cut = bd.clean_docstring("alpha " * 40, 50)
    assert cut is not None and len(cut) <= 50 and cut.endswith("alpha")


# --- pydoc-topics ----------------------------------------------------------------------------------


def test_topics_size_and_balance() -> None:
    summary = bd.describe("pydoc-topics")
    assert summary.size >= 1500
    assert summary.majority_rate is not None and summary.majority_rate < 0.4
    assert summary.label_names == bd.TOPIC_LABELS
    assert summary.label_counts is not None and sum(summary.label_counts.values()) == summary.size
    for area, count in summary.label_counts.items():
        assert count >= 75, f"area {area} has only {count} examples"


def test_topics_features_and_stratified_splits(topics: DatasetDict) -> None:
    assert list(topics) == ["train", "validation", "test"]
    label = topics["train"].features["label"]
    assert isinstance(label, ClassLabel) and tuple(label.names) == bd.TOPIC_LABELS
    total = sum(topics[split].num_rows for split in topics)
    assert total == len(bd.topic_examples())
    assert topics["train"].num_rows == pytest.approx(0.8 * total, abs=len(bd.TOPIC_LABELS))
    for split in ("validation", "test"):
        counts = Counter(topics[split]["label"])
        assert set(counts) == set(range(len(bd.TOPIC_LABELS))), f"{split} misses a label"


def test_topics_texts_unique_and_single_labelled(topics: DatasetDict) -> None:
    examples = bd.topic_examples()
    texts = [text for _, text, _ in examples]
    assert len(texts) == len(set(texts))
    qualnames = [q for q, _, _ in examples]
    assert qualnames == sorted(qualnames)
    seen: set[str] = set()
    for split in topics:
        split_texts = set(topics[split]["text"])
        assert not split_texts & seen, f"{split} shares texts with another split"
        seen |= split_texts
    assert all(len(text) <= bd.TOPICS_MAX_CHARS for text in texts)


def test_topics_split_is_a_function_of_the_seed(topics: DatasetDict) -> None:
    again = bd.load_builtin_dataset("pydoc-topics", seed=0)
    other = bd.load_builtin_dataset("pydoc-topics", seed=1)
    for split in topics:
        assert again[split].to_dict() == topics[split].to_dict()
    assert list(other["test"]["text"]) != list(topics["test"]["text"])
    assert sorted(text for split in other for text in other[split]["text"]) == sorted(
        text for split in topics for text in topics[split]["text"]
    )


# --- pydoc-names -----------------------------------------------------------------------------------


def test_names_size_columns_and_disjoint_splits(names: DatasetDict) -> None:
    summary = bd.describe("pydoc-names")
    assert summary.size >= 2000 and summary.task == "causal-lm"
    assert set(names["train"].column_names) == {"prompt", "completion"}
    assert sum(names[split].num_rows for split in names) == summary.size
    seen_prompts: set[str] = set()
    seen_names: set[str] = set()
    for split in names:
        prompts, completions = set(names[split]["prompt"]), set(names[split]["completion"])
        assert len(prompts) == names[split].num_rows == len(completions)
        assert not prompts & seen_prompts and not completions & seen_names
        seen_prompts |= prompts
        seen_names |= completions
    other = bd.load_builtin_dataset("pydoc-names", seed=1)
    assert list(other["test"]["completion"]) != list(names["test"]["completion"])
    assert bd.load_builtin_dataset("pydoc-names", seed=0)["test"].to_dict() == names["test"].to_dict()


def test_names_completions_resolve_to_their_docstrings() -> None:
    pairs = bd.name_examples()
    for prompt, qualname in pairs:
        obj = _resolve(qualname)
        assert bd.clean_docstring(obj.__doc__, bd.NAMES_MAX_CHARS) == prompt, qualname
    known = {completion for _, completion in pairs}
    assert {"math.acos", "collections.OrderedDict.move_to_end"} <= known


def test_names_prompt_template_formats() -> None:
    prompt, completion = bd.name_examples()[0]
    rendered = bd.NAMES_PROMPT_TEMPLATE.format(prompt=prompt)
    assert rendered == f"{prompt}\nName:"
    assert completion and " " not in completion


# --- determinism and hygiene -------------------------------------------------------------------------


def test_rebuild_is_identical_and_starts_no_threads() -> None:
    threads_before = threading.active_count()
    bytecode_flag = sys.dont_write_bytecode
    first = bd.collect_docstrings.__wrapped__()
    second = bd.collect_docstrings.__wrapped__()
    assert first == second == bd.collect_docstrings()
    assert threading.active_count() == threads_before
    assert sys.dont_write_bytecode is bytecode_flag  # restored after the build


def test_fresh_interpreter_builds_the_same_examples() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _FINGERPRINT_CODE],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.stdout.strip() == _fingerprint()
