"""The raw docstrings behind the built-in data sets: collected in a clean interpreter, cached on disk.

How they are collected (:func:`collect_docstrings`): not in this process, where third-party
packages imported earlier may have monkeypatched the standard library (``importlib_metadata``, pulled
in by mlflow, deletes ``importlib.machinery.PathFinder.find_distributions``; transformers adds methods
to ``logging.Logger``; pytest replaces ``pdb.set_trace``), but by running the standard-library-only
module :mod:`sweeps.data.stdlib_docs` by file path in a clean interpreter, ``sys.executable -I -S -B``
(isolated mode, no site-packages, no bytecode written), which prints the raw entries as JSON. What it
walks and how is described there. A collector that fails or prints something unexpected raises
:class:`lora_core.LoraError`; there is no fallback to collecting in this process.

The raw entries are cached in memory per process (:func:`functools.lru_cache`) and on disk, so the
collector runs once per machine and Python version::

    <cache>/builtin-data/<BUILDER_VERSION>-py<major>.<minor>.json

where ``<cache>`` is :func:`sweeps.models.builtin.default_cache_dir` (``$LORA_SWEEP_CACHE``, else
``$XDG_CACHE_HOME/lora-sweep``, else ``~/.cache/lora-sweep``). The file is written atomically
(temporary file, then :func:`os.replace`); one that is unreadable, malformed or written by another version of the collector (its sha256 is recorded)
is ignored and rewritten. A cache that cannot be written only logs a warning.

The entries are raw (``raw_doc`` as the object carries it, empty when it has none); cleaning and the
data sets themselves are :mod:`sweeps.data.builtin`'s.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from lora_core import LoraError
from sweeps.data import stdlib_docs
from sweeps.data.cachefiles import write_json_atomic
from sweeps.data.stdlib_docs import MODULE_AREAS, DocEntry
from sweeps.models.builtin import default_cache_dir

__all__ = ["BUILDER_VERSION", "DocEntry", "cache_file", "collect_docstrings"]

BUILDER_VERSION = 2
"""Bumped whenever a change to this module or :mod:`sweeps.data.stdlib_docs` changes the examples. 2: the
docstrings are collected in a clean interpreter (version 1 collected in-process, where torch's patched
``inspect.getfile`` hid the real one)."""


# The collector: a standard-library-only module run by file path in a clean interpreter.
_COLLECTOR_PATH = Path(stdlib_docs.__file__).resolve()
_COLLECTOR_TIMEOUT_S = 600.0
_CACHE_FORMAT = 1


def _python_version() -> str:
    return "{}.{}".format(*sys.version_info[:2])


def cache_file() -> Path:
    """Where the raw entries of this builder version and Python version are cached on disk."""
    return default_cache_dir() / "builtin-data" / f"{BUILDER_VERSION}-py{_python_version()}.json"


@lru_cache(maxsize=1)
def _collector_sha256() -> str:
    """sha256 of the collector's source: a cache written by another collector is not used."""
    try:
        return hashlib.sha256(_COLLECTOR_PATH.read_bytes()).hexdigest()
    except OSError as exc:
        raise LoraError(
            f"cannot read the standard-library docstring collector {_COLLECTOR_PATH}: {exc}",
            hint="reinstall lora-sweep (the built-in data sets run sweeps/data/stdlib_docs.py as a script)",
        ) from exc


def _collector_command() -> list[str]:
    """``sys.executable -I -S -B <stdlib_docs.py>``: isolated, no site-packages, no bytecode."""
    if not sys.executable:
        raise LoraError(
            "cannot build the built-in data sets: this Python does not know its own executable "
            "(sys.executable is empty)",
            hint="run lora-sweep with a regular python interpreter",
        )
    return [sys.executable, "-I", "-S", "-B", str(_COLLECTOR_PATH)]


def _parse_entries(raw: Any) -> tuple[DocEntry, ...]:
    """Entries from their JSON form; ValueError if anything is not as :mod:`sweeps.data.stdlib_docs` writes it."""
    if not isinstance(raw, list) or not raw:
        raise ValueError("no entries")
    entries: list[DocEntry] = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 4 and all(isinstance(x, str) for x in item)):
            raise ValueError(f"malformed entry {item!r:.200}")
        qualname, module, kind, raw_doc = item
        if module not in MODULE_AREAS or kind not in stdlib_docs.ENTRY_KINDS:
            raise ValueError(f"unexpected module or kind in entry {qualname!r}")
        entries.append(DocEntry(qualname, module, kind, raw_doc))
    qualnames = [entry.qualname for entry in entries]
    if qualnames != sorted(set(qualnames)):
        raise ValueError("entries are not sorted by unique qualified name")
    return tuple(entries)


def _run_collector() -> tuple[DocEntry, ...]:
    """Run the collector in a clean interpreter and return its entries; LoraError if that fails."""
    command = _collector_command()
    shown = " ".join(command)
    hint = f"run `{shown}` to see the problem"
    try:
        proc = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, timeout=_COLLECTOR_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise LoraError(
            f"the standard-library docstring collector did not finish in {_COLLECTOR_TIMEOUT_S:.0f} s",
            hint=hint,
        ) from exc
    except OSError as exc:
        raise LoraError(f"cannot start the standard-library docstring collector: {exc}", hint=hint) from exc
    stderr = proc.stderr.decode("utf-8", "replace").strip()
    if proc.returncode != 0:
        tail = "\n".join(stderr.splitlines()[-15:]) or "(no output on stderr)"
        raise LoraError(
            f"the standard-library docstring collector failed with exit status {proc.returncode}:\n{tail}",
            hint=hint,
        )
    try:
        payload = json.loads(proc.stdout)
        if payload["format"] != stdlib_docs.OUTPUT_FORMAT:
            raise ValueError(f"output format {payload['format']!r}, expected {stdlib_docs.OUTPUT_FORMAT}")
        python = str(payload["python"])
        if python.split(".")[:2] != _python_version().split("."):
            raise ValueError(f"it ran on Python {python}, this is Python {_python_version()}")
        return _parse_entries(payload["entries"])
    except (ValueError, KeyError, TypeError) as exc:
        raise LoraError(
            f"the standard-library docstring collector's output is not usable: {exc}", hint=hint
        ) from exc


def _read_cache(path: Path) -> tuple[DocEntry, ...] | None:
    """The cached entries, or None when absent, unreadable or written by another collector."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        if (
            payload["format"] != _CACHE_FORMAT
            or payload["builder_version"] != BUILDER_VERSION
            or payload["python"] != _python_version()
            or payload["collector_sha256"] != _collector_sha256()
        ):
            return None
        return _parse_entries(payload["entries"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(path: Path, entries: tuple[DocEntry, ...]) -> None:
    """Write the entries through a temporary file and an atomic rename; a failure only warns."""
    payload = {
        "format": _CACHE_FORMAT,
        "builder_version": BUILDER_VERSION,
        "python": _python_version(),
        "python_build": sys.version,
        "collector_sha256": _collector_sha256(),
        "entries": [[e.qualname, e.module, e.kind, e.raw_doc] for e in entries],
    }
    write_json_atomic(path, payload, "built-in data cache")


@lru_cache(maxsize=1)
def collect_docstrings() -> tuple[DocEntry, ...]:
    """Every documented object of the modules in :data:`MODULE_AREAS`, sorted by qualified name.

    Read from the disk cache (:func:`cache_file`), else collected by :mod:`sweeps.data.stdlib_docs` in a
    clean interpreter and then cached; entries without a docstring are kept here (``raw_doc == ""``)
    and filtered by the builders. Cached per process. Raises :class:`lora_core.LoraError` if the
    collector fails.
    """
    path = cache_file()
    entries = _read_cache(path)
    if entries is None:
        entries = _run_collector()
        _write_cache(path, entries)
    return entries
