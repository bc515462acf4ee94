"""User-facing errors: the CLI prints their message and exits with status 2, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (path, file content, config); the message says what and where."""

    exit_code = 2
