"""SHA-256 of files, streams and folders: one implementation for content addressing, data hashes and
manifests. Files are always read in CHUNK-sized pieces, never whole into memory."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20  # bytes read at a time, so large files are never held in memory


def update_from_stream(digest, fh) -> None:
    """Feed what is left to read in a binary file object into a hashlib object."""
    while chunk := fh.read(CHUNK):
        digest.update(chunk)


def update_from_file(digest, path: str | Path) -> None:
    """Feed a local file's bytes into a hashlib object (the same digest as hashing them all at once)."""
    with open(path, "rb") as fh:
        update_from_stream(digest, fh)


def sha256_stream(fh) -> str:
    """Hex SHA-256 of what is left to read in a binary file object."""
    digest = hashlib.sha256()
    update_from_stream(digest, fh)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a local file's bytes."""
    with open(path, "rb") as fh:
        return sha256_stream(fh)


def folder_digest(root: str | Path, salt: bytes = b"", skip_prefix: str | None = None) -> str:
    """Hex SHA-256 over every file below `root`: `salt`, then each relative name and its file's SHA-256.

    Files whose name starts with `skip_prefix` are left out.
    """
    root = Path(root)
    h = hashlib.sha256(salt)
    files = (p for p in root.rglob("*") if p.is_file())
    for f in sorted(p for p in files if not (skip_prefix and p.name.startswith(skip_prefix))):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        file_digest = hashlib.sha256()
        update_from_file(file_digest, f)
        h.update(file_digest.digest())
    return h.hexdigest()
