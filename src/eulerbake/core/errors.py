"""The one exception type users see: a message that names the problem and the fix."""

from __future__ import annotations


class EulerbakeError(Exception):
    """A user-facing failure: `str(err)` is the whole message, `hint` says what to do."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  fix: {self.hint}"
        return self.message
