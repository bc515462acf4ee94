"""User-facing errors: the CLI prints their message and exits with status 2, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (path, file content, config); the message says what and where."""

    exit_code = 2


def where(path, line: int | None = None, key: str | None = None) -> str:
    """Format a location as 'path:line' or 'path: key' for error messages."""
    out = str(path)
    if line is not None:
        out += f":{line}"
    if key is not None:
        out += f": {key}"
    return out
