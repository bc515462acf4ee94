"""Atomic writes of files and folders: a reader sees the old content or the new one, never a part.

A file is written to a temporary sibling (the same folder, so the rename never crosses filesystems) and
renamed over its destination; a folder is written under a temporary name and renamed into place. With
`durable`, the data and then the folder holding the new name are fsync'd, so the result also survives a
power cut, not only a killed process. Local paths only: remote stores write an object whole anyway.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_sibling(dest: str | Path) -> Path:
    """A hidden, unique temporary name next to `dest` (parallel writers never share one)."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}.tmp")


@contextmanager
def replacing(dest: str | Path, durable: bool = False, tmp: str | Path | None = None) -> Iterator[Path]:
    """Yield a temporary path to write; when the block ends, rename it over `dest`.

    On an error in the block the temporary file is removed and `dest` is left as it was. `tmp` names
    the temporary file when a caller needs a particular name (default: temp_sibling(dest)).
    """
    dest = Path(dest)
    tmp = temp_sibling(dest) if tmp is None else Path(tmp)
    try:
        yield tmp
        if durable:
            fsync_file(tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(dest.parent)


def write_bytes(dest: str | Path, data: bytes, durable: bool = False) -> None:
    """Replace `dest` with `data` atomically (module docstring)."""
    with replacing(dest, durable) as tmp:
        tmp.write_bytes(data)


def write_text(dest: str | Path, text: str, durable: bool = False) -> None:
    """Replace `dest` with `text` (UTF-8) atomically."""
    write_bytes(dest, text.encode("utf-8"), durable)


def publish_folder(staging: str | Path, final: str | Path, durable: bool = True) -> None:
    """Rename a completely written folder to `final`, which must not exist (OSError if it does).

    Durable by default: every file and folder below `staging` is on disk before the rename makes it
    visible, and the rename itself is synced.
    """
    if durable:
        fsync_tree(staging)
    os.rename(staging, final)
    if durable:
        fsync_dir(Path(final).parent)


def replace_folder(staging: str | Path, final: str | Path, aside: str | Path, durable: bool = False) -> None:
    """Put the completely written folder `staging` in the place of `final`, which may exist.

    An existing `final` is renamed to `aside`, `staging` renamed to `final`, and only then is `aside`
    deleted: `final` is never a mix of both, and a kill at any moment leaves a complete folder at
    `final`, or at `aside` with `staging` complete beside it. A leftover `aside` is removed first.
    With `durable`, as publish_folder: `staging` is on disk before the renames and they are synced.
    """
    final = Path(final)
    if durable:
        fsync_tree(staging)
    shutil.rmtree(aside, ignore_errors=True)
    if final.exists():
        os.replace(final, aside)
    os.replace(staging, final)
    if durable:
        fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def fsync_file(path: str | Path) -> None:
    """fsync a local file's data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file below a local folder, then every folder bottom-up (the folder itself last):
    what a rename then publishes is on disk, not only in the page cache."""
    for dirpath, _, filenames in os.walk(folder, topdown=False):
        for name in filenames:
            fsync_file(os.path.join(dirpath, name))
        fsync_dir(Path(dirpath))


def fsync_dir(folder: str | Path) -> None:
    """fsync a local folder (its entries: a rename or new file in it survives a power cut); best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
