"""SHA-256 of files and streams: one implementation for content addressing, data hashes and manifests."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20  # bytes read at a time, so large files are never held in memory


def sha256_stream(fh) -> str:
    """Hex SHA-256 of what is left to read in a binary file object."""
    digest = hashlib.sha256()
    while chunk := fh.read(CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a local file's bytes."""
    with open(path, "rb") as fh:
        return sha256_stream(fh)
