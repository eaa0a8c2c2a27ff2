"""The one exception type for problems a user can cause and fix."""

from __future__ import annotations


class LoraError(ValueError):
    """A problem with user input: a bad config, an unknown target, an adapter for another model.

    The message says what is wrong in one line; ``hint`` says how to fix it. The CLI prints both and
    exits with code 2.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")
