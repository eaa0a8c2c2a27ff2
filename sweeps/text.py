"""Small text helpers shared by every layer: an error's first line, a URL with its password masked."""

from __future__ import annotations

import re

_PASSWORD = re.compile(r"//([^:/@]+):[^@/]*@")


def first_line(exc: BaseException | str, limit: int = 300) -> str:
    """The first non-empty line of an error (or a text), at most ``limit`` characters; an exception
    without a message gives its type's name."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    return text.splitlines()[0][:limit]


def mask_url(url: str) -> str:
    """``scheme://user:secret@host/...`` -> ``scheme://user:***@host/...``; other text unchanged."""
    return _PASSWORD.sub(r"//\1:***@", url)


def fmt_value(value: object) -> str:
    """A parameter value for a table or a message: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
