"""Loading a deployment: follow CURRENT, fetch the release once into a local cache keyed by the sha256
of its manifest, verify it once and record that, so a later start does not hash it again.

Cache layout (``cache_dir``, default layout.cache_root()/deployments)::

    <manifest-sha256>/                 a downloaded release: its files and manifest.json
    <manifest-sha256>/.verified.json   size and mtime of every file as verified
    verified/<manifest-sha256>-<h>.json  the same record for a local release used in place (h: its path)
    .locks/<manifest-sha256>/          the lock (locking.OutputLock) of the loader downloading it
    .partial-<manifest-sha256>-<id>/   a download in progress, renamed to <manifest-sha256>/ when verified
    .partial-<manifest-sha256>-trash-<id>/  a cached copy that failed its record, being deleted

A later load only compares sizes and mtimes with the record. A difference (a cached file changed or
gone) means the copy is not the verified one: a download is fetched again, a local release is hashed
again. Several loaders at once: one downloads under the lock, the others wait for it and reuse the result.

Only the holder of a digest's lock writes its ``.partial-<digest>-*`` folders, so a loader that can take
that lock (free, or left by a process that is gone) knows they are leftovers of a killed fetch: every
load removes those, and leaves alone the ones whose lock a live loader holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import time
import uuid
from contextlib import suppress
from pathlib import Path

from .atomic import replace_folder, write_text
from .errors import UserError
from .layout import DEPLOY_CACHE_DIR, MANIFEST_FILE, RELEASES_DIR, cache_root
from .releases import PARTIAL_PREFIX, describe_failure, resolve, verify_files
from .storage import is_local, open_fs, redact, storage_errors

VERIFIED_FILE = ".verified.json"
LOCKS_DIR = ".locks"
VERIFIED_DIR = "verified"
LOCK_POLL_S = 0.2
LOCK_WAIT_S = 4 * 3600.0  # a live loader downloading a large release may hold the lock this long
_DIGEST = re.compile(r"[0-9a-f]{64}")
_OWNED = re.compile(re.escape(PARTIAL_PREFIX) + r"([0-9a-f]{64})-")  # a fetch's folder: its digest
_OLD_TRASH = PARTIAL_PREFIX + "trash-"  # trash named without its digest by earlier versions: nobody's


def default_cache_dir() -> Path:
    """Where downloaded releases are kept: $MOLE_CACHE_DIR/deployments (or ~/.cache/mole-trainer/...)."""
    return cache_root() / DEPLOY_CACHE_DIR


def _stats(root: Path, manifest: dict) -> dict | None:
    out = {}
    for entry in manifest["files"]:
        try:
            st = (root / entry["path"]).stat()
        except OSError:
            return None
        out[entry["path"]] = [st.st_size, st.st_mtime_ns]
    return out


def _record_matches(record: Path, root: Path, manifest: dict, digest: str) -> bool:
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(data, dict)
        and data.get("manifest_sha256") == digest
        and data.get("files") == _stats(root, manifest)
    )


def _write_record(record: Path, root: Path, manifest: dict, digest: str) -> None:
    record.parent.mkdir(parents=True, exist_ok=True)
    write_text(record, json.dumps({"manifest_sha256": digest, "files": _stats(root, manifest)}) + "\n")


def _local_fs():
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem()


def _verify_in_place(root: Path, manifest: dict, digest: str, cache: Path, shown: str) -> None:
    record = (
        cache
        / VERIFIED_DIR
        / f"{digest}-{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]}.json"
    )
    if _record_matches(record, root, manifest, digest):
        return
    report = verify_files(_local_fs(), str(root), manifest)
    if not report["ok"]:
        raise UserError(describe_failure(shown, report))
    with suppress(OSError):  # a read-only cache only costs hashing again next time
        _write_record(record, root, manifest, digest)


def fetch_folder(cache: Path, digest: str, kind: str = "") -> Path:
    """A new folder name private to the fetch of `digest` holding its lock (kind: "" or "trash-")."""
    return cache / f"{PARTIAL_PREFIX}{digest}-{kind}{uuid.uuid4().hex[:8]}"


def sweep_leftovers(cache: Path) -> list[str]:
    """Remove the partial downloads and trash that killed fetches left in `cache`; the names removed.

    A digest's folders are left alone while a live loader (this process or another) holds its lock.
    Best effort: a cache that cannot be read or written is left as it is.
    """
    from .locking import OutputLock

    try:
        names = sorted(os.listdir(cache))
    except OSError:
        return []
    with suppress(OSError):
        names += [f"{LOCKS_DIR}/{d}" for d in sorted(os.listdir(cache / LOCKS_DIR)) if _DIGEST.fullmatch(d)]
    owned: dict[str, list[str]] = {}
    removed = []
    for name in names:
        if name.startswith(_OLD_TRASH):
            shutil.rmtree(cache / name, ignore_errors=True)
            removed.append(name)
        elif match := _OWNED.match(name):
            owned.setdefault(match.group(1), []).append(name)
        elif name.startswith(LOCKS_DIR + "/"):  # a lock folder a killed loader left, maybe with no folders
            owned.setdefault(name.removeprefix(LOCKS_DIR + "/"), [])
    for digest, folders in owned.items():
        lock_folder = cache / LOCKS_DIR / digest
        try:
            lock = OutputLock(lock_folder, "deploy.sweep", renew_every=None).acquire()
        except UserError:  # held by a live loader (LockHeld), or a read-only cache
            continue
        try:
            for name in folders:
                shutil.rmtree(cache / name, ignore_errors=True)
                removed.append(name)
        finally:
            lock.release()
        with suppress(OSError):  # a dead loader's lock folder; a loader that finds it gone makes it again
            lock_folder.rmdir()
    return removed


def _wait_for_lock(folder: Path, ready) -> object | None:
    """The download lock of `folder`, or None once `ready()` says another loader finished the work."""
    from .locking import LockHeld, OutputLock

    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            return OutputLock(folder, "deploy.load").acquire()
        except LockHeld as held:
            if ready():
                return None
            if time.monotonic() > deadline:
                raise UserError(f"gave up waiting for another loader: {held}") from None
            time.sleep(LOCK_POLL_S)


def _download(fs, target: dict, cache: Path, digest: str, shown: str) -> None:
    """Fetch and verify a release into a private folder, then put it in place as ``cache/digest``
    (the caller holds the digest's lock)."""
    manifest = target["manifest"]
    partial = fetch_folder(cache, digest)
    try:
        for entry in manifest["files"]:
            local = partial / entry["path"]
            local.parent.mkdir(parents=True, exist_ok=True)
            with suppress(FileNotFoundError):  # reported as missing by the check below
                fs.get_file(posixpath.join(target["root"], entry["path"]), str(local))
        (partial / MANIFEST_FILE).write_bytes(target["manifest_bytes"])
        report = verify_files(_local_fs(), str(partial), manifest)
        if not report["ok"]:
            raise UserError(describe_failure(shown, report) + " (as downloaded)")
        _write_record(partial / VERIFIED_FILE, partial, manifest, digest)
        # a cached copy that no longer matches its record goes aside first
        replace_folder(partial, cache / digest, fetch_folder(cache, digest, "trash-"))
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _fetch(fs, target: dict, cache: Path, digest: str, shown: str) -> Path:
    manifest = target["manifest"]
    final = cache / digest
    record = final / VERIFIED_FILE

    def ready() -> bool:
        return _record_matches(record, final, manifest, digest)

    if ready():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    lock_folder = cache / LOCKS_DIR / digest
    try:
        lock = _wait_for_lock(lock_folder, ready)
        if lock is not None:
            try:
                if not ready():  # else done by the loader that held the lock before us
                    _download(fs, target, cache, digest, shown)
            finally:
                lock.release()
    finally:
        # Every loader that touched the lock folder tries this when it leaves, so the last one removes it
        # (the lock's own rule, "who made it removes it", misses when a waiter is writing in it just then).
        # A loader that finds it gone makes it again.
        with suppress(OSError):
            lock_folder.rmdir()
    return final


def load_deployment(dest: str, cache_dir: str | Path | None = None) -> dict:
    """Verified local paths of a deployment:
    {"root", "router", "experts", "label_map", "manifest", "release"}.

    Follows DEST/CURRENT (a flat-layout deployment, with manifest.json at DEST, loads as before with
    release None). A local release is used in place; a remote one is downloaded once into
    ``cache_dir`` (module docstring), after removing what killed fetches left there. Either is hashed
    against its manifest the first time only; a file that does not match is a UserError naming it.
    """
    fs, root = open_fs(dest)
    shown = redact(dest)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    sweep_leftovers(cache)
    with storage_errors(dest, f"loading the deployment (local cache {cache})"):
        target = resolve(fs, root, shown)
        where = f"{shown}/{RELEASES_DIR}/{target['release']}" if target["release"] else shown
        digest = hashlib.sha256(target["manifest_bytes"]).hexdigest()
        if is_local(fs):
            local_root = Path(target["root"])
            _verify_in_place(local_root, target["manifest"], digest, cache, where)
        else:
            local_root = _fetch(fs, target, cache, digest, where)
    manifest = target["manifest"]
    return {
        "root": str(local_root),
        "router": str(local_root / manifest["router"]),
        "experts": {name: str(local_root / rel) for name, rel in manifest["experts"].items()},
        "label_map": manifest["label_map"],
        "manifest": manifest,
        "release": target["release"],
    }
