"""Collect the standard library's docstrings in a clean interpreter (standard library only).

This module is the collector behind :mod:`sweeps.data.docstrings` (which feeds
:mod:`sweeps.data.builtin`). It imports nothing outside the standard library, so it can be run by
file path in an isolated interpreter with no site-packages::

    python -I -S -B path/to/sweeps/data/stdlib_docs.py > entries.json

There nothing third-party can have been imported, so nothing can have monkeypatched the standard
library (``importlib_metadata`` deletes ``importlib.machinery.PathFinder.find_distributions``,
transformers adds methods to ``logging.Logger``, pytest replaces ``pdb.set_trace``), and the entries
depend only on the Python build. ``-I`` also ignores ``PYTHON*`` environment variables and keeps the
script's directory and the working directory off ``sys.path``, so no file next to this one or in the
caller's directory can shadow a standard-library module. :mod:`sweeps.data.docstrings` never calls
:func:`collect` in its own process.

What is collected (see :func:`collect`): every module in :data:`MODULE_AREAS` is imported (modules
missing from this build, such as ``tkinter`` or ``curses`` on some systems, are skipped), then its
public classes and functions and those classes' public methods and properties are visited in sorted
order. A member counts only where it is defined: its ``__module__`` is the module itself or one of its
standard-library implementation modules (``_io`` for ``io``, ``posix`` for ``os``,
``concurrent.futures._base``); each object is visited once, under its first name (module functions
before classes, then sorted), so re-exports are not counted twice. ``pdb.set_trace`` is left out (a
debugger hook that test runners replace, so a name example for it would not match what such a tool
shows), and members whose code is not from the standard library are skipped (a defence only: in the
isolated interpreter there are none).

Output of the ``__main__`` entry: one JSON object on stdout, ASCII only::

    {"format": 1, "python": "3.11.7", "entries": [[qualname, module, kind, raw_doc], ...]}

with entries sorted by qualified name and entries without a docstring kept (``raw_doc == ""``).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType, ModuleType
from typing import Any

__all__ = [
    "ENTRY_KINDS",
    "MODULE_AREAS",
    "OUTPUT_FORMAT",
    "TOPIC_LABELS",
    "DocEntry",
    "collect",
    "main",
]

OUTPUT_FORMAT = 1
"""Version of the JSON layout written by :func:`main`."""

ENTRY_KINDS: tuple[str, ...] = ("module", "class", "function", "method", "property")
"""The values of :attr:`DocEntry.kind`."""

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
# so that every name example documents what any process, under such a tool or not, finds there.
_EXCLUDED_NAMES: frozenset[str] = frozenset({"pdb.set_trace"})


@dataclass(frozen=True)
class DocEntry:
    """One documented object: where it lives and its docstring as found."""

    qualname: str
    """Importable qualified name: ``module.member`` or ``module.Class.member``."""
    module: str
    """The walked module it was found in (a key of :data:`MODULE_AREAS`)."""
    kind: str
    """``module``, ``class``, ``function``, ``method`` or ``property``."""
    raw_doc: str
    """The docstring exactly as ``__doc__`` holds it (``""`` when there is none)."""

    @property
    def area(self) -> str:
        return MODULE_AREAS[self.module]


def _import_quietly(name: str) -> ModuleType | None:
    """Import a standard-library module with warnings silenced; None if this build lacks it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except Exception:  # ImportError, or a platform module failing in its own way
            return None


def _is_stdlib(module_name: str) -> bool:
    return module_name.split(".")[0] in sys.stdlib_module_names


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
    if owner is None or not _is_stdlib(owner):
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
        if isinstance(code_owner, str) and not _is_stdlib(code_owner):
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
        yield DocEntry(module_name, module_name, "module", _doc_of(module))
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
            yield DocEntry(f"{module_name}.{name}", module_name, "function", _doc_of(obj))
    for name, obj in members:
        if not inspect.isclass(obj) or not seen.add(obj):
            continue
        yield DocEntry(f"{module_name}.{name}", module_name, "class", _doc_of(obj))
        for member_name, kind, member in _class_members(obj):
            if seen.add(member):
                yield DocEntry(f"{module_name}.{name}.{member_name}", module_name, kind, _doc_of(member))


def _doc_of(obj: Any) -> str:
    doc = getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) else ""


def collect() -> list[DocEntry]:
    """Every documented object of the modules in :data:`MODULE_AREAS`, sorted by qualified name.

    Imports those modules into the calling process (warnings silenced, bytecode writing off while it
    runs), so it is meant to run in a clean interpreter: see the module docstring.
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
    return entries


def main() -> int:
    """Collect, then write the JSON object described in the module docstring to stdout."""
    # Anything an imported module prints goes to stderr, so stdout carries only the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        entries = collect()
    payload = {
        "format": OUTPUT_FORMAT,
        "python": "{}.{}.{}".format(*sys.version_info[:3]),
        "entries": [[e.qualname, e.module, e.kind, e.raw_doc] for e in entries],
    }
    json.dump(payload, sys.stdout, ensure_ascii=True, separators=(",", ":"))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
