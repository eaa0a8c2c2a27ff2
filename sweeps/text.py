"""Small text helpers shared by every layer: an error's first line (passwords masked), a value."""

from __future__ import annotations

from sweeps.secrets import mask_text, mask_url

__all__ = ["first_line", "fmt_value", "mask_text", "mask_url"]


def first_line(exc: BaseException | str, limit: int = 300) -> str:
    """The first non-empty line of an error (or a text), at most ``limit`` characters, with every URL's
    password masked (MLflow's and SQLAlchemy's errors quote the URL they were given); an exception without
    a message gives its type's name."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    return mask_text(text.splitlines()[0])[:limit]


def fmt_value(value: object) -> str:
    """A parameter value for a table or a message: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
