"""Reading a ``.json`` data file without holding it whole in memory.

A ``.json`` file that holds one array of objects is streamed, record by record, into JSON lines (which the
Arrow reader then memory-maps): memory holds one record and a 64 KiB window, whatever the file's size. The
other document form, one object of column lists, cannot be split that way: it is read whole only up to
:data:`MAX_DOCUMENT_BYTES`; above that the error says to convert it to JSON lines. The fallback reader of
JSON lines (for files the Arrow reader rejects, to name the bad line) reads line by line too.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from lora_core import LoraError

__all__ = ["MAX_DOCUMENT_BYTES", "MAX_RECORD_BYTES", "NotAnArray", "array_to_lines", "iter_json_lines",
           "starts_with_array"]

MAX_DOCUMENT_BYTES = 256 << 20  # a .json object of column lists is read whole up to this size
MAX_RECORD_BYTES = 64 << 20     # one record of a streamed array (a larger one is malformed or not data)
_CHUNK = 1 << 16


class NotAnArray(Exception):
    """The document does not start with ``[``."""


def starts_with_array(path: Path) -> bool:
    """Whether the file's first non-space character is ``[``."""
    with path.open(encoding="utf-8") as src:
        while chunk := src.read(_CHUNK):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0] == "["
    return False


class _Window:
    """The unread text of a file, refilled a chunk at a time."""

    def __init__(self, src: IO[str]) -> None:
        self.src, self.buf, self.eof = src, "", False

    def more(self) -> None:
        chunk = self.src.read(_CHUNK)
        self.eof = not chunk
        self.buf += chunk

    def lead(self) -> str:
        """The next non-space character ('' at the end), spaces dropped."""
        while True:
            self.buf = self.buf.lstrip()
            if self.buf or self.eof:
                return self.buf[:1]
            self.more()


def _records(src: IO[str], path: Path) -> Iterator[Any]:
    decoder = json.JSONDecoder()
    win = _Window(src)
    if win.lead() != "[":
        raise NotAnArray
    win.buf = win.buf[1:]
    if win.lead() == "]":
        win.buf = win.buf[1:]
    else:
        while True:
            win.lead()
            while True:
                try:
                    value, end = decoder.raw_decode(win.buf)
                    if end < len(win.buf) or win.eof:  # a number at the window's end may go on
                        break
                except json.JSONDecodeError as exc:
                    if win.eof or len(win.buf) > MAX_RECORD_BYTES:
                        raise LoraError(f"data file {path}: not valid JSON ({exc.msg})",
                                        hint="check the file, or write it as JSON lines (one object per line)") \
                            from None
                win.more()
            yield value
            win.buf = win.buf[end:]
            sep = win.lead()
            win.buf = win.buf[1:]
            if sep == "]":
                break
            if sep != ",":
                raise LoraError(f"data file {path}: not valid JSON (expected ',' or ']' between records)")
    if win.lead():
        raise LoraError(f"data file {path}: not valid JSON (text after the closing ']')")


def array_to_lines(path: Path, out: Path) -> int:
    """Stream the array of objects in ``path`` into JSON lines at ``out`` (written whole or not at all);
    returns the records written.

    Raises:
        NotAnArray: the document is not an array.
        LoraError: malformed JSON, or a record that is not an object.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    count = 0
    try:
        with path.open(encoding="utf-8") as src, os.fdopen(fd, "w", encoding="utf-8") as dst:
            for record in _records(src, path):
                if not isinstance(record, dict):
                    raise LoraError(f"data file {path}: record {count + 1} is a {type(record).__name__}, "
                                    "not an object")
                dst.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return count


def iter_json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSON lines file, read a line at a time."""
    with path.open(encoding="utf-8") as src:
        for number, line in enumerate(src, 1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise LoraError(f"data file {path}, line {number}: not valid JSON ({exc.msg})") from None
