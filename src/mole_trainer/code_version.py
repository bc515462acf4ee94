"""The version of the code that is running: package version and, in a source checkout, the git commit."""

from __future__ import annotations

import subprocess
from pathlib import Path

from . import __version__

GIT_TIMEOUT_S = 5.0


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def code_version() -> dict:
    """{"package", "git_commit", "git_dirty"}; the git fields are None outside a git checkout."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "package": __version__,
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
    }
