"""Tests for the built-in, download-free datasets made from standard-library docstrings."""

from __future__ import annotations

import hashlib
import json
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
from sweeps.data import builtin as bd
from sweeps.data import docstrings as dc
from sweeps.data import stdlib_docs

_REPO = Path(__file__).resolve().parents[1]

# Imports every walked module first, in reverse order, then builds: the result must not depend on
# import order, on the hash seed, or on running under pytest (which replaces pdb.set_trace).
_FINGERPRINT_CODE = """
import hashlib, importlib, warnings
warnings.simplefilter("ignore")
from sweeps.data import builtin as bd
from sweeps.data import stdlib_docs
for name in sorted(bd.MODULE_AREAS, reverse=True):
    try:
        importlib.import_module(name)
    except ImportError:
        pass
print(hashlib.sha256(repr((bd.topic_examples(), bd.name_examples())).encode()).hexdigest())
"""

# Builds in a new process, optionally with the collector disabled (it must then come from the disk cache).
_CACHED_BUILD_CODE = """
import hashlib, sys
from sweeps.data import builtin as bd
from sweeps.data import docstrings as dc
if sys.argv[1] == "no-collector":
    def _refuse():
        raise SystemExit("the collector was started although the disk cache should have been used")
    dc._run_collector = _refuse
print(hashlib.sha256(repr((bd.topic_examples(), bd.name_examples())).encode()).hexdigest())
"""

# Run in a clean interpreter (-I -S): each qualified name resolved to its object's raw docstring.
_RESOLVE_CODE = """
import importlib, json, sys
def resolve(qualname):
    parts = qualname.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise AssertionError("no importable prefix in " + qualname)
print(json.dumps({q: resolve(q).__doc__ for q in json.load(sys.stdin)}))
"""


def _fingerprint() -> str:
    return hashlib.sha256(repr((bd.topic_examples(), bd.name_examples())).encode()).hexdigest()


def _fresh_build(cache: Path, mode: str = "collect") -> str:
    """Fingerprint of a build in a new interpreter whose disk cache is ``cache``."""
    result = subprocess.run(
        [sys.executable, "-c", _CACHED_BUILD_CODE, mode],
        capture_output=True,
        text=True,
        env={**os.environ, "LORA_SWEEP_CACHE": str(cache)},
        cwd=_REPO,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _clear_memory_caches() -> None:
    for cached in (dc.collect_docstrings, bd.topic_examples, bd.name_examples):
        cached.cache_clear()


@pytest.fixture(scope="module", autouse=True)
def _own_disk_cache(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """This module's builds use a disk cache of their own, never the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORA_SWEEP_CACHE", str(tmp_path_factory.mktemp("lora-sweep-cache")))
        yield


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An empty disk cache and empty in-memory caches; the in-memory caches are emptied again after."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORA_SWEEP_CACHE", str(cache))
    _clear_memory_caches()
    yield cache
    _clear_memory_caches()


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
    assert bd.MODULE_AREAS is stdlib_docs.MODULE_AREAS and bd.TOPIC_LABELS is stdlib_docs.TOPIC_LABELS
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
    # Resolved in a clean interpreter: this process has torch, mlflow, pytest... patching the stdlib.
    pairs = bd.name_examples()
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _RESOLVE_CODE],
        input=json.dumps([qualname for _, qualname in pairs]),
        capture_output=True,
        text=True,
        check=True,
    )
    docs = json.loads(result.stdout)
    for prompt, qualname in pairs:
        assert bd.clean_docstring(docs[qualname], bd.NAMES_MAX_CHARS) == prompt, qualname
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
    collected = dc._run_collector()  # a new clean interpreter
    from_cache = dc.collect_docstrings.__wrapped__()  # this module's disk cache
    assert collected == from_cache == dc.collect_docstrings()
    assert threading.active_count() == threads_before
    assert sys.dont_write_bytecode is bytecode_flag


def test_fresh_interpreter_builds_the_same_examples(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _FINGERPRINT_CODE],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345", "LORA_SWEEP_CACHE": str(tmp_path)},
        cwd=_REPO,
    )
    assert result.stdout.strip() == _fingerprint()
    assert (tmp_path / "builtin-data" / dc.cache_file().name).is_file()  # it collected, then cached


def test_third_party_imports_do_not_change_the_examples(fresh_cache: Path, tmp_path: Path) -> None:
    # These monkeypatch the standard library when imported: importlib_metadata deletes
    # importlib.machinery.PathFinder.find_distributions, transformers adds logging.Logger.warning_once,
    # torch (pulled in by both) replaces inspect.getfile. None of that may reach the data sets.
    import importlib_metadata  # noqa: F401
    import mlflow  # noqa: F401
    import transformers  # noqa: F401

    in_pytest = _fingerprint()  # collected now (empty caches), after the imports above
    assert dc.cache_file().is_file() and dc.cache_file().is_relative_to(fresh_cache)
    assert in_pytest == _fresh_build(tmp_path / "other-cache")
    qualnames = {entry.qualname for entry in dc.collect_docstrings()}
    assert {"importlib.machinery.PathFinder.find_distributions", "inspect.getfile"} <= qualnames
    assert "logging.Logger.warning_once" not in qualnames
    assert "pdb.set_trace" not in qualnames  # left out on purpose (pytest replaces it)


# --- the disk cache and the collector -----------------------------------------------------------------


def test_disk_cache_is_written_once_and_reused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = _fresh_build(cache)
    files = list((cache / "builtin-data").iterdir())
    expected = f"{dc.BUILDER_VERSION}-py{sys.version_info[0]}.{sys.version_info[1]}.json"
    assert [path.name for path in files] == [expected]  # no temporary file left behind
    mtime = files[0].stat().st_mtime_ns
    assert _fresh_build(cache, "no-collector") == first == _fingerprint()
    assert files[0].stat().st_mtime_ns == mtime
    payload = json.loads(files[0].read_text(encoding="utf-8"))
    assert payload["builder_version"] == dc.BUILDER_VERSION
    assert len(payload["entries"]) == len(dc.collect_docstrings())


@pytest.mark.parametrize(
    "content",
    ["", "{not json", json.dumps({"format": 1, "entries": []}), "stale collector"],
)
def test_unusable_disk_cache_is_rebuilt(fresh_cache: Path, content: str) -> None:
    path = dc.cache_file()
    if content == "stale collector":
        dc.collect_docstrings()
        payload = json.loads(path.read_text(encoding="utf-8"))
        payload["collector_sha256"] = "0" * 64
        payload["entries"] = payload["entries"][:10]
        content = json.dumps(payload)
        _clear_memory_caches()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")
    entries = dc.collect_docstrings()
    assert len(entries) > 1000
    assert dc._read_cache(path) == entries  # rewritten


def test_collector_failure_is_a_clear_error(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failing = [sys.executable, "-c", "import sys; sys.stderr.write('boom from the collector\\n'); sys.exit(3)"]
    monkeypatch.setattr(dc, "_collector_command", lambda: failing)
    with pytest.raises(LoraError) as info:
        bd.load_builtin_dataset("pydoc-topics")
    assert "exit status 3" in info.value.message and "boom from the collector" in info.value.message
    assert info.value.hint is not None and sys.executable in info.value.hint
    assert not dc.cache_file().exists()

    monkeypatch.setattr(dc, "_collector_command", lambda: [sys.executable, "-c", "print('hello')"])
    with pytest.raises(LoraError, match="output is not usable"):
        bd.describe("pydoc-names")
    assert not dc.cache_file().exists()


def test_collector_ignores_the_callers_python_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A PYTHONPATH with a sitecustomize that patches the stdlib and a module shadowing one: -I ignores it.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "sitecustomize.py").write_text("import logging\nlogging.Logger.extra_method = lambda self: 1\n")
    (shadow / "textwrap.py").write_text("raise SystemExit('the shadowing textwrap was imported')\n")
    monkeypatch.setenv("PYTHONPATH", str(shadow))
    monkeypatch.chdir(shadow)
    assert dc._run_collector() == dc.collect_docstrings()
