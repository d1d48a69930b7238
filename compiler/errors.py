"""User-facing errors.

Anything the user can fix (a missing file, a bad recipe, an unsupported model) raises
``UserError``; the CLI prints its message as one line on stderr and exits with code 2.
Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the input, with a message that says what is wrong and how to fix it."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # one line, always
        return " ".join(self.message.split())
