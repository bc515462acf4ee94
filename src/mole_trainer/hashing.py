"""SHA-256 of files, streams and folders: one implementation for content addressing, data hashes and
manifests. Files are always read in CHUNK-sized pieces, never whole into memory."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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


def file_hashes_digest(files: Iterable[Path]) -> str:
    """Hex SHA-256 over each file's name and the hex SHA-256 of its bytes, in the order given."""
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


def listing_digest(folder: str | Path, head: str | None = None, skip_prefix: str | None = None) -> str:
    """Hex SHA-256 of a folder's own files by name and size: the bytes of its file `head` (when there is
    one), then each file directly in `folder`, sorted by name, as its name and size.

    Cheap (only `head` is read) and blind to modification times, which a copy may not keep. Files whose
    name starts with `skip_prefix` are left out.
    """
    folder = Path(folder)
    h = hashlib.sha256()
    if head is not None and (folder / head).is_file():
        update_from_file(h, folder / head)
    for f in sorted(folder.iterdir()):
        if f.is_file() and not (skip_prefix and f.name.startswith(skip_prefix)):
            h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
    return h.hexdigest()


def named_files_digest(files: Iterable[tuple[str, Path]]) -> str:
    """Hex SHA-256 over (name, file) pairs in the given order: each name, a NUL, then the file's bytes."""
    h = hashlib.sha256()
    for name, path in files:
        h.update(name.encode() + b"\0")
        update_from_file(h, path)
    return h.hexdigest()


def fingerprint(*parts: Any) -> str:
    """Short sha256 of JSON-serialisable parts (configs, file hashes)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def code_digest() -> str:
    """sha256 of this package's code and packaged configs: any change to the tool re-runs the stages."""
    root = Path(__file__).parent
    files = sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml"))
    return named_files_digest((str(f.relative_to(root)), f) for f in files)
