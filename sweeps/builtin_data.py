"""Built-in datasets that need no download: made from the standard library's own docstrings.

Two datasets, both deterministic for a given Python version (``sys.version_info[:2]``) and built in
about a second, with nothing written to disk:

``pydoc-topics`` (classification)
    ``text`` is a cleaned docstring of a standard-library module, class, function, method or
    property; ``label`` (a :class:`datasets.ClassLabel`) is the area of the standard library it comes
    from. The areas are :data:`TOPIC_LABELS`; which module belongs to which area is the fixed table
    :data:`MODULE_AREAS`.

``pydoc-names`` (causal LM)
    ``prompt`` is a cleaned docstring (shorter cut), ``completion`` the qualified name of what it
    documents, e.g. ``collections.OrderedDict.move_to_end``. The caller chooses the prompt format;
    :data:`NAMES_PROMPT_TEMPLATE` is a reasonable one.

How the examples are collected (see :func:`collect_docstrings`): every module in :data:`MODULE_AREAS`
is imported (modules missing from this build, such as ``tkinter`` or ``curses`` on some systems, are
skipped), then its public classes and functions and those classes' public methods and properties are
visited in sorted order. A member counts only where it is defined: its ``__module__`` is the module
itself or one of its standard-library implementation modules (``_io`` for ``io``, ``posix`` for ``os``,
``concurrent.futures._base``); each object is visited once, under its first name (module functions
before classes, then sorted), so re-exports are not counted twice. Objects that a tool replaced at
runtime (their ``__module__`` is not in the standard library) are skipped, and ``pdb.set_trace``,
which pytest replaces, is left out everywhere, so the examples are the same under pytest.

Cleaning (:func:`clean_docstring`): :func:`inspect.cleandoc`, leading signature lines such as
``sin(x)`` or ``pow(x, y) -> float`` removed, whole paragraphs kept up to a character budget (a first
paragraph longer than the budget is cut at a word boundary), and texts shorter than
:data:`MIN_CHARS` dropped. Exact duplicate texts are kept once when they share a label and dropped
altogether when they carry two labels (topics) or document two names (names).

Splits are 80/10/10 train/validation/test from a seed; ``pydoc-topics`` is stratified by label. The
examples themselves are cached in memory per process (:func:`functools.lru_cache`); no disk cache is
used because building is fast.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import sys
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType, ModuleType
from typing import TYPE_CHECKING, Any

from lora_core import LoraError

if TYPE_CHECKING:
    from datasets import DatasetDict

__all__ = [
    "BUILDER_VERSION",
    "MODULE_AREAS",
    "NAMES_MAX_CHARS",
    "NAMES_PROMPT_TEMPLATE",
    "TOPICS_MAX_CHARS",
    "TOPIC_LABELS",
    "DatasetSummary",
    "DocEntry",
    "builtin_dataset_names",
    "clean_docstring",
    "collect_docstrings",
    "describe",
    "load_builtin_dataset",
    "name_examples",
    "topic_examples",
]

BUILDER_VERSION = 1
"""Bumped whenever a change to this module changes the examples it produces."""

TOPICS_MAX_CHARS = 600
"""Character budget of a ``pydoc-topics`` text."""

NAMES_MAX_CHARS = 300
"""Character budget of a ``pydoc-names`` prompt."""

MIN_CHARS = 40
"""Cleaned docstrings shorter than this are dropped (too little to learn from)."""

NAMES_PROMPT_TEMPLATE = "{prompt}\nName:"
"""A reasonable way to format a ``pydoc-names`` example: the docstring, then ``Name:``; the model
should continue with ``" " + completion``."""

TOPIC_LABELS: tuple[str, ...] = (
    "files_os",
    "text",
    "math_numbers",
    "network",
    "time_dates",
    "concurrency",
    "data_formats",
    "data_structures",
    "dev_tools",
)
"""The ``pydoc-topics`` classes, in ClassLabel order (label id = index in this tuple)."""

_AREA_MODULES: dict[str, tuple[str, ...]] = {
    # Files, paths, the operating system and the interpreter's host.
    "files_os": (
        "errno", "fcntl", "filecmp", "fileinput", "fnmatch", "getpass", "glob", "grp", "io",
        "mmap", "os", "os.path", "pathlib", "platform", "pwd", "resource", "shutil", "stat",
        "sysconfig", "tempfile",
    ),
    # Strings, regular expressions, diffs, Unicode, codecs, translations.
    "text": (
        "codecs", "difflib", "gettext", "locale", "re", "shlex", "string", "stringprep",
        "textwrap", "unicodedata",
    ),
    # Numbers, arithmetic, randomness and statistics.
    "math_numbers": (
        "cmath", "decimal", "fractions", "math", "numbers", "random", "secrets", "statistics",
    ),
    # Sockets, TLS, internet protocols, URLs, e-mail and MIME.
    "network": (
        "email", "email.charset", "email.contentmanager", "email.encoders", "email.errors",
        "email.feedparser", "email.generator", "email.header", "email.headerregistry",
        "email.iterators", "email.message", "email.mime.application", "email.mime.audio",
        "email.mime.base", "email.mime.image", "email.mime.message", "email.mime.multipart",
        "email.mime.nonmultipart", "email.mime.text", "email.parser", "email.policy", "email.utils",
        "ftplib", "http", "http.client", "http.cookiejar", "http.cookies", "http.server", "imaplib",
        "ipaddress", "mailbox", "mimetypes", "poplib", "smtplib", "socket", "socketserver", "ssl",
        "urllib", "urllib.error", "urllib.parse", "urllib.request", "urllib.response",
        "urllib.robotparser", "uuid", "wsgiref.handlers", "wsgiref.headers",
        "wsgiref.simple_server", "wsgiref.util", "wsgiref.validate", "xmlrpc.client",
        "xmlrpc.server",
    ),
    # Clocks, dates, calendars, time zones, scheduling.
    "time_dates": ("calendar", "datetime", "sched", "time", "zoneinfo"),
    # Threads, processes, async I/O, queues, signals.
    "concurrency": (
        "asyncio", "asyncio.base_events", "asyncio.coroutines", "asyncio.events",
        "asyncio.exceptions", "asyncio.futures", "asyncio.locks", "asyncio.protocols",
        "asyncio.queues", "asyncio.runners", "asyncio.selector_events", "asyncio.streams",
        "asyncio.subprocess", "asyncio.taskgroups", "asyncio.tasks", "asyncio.timeouts",
        "asyncio.transports", "asyncio.unix_events", "concurrent.futures", "concurrent.futures.process",
        "concurrent.futures.thread", "contextvars", "multiprocessing", "multiprocessing.connection",
        "multiprocessing.context", "multiprocessing.managers", "multiprocessing.pool",
        "multiprocessing.process", "multiprocessing.queues", "multiprocessing.shared_memory",
        "multiprocessing.sharedctypes", "multiprocessing.synchronize", "queue", "select",
        "selectors", "signal", "subprocess", "threading",
    ),
    # Serialisation, markup, configuration files, compression and archives, encodings, hashing.
    "data_formats": (
        "base64", "binascii", "bz2", "configparser", "csv", "dbm", "gzip", "hashlib", "hmac",
        "html", "html.parser", "json", "json.decoder", "json.encoder", "lzma", "marshal", "pickle",
        "plistlib", "quopri", "shelve", "sqlite3", "struct", "tarfile", "tomllib", "xml.dom",
        "xml.dom.minidom", "xml.dom.pulldom", "xml.etree.ElementTree", "xml.parsers.expat",
        "xml.sax", "xml.sax.handler", "xml.sax.saxutils", "xml.sax.xmlreader", "zipfile", "zlib",
    ),
    # Containers, functional tools, types and object protocols.
    "data_structures": (
        "abc", "array", "bisect", "collections", "collections.abc", "contextlib", "copy",
        "dataclasses", "enum", "functools", "graphlib", "heapq", "itertools", "operator", "pprint",
        "reprlib", "types", "typing", "weakref",
    ),
    # Testing, debugging, profiling, logging, introspection, the import system, command lines.
    "dev_tools": (
        "argparse", "ast", "bdb", "cProfile", "cmd", "code", "codeop", "dis", "doctest",
        "faulthandler", "getopt", "importlib", "importlib.abc", "importlib.machinery",
        "importlib.metadata", "importlib.resources", "importlib.util", "inspect", "keyword",
        "logging", "logging.config", "logging.handlers", "optparse", "pdb", "pkgutil", "profile",
        "pstats", "py_compile", "runpy", "symtable", "timeit", "token", "tokenize", "trace",
        "traceback", "tracemalloc", "unittest", "unittest.mock", "warnings",
    ),
}

MODULE_AREAS: Mapping[str, str] = MappingProxyType(
    {module: area for area, modules in _AREA_MODULES.items() for module in modules}
)
"""Standard-library module -> ``pydoc-topics`` area. Only these modules are imported and walked.
Modules with side effects on import (``this``, ``antigravity``, ``idlelib``, ``turtledemo``,
``readline``, GUI toolkits) are deliberately absent."""

# Non-private modules whose members are re-exported by a walked module and count as defined there.
_IMPLEMENTATION_MODULES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"os": ("posix", "nt"), "os.path": ("posixpath", "ntpath"), "xml.parsers.expat": ("pyexpat",)}
)

# Hooks that debuggers and test runners replace at runtime (pytest swaps ``pdb.set_trace``); left out
# so that the examples are the same inside and outside such tools.
_EXCLUDED_NAMES: frozenset[str] = frozenset({"pdb.set_trace"})

_DATASET_NAMES: tuple[str, ...] = ("pydoc-topics", "pydoc-names")
_SPLITS: tuple[str, ...] = ("train", "validation", "test")
_SPLIT_FRACTIONS: tuple[float, float] = (0.8, 0.1)  # train, validation; test gets the rest

# A docstring line that is only a call signature: ``sin(x)``, ``D.get(k[,d]) -> D[k] if k in D``.
_SIGNATURE_LINE = re.compile(r"^[A-Za-z_][\w.]*\(.*\)\s*(->.*)?$")


@dataclass(frozen=True)
class DocEntry:
    """One documented object: where it lives and its cleaned docstring (untruncated budget aside)."""

    qualname: str
    """Importable qualified name: ``module.member`` or ``module.Class.member``."""
    module: str
    """The walked module it was found in (a key of :data:`MODULE_AREAS`)."""
    kind: str
    """``module``, ``class``, ``function``, ``method`` or ``property``."""
    raw_doc: str
    """The docstring exactly as ``__doc__`` holds it."""

    @property
    def area(self) -> str:
        return MODULE_AREAS[self.module]


@dataclass(frozen=True)
class DatasetSummary:
    """What :func:`describe` reports about one built-in dataset."""

    name: str
    task: str
    size: int
    split_sizes: dict[str, int]
    label_names: tuple[str, ...] | None
    label_counts: dict[str, int] | None
    majority_rate: float | None
    python_version: str
    builder_version: int


def builtin_dataset_names() -> tuple[str, ...]:
    """Names accepted by :func:`load_builtin_dataset`."""
    return _DATASET_NAMES


def clean_docstring(doc: str | None, max_chars: int) -> str | None:
    """Return ``doc`` cleaned and cut to at most ``max_chars`` characters, or None if too short.

    Steps: :func:`inspect.cleandoc`; leading lines that are only call signatures (and an Argument
    Clinic ``--`` separator) removed; whole paragraphs kept while they fit in ``max_chars`` (a first
    paragraph that alone is longer is cut at the last space before the budget); the result is
    stripped and must have at least :data:`MIN_CHARS` characters.
    """
    if not doc or not isinstance(doc, str):
        return None
    lines = inspect.cleandoc(doc).splitlines()
    while lines and (_SIGNATURE_LINE.match(lines[0].strip()) or lines[0].strip() in ("", "--")):
        lines.pop(0)
    paragraphs = [p.strip("\n").rstrip() for p in re.split(r"\n[ \t]*\n", "\n".join(lines)) if p.strip()]
    if not paragraphs:
        return None
    text = paragraphs[0]
    if len(text) > max_chars:
        cut = text.rfind(" ", 0, max_chars + 1)
        text = text[: cut if cut > 0 else max_chars].rstrip()
    else:
        for paragraph in paragraphs[1:]:
            candidate = f"{text}\n\n{paragraph}"
            if len(candidate) > max_chars:
                break
            text = candidate
    if len(text) < MIN_CHARS:
        return None
    return text


def _import_quietly(name: str) -> ModuleType | None:
    """Import a standard-library module with warnings silenced; None if this build lacks it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except Exception:  # ImportError, or a platform module failing in its own way
            return None


def _owner(obj: Any) -> str | None:
    """The module that defines ``obj``; for a method bound to an instance, the instance's class's."""
    self_ = getattr(obj, "__self__", None)
    if inspect.isroutine(obj) and self_ is not None and not inspect.ismodule(self_):
        owner = getattr(type(self_) if not inspect.isclass(self_) else self_, "__module__", None)
    else:
        owner = getattr(obj, "__module__", None)
    return owner if isinstance(owner, str) else None


def _defined_in(obj: Any, module_name: str) -> bool:
    """True if ``obj`` is defined in ``module_name`` or one of its implementation modules."""
    owner = _owner(obj)
    if owner is None or owner.split(".")[0] not in sys.stdlib_module_names:
        return False  # includes stdlib functions that a tool replaced at runtime
    if owner == module_name or owner in _IMPLEMENTATION_MODULES.get(module_name, ()):
        return True
    # C accelerators and private helpers: ``_io`` for io, ``concurrent.futures._base``, ``_asyncio``.
    return any(part.startswith("_") for part in owner.split("."))


def _identity(obj: Any) -> Any:
    """The object that stands for ``obj`` when counting it once: a bound method's function."""
    self_ = getattr(obj, "__self__", None)
    if inspect.isroutine(obj) and self_ is not None and not inspect.ismodule(self_):
        func = getattr(obj, "__func__", None)
        if func is not None:
            return func
        cls = self_ if inspect.isclass(self_) else type(self_)
        return inspect.getattr_static(cls, obj.__name__, obj)
    return obj


def _class_members(cls: type) -> Iterator[tuple[str, str, Any]]:
    """Yield ``(name, kind, object)`` for the public methods and properties ``cls`` itself defines."""
    for name in sorted(vars(cls)):
        if name.startswith("_"):
            continue
        raw = vars(cls)[name]
        if isinstance(raw, (staticmethod, classmethod)):
            raw = raw.__func__
        code_owner = getattr(raw.fget if isinstance(raw, property) else raw, "__module__", None)
        if isinstance(code_owner, str) and code_owner.split(".")[0] not in sys.stdlib_module_names:
            continue  # patched in by a third-party import (transformers adds logging.Logger.warning_once)
        if isinstance(raw, property) or inspect.isgetsetdescriptor(raw):
            yield name, "property", raw
        elif inspect.isroutine(raw):
            yield name, "method", raw


class _Seen:
    """Objects already visited, held alive so that ``id`` values are never reused meanwhile."""

    def __init__(self) -> None:
        self._objects: dict[int, Any] = {}

    def add(self, obj: Any) -> bool:
        """Record ``obj``; False if it was already recorded."""
        key = _identity(obj)
        if id(key) in self._objects:
            return False
        self._objects[id(key)] = key
        return True


def _walk_module(module_name: str, module: ModuleType, seen: _Seen) -> Iterator[DocEntry]:
    """Entries for a module, then its functions, then its classes and their members.

    Functions come before classes so that ``random.randint`` (a bound method of a hidden instance)
    is credited to the module-level name rather than to ``random.Random.randint``.
    """
    if seen.add(module):
        yield DocEntry(module_name, module_name, "module", module.__doc__ or "")
    members: list[tuple[str, Any]] = []
    for name in sorted(dir(module)):
        if name.startswith("_"):
            continue
        try:
            obj = getattr(module, name)
        except Exception:  # lazy attributes that fail on this build
            continue
        if f"{module_name}.{name}" in _EXCLUDED_NAMES:
            continue
        if not inspect.ismodule(obj) and _defined_in(obj, module_name):
            members.append((name, obj))
    for name, obj in members:
        if inspect.isroutine(obj) and seen.add(obj):
            yield DocEntry(f"{module_name}.{name}", module_name, "function", obj.__doc__ or "")
    for name, obj in members:
        if not inspect.isclass(obj) or not seen.add(obj):
            continue
        yield DocEntry(f"{module_name}.{name}", module_name, "class", obj.__doc__ or "")
        for member_name, kind, member in _class_members(obj):
            if seen.add(member):
                doc = getattr(member, "__doc__", None) or ""
                yield DocEntry(f"{module_name}.{name}.{member_name}", module_name, kind, doc)


@lru_cache(maxsize=1)
def collect_docstrings() -> tuple[DocEntry, ...]:
    """Every documented object of the modules in :data:`MODULE_AREAS`, sorted by qualified name.

    Imports those modules (with warnings silenced and bytecode writing off, so nothing lands on disk);
    entries without a docstring are kept here (``raw_doc == ""``) and filtered by the builders.
    Cached per process.
    """
    seen = _Seen()
    entries: list[DocEntry] = []
    write_bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for module_name in sorted(MODULE_AREAS):
                module = _import_quietly(module_name)
                if module is not None:
                    entries.extend(_walk_module(module_name, module, seen))
    finally:
        sys.dont_write_bytecode = write_bytecode
    entries.sort(key=lambda entry: entry.qualname)
    return tuple(entries)


@lru_cache(maxsize=1)
def topic_examples() -> tuple[tuple[str, str, str], ...]:
    """``(qualname, text, area)`` for ``pydoc-topics``, sorted by qualified name, texts unique.

    A text seen under two areas is dropped everywhere; a text repeated within one area is kept once,
    under its first qualified name.
    """
    cleaned = [
        (entry.qualname, text, entry.area)
        for entry in collect_docstrings()
        if (text := clean_docstring(entry.raw_doc, TOPICS_MAX_CHARS)) is not None
    ]
    areas_per_text: dict[str, set[str]] = {}
    for _, text, area in cleaned:
        areas_per_text.setdefault(text, set()).add(area)
    kept: list[tuple[str, str, str]] = []
    emitted: set[str] = set()
    for qualname, text, area in cleaned:
        if len(areas_per_text[text]) == 1 and text not in emitted:
            emitted.add(text)
            kept.append((qualname, text, area))
    return tuple(kept)


@lru_cache(maxsize=1)
def name_examples() -> tuple[tuple[str, str], ...]:
    """``(prompt, completion)`` for ``pydoc-names``, sorted by completion; prompts that document
    more than one name are dropped."""
    cleaned = [
        (text, entry.qualname)
        for entry in collect_docstrings()
        if (text := clean_docstring(entry.raw_doc, NAMES_MAX_CHARS)) is not None
    ]
    uses = Counter(text for text, _ in cleaned)
    return tuple((text, qualname) for text, qualname in cleaned if uses[text] == 1)


def _split_indices(n: int, rng: random.Random) -> list[list[int]]:
    """Shuffle ``range(n)`` and cut it 80/10/10 (each part non-empty once ``n >= 3``)."""
    order = list(range(n))
    rng.shuffle(order)
    n_train = round(n * _SPLIT_FRACTIONS[0])
    n_val = round(n * _SPLIT_FRACTIONS[1])
    if n >= 3:
        n_val = max(n_val, 1)
        n_train = min(n_train, n - n_val - 1)
    return [order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]]


def _topics_split(seed: int) -> dict[str, list[int]]:
    """Indices into :func:`topic_examples` per split, stratified by area."""
    examples = topic_examples()
    parts: dict[str, list[int]] = {split: [] for split in _SPLITS}
    for label_id, area in enumerate(TOPIC_LABELS):
        members = [i for i, (_, _, a) in enumerate(examples) if a == area]
        rng = random.Random(f"pydoc-topics/{seed}/{label_id}")
        for split, local in zip(_SPLITS, _split_indices(len(members), rng), strict=True):
            parts[split].extend(members[i] for i in local)
    return {split: sorted(indices) for split, indices in parts.items()}


def _names_split(seed: int) -> dict[str, list[int]]:
    rng = random.Random(f"pydoc-names/{seed}")
    pieces = _split_indices(len(name_examples()), rng)
    return {split: sorted(local) for split, local in zip(_SPLITS, pieces, strict=True)}


def load_builtin_dataset(name: str, seed: int = 0) -> DatasetDict:
    """Build a built-in dataset with ``train``/``validation``/``test`` splits (80/10/10 from ``seed``).

    ``pydoc-topics`` has columns ``text`` (str) and ``label`` (ClassLabel named :data:`TOPIC_LABELS`);
    ``pydoc-names`` has ``prompt`` and ``completion`` (both str). Rows within a split are in
    qualified-name order. Raises :class:`lora_core.LoraError` for an unknown name.
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    _check_name(name)
    if name == "pydoc-topics":
        examples = topic_examples()
        features = Features({"text": Value("string"), "label": ClassLabel(names=list(TOPIC_LABELS))})
        label_id = {area: i for i, area in enumerate(TOPIC_LABELS)}
        return DatasetDict(
            {
                split: Dataset.from_dict(
                    {
                        "text": [examples[i][1] for i in indices],
                        "label": [label_id[examples[i][2]] for i in indices],
                    },
                    features=features,
                    split=split,
                )
                for split, indices in _topics_split(seed).items()
            }
        )
    pairs = name_examples()
    features = Features({"prompt": Value("string"), "completion": Value("string")})
    return DatasetDict(
        {
            split: Dataset.from_dict(
                {
                    "prompt": [pairs[i][0] for i in indices],
                    "completion": [pairs[i][1] for i in indices],
                },
                features=features,
                split=split,
            )
            for split, indices in _names_split(seed).items()
        }
    )


def describe(name: str, seed: int = 0) -> DatasetSummary:
    """Sizes, label names, counts per label and majority-class rate of a built-in dataset.

    Counts and the majority rate are over the whole dataset (all splits); ``split_sizes`` depends on
    ``seed`` only through rounding within each stratum.
    """
    _check_name(name)
    python_version = "{}.{}".format(*sys.version_info[:2])
    if name == "pydoc-topics":
        counts = Counter(area for _, _, area in topic_examples())
        total = sum(counts.values())
        return DatasetSummary(
            name=name,
            task="classification",
            size=total,
            split_sizes={split: len(ix) for split, ix in _topics_split(seed).items()},
            label_names=TOPIC_LABELS,
            label_counts={area: counts.get(area, 0) for area in TOPIC_LABELS},
            majority_rate=max(counts.values()) / total if total else 0.0,
            python_version=python_version,
            builder_version=BUILDER_VERSION,
        )
    return DatasetSummary(
        name=name,
        task="causal-lm",
        size=len(name_examples()),
        split_sizes={split: len(ix) for split, ix in _names_split(seed).items()},
        label_names=None,
        label_counts=None,
        majority_rate=None,
        python_version=python_version,
        builder_version=BUILDER_VERSION,
    )


def _check_name(name: str) -> None:
    if name not in _DATASET_NAMES:
        raise LoraError(
            f"unknown built-in dataset {name!r}",
            hint=f"choose one of: {', '.join(_DATASET_NAMES)}",
        )
