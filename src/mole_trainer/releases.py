"""Immutable releases at a deploy destination, and the CURRENT pointer that readers follow.

Layout at DEST (a local folder or any fsspec URL; names from layout.py)::

    CURRENT                              {"release", "manifest_sha256", "previous": [...], ...}
    releases/<release-id>/manifest.json  every file below with size and sha256 (written last)
    releases/<release-id>/label_map.json
    releases/<release-id>/routing/adapter/...
    releases/<release-id>/loras/<expert>/adapter/...  + loras/<expert>/deploy_metadata.json

A release is never changed once its manifest is written; a folder under releases/ without a manifest
is an incomplete upload. CURRENT is one small object, replaced whole (an object PUT, or an atomic
rename on a local folder): readers see the old or the new release, never a mix. ``previous`` lists
the releases CURRENT named before, newest first; rollback returns to previous[0].

A deployment in the older flat layout (manifest.json at DEST itself, no CURRENT) is still read.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import time
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from .atomic import write_bytes
from .errors import UserError
from .hashing import sha256_stream
from .layout import CURRENT_FILE, MANIFEST_FILE, RELEASES_DIR
from .storage import is_local, open_fs, redact

CURRENT_FORMAT = 1
PREVIOUS_KEPT = 20  # releases remembered in CURRENT for rollback
# an incomplete remote release younger than this may be a deploy still uploading: gc leaves it
INCOMPLETE_GRACE_S = 3600.0
PARTIAL_PREFIX = ".partial-"  # a local release being written, renamed to its id when complete
_ID_TIME = "%Y%m%dT%H%M%S"
_ID_RE = re.compile(r"^(\d{8}T\d{6})(\d{3})Z-[0-9a-f]{8,}$")


def json_bytes(obj: Any) -> bytes:
    """Indented JSON text with a final newline, as bytes (manifests, CURRENT, metadata)."""
    return (json.dumps(obj, indent=2, default=str) + "\n").encode("utf-8")


def now_iso() -> str:
    """UTC now, ISO 8601 to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_release_id(content_digest: str, when: datetime | None = None) -> str:
    """Sortable release id: UTC time of the deploy to the millisecond, then 8 hex digits of the content
    digest, e.g. 20261130T084111123Z-68bfdd94."""
    when = when or datetime.now(UTC)
    return f"{when.strftime(_ID_TIME)}{when.microsecond // 1000:03d}Z-{content_digest[:8]}"


def release_time(release: str) -> float | None:
    """Seconds since the epoch encoded in a release id; None for a name that is not a release id."""
    m = _ID_RE.match(release)
    if not m:
        return None
    return datetime.strptime(m[1], _ID_TIME).replace(tzinfo=UTC).timestamp() + int(m[2]) / 1000


def check_release_name(release: str) -> str:
    """A release id given by a user must be one folder name."""
    if not release or release.startswith(".") or "/" in release or "\\" in release:
        raise UserError(f"{release!r}: not a release id (expected a name listed by `mole deploy list`)")
    return release


# ---------------------------------------------------------------- manifests


def _check_rel(rel: Any, where: str) -> str:
    path = PurePosixPath(rel) if isinstance(rel, str) else None
    if path is None or path.is_absolute() or ".." in path.parts or not path.parts:
        raise UserError(f"{where}: bad path {rel!r}; expected a relative path inside the release")
    return rel


def parse_manifest(data: bytes, where: str) -> dict:
    """A manifest from its bytes; anything malformed is a UserError naming `where`."""
    try:
        manifest = json.loads(data)
        for entry in manifest["files"]:
            _check_rel(entry["path"], where)
            if not isinstance(entry["size"], int) or not isinstance(entry["sha256"], str):
                raise TypeError(f"file entry {entry['path']!r} needs an integer size and a sha256 string")
        _check_rel(manifest["router"], where)
        for rel in manifest["experts"].values():
            _check_rel(rel, where)
        if not isinstance(manifest["label_map"], dict):
            raise TypeError("label_map is not an object")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{where}: not a valid deployment manifest ({exc!r})") from exc
    return manifest


def verify_files(fs, root: str, manifest: dict, progress=None) -> dict:
    """Re-read every file of `manifest` below `root`: {"ok", "files", "mismatched", "missing"}."""
    mismatched, missing = [], []
    for entry in manifest["files"]:
        path = posixpath.join(root, entry["path"])
        if not fs.isfile(path):
            missing.append(entry["path"])
            continue
        with fs.open(path, "rb") as fh:
            same = fs.size(path) == entry["size"] and sha256_stream(fh) == entry["sha256"]
        if not same:
            mismatched.append(entry["path"])
        if progress is not None:
            progress(entry["path"])
    return {
        "ok": not mismatched and not missing,
        "files": len(manifest["files"]),
        "mismatched": mismatched,
        "missing": missing,
    }


def describe_failure(where: str, report: dict) -> str:
    """One message naming every file that is missing or changed."""
    parts = []
    if report["mismatched"]:
        parts.append("changed (size or sha256 differ from the manifest): " + ", ".join(report["mismatched"]))
    if report["missing"]:
        parts.append("missing: " + ", ".join(report["missing"]))
    return f"{where}: release does not match its {MANIFEST_FILE}: " + "; ".join(parts)


# ---------------------------------------------------------------- CURRENT


def read_current(fs, root: str, shown: str) -> dict | None:
    """DEST's CURRENT pointer, or None when there is none; a malformed one is a UserError."""
    path = posixpath.join(root, CURRENT_FILE)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        current = json.loads(data)
        check_release_name(current["release"])
        if not isinstance(current.get("previous", []), list):
            raise TypeError("previous is not a list")
    except (ValueError, KeyError, TypeError, UserError) as exc:
        raise UserError(
            f"{shown}/{CURRENT_FILE}: not a release pointer ({exc}); expected JSON naming a release"
        ) from exc
    return current


def write_current(fs, root: str, current: dict) -> None:
    """Replace CURRENT whole: an object PUT remotely, a rename of a synced file locally."""
    data = json_bytes(current)
    target = posixpath.join(root, CURRENT_FILE)
    if not is_local(fs):
        fs.pipe_file(target, data)
        return
    write_bytes(target, data, durable=True)


def pointer(release: str, manifest_sha256: str, previous: list[str], action: str) -> dict:
    """The content of CURRENT naming `release` (previous: the releases named before, newest first)."""
    return {
        "format": CURRENT_FORMAT,
        "release": release,
        "manifest_sha256": manifest_sha256,
        "previous": [p for p in previous if p != release][:PREVIOUS_KEPT],
        "updated_at": now_iso(),
        "action": action,
    }


# ---------------------------------------------------------------- resolving what readers load


def release_root(root: str, release: str) -> str:
    """Path of release `release` below DEST's path `root`."""
    return posixpath.join(root, RELEASES_DIR, check_release_name(release))


def read_release_manifest(fs, root: str, release: str, shown: str) -> tuple[bytes, dict]:
    """(bytes, parsed) of a release's manifest; a release without one is incomplete (UserError)."""
    where = f"{shown}/{RELEASES_DIR}/{release}/{MANIFEST_FILE}"
    try:
        data = fs.cat_file(posixpath.join(release_root(root, release), MANIFEST_FILE))
    except FileNotFoundError:
        if fs.isdir(release_root(root, release)):
            raise UserError(
                f"{where}: missing; release {release} is incomplete (its upload did not finish)"
            ) from None
        raise UserError(f"{shown}: no release {release} (see `mole deploy list`)") from None
    return data, parse_manifest(data, where)


def resolve(fs, root: str, shown: str, release: str | None = None) -> dict:
    """What a reader of DEST loads: {"release", "root", "manifest_bytes", "manifest", "current"}.

    Without `release`: the release CURRENT names, whose manifest must still have the digest CURRENT
    recorded; with no CURRENT, a flat-layout deployment at DEST itself (release None).
    """
    current = read_current(fs, root, shown)
    if release is None and current is None:
        flat = posixpath.join(root, MANIFEST_FILE)
        if fs.isfile(flat):
            data = fs.cat_file(flat)
            return {
                "release": None,
                "root": root,
                "manifest_bytes": data,
                "manifest": parse_manifest(data, f"{shown}/{MANIFEST_FILE}"),
                "current": None,
            }
        found = [r["release"] for r in list_releases(fs, root, shown)["releases"]] if fs.exists(root) else []
        hint = f"; releases here: {', '.join(found)} (`mole deploy promote`)" if found else ""
        raise UserError(
            f"{shown}: no {CURRENT_FILE} and no {MANIFEST_FILE}; not a deployment, or its first deploy has "
            f"not finished{hint}"
        )
    name = release or current["release"]
    data, manifest = read_release_manifest(fs, root, name, shown)
    if release is None and current.get("manifest_sha256") not in (None, hashlib.sha256(data).hexdigest()):
        raise UserError(
            f"{shown}/{RELEASES_DIR}/{name}/{MANIFEST_FILE}: changed since it was deployed (its sha256 differs "
            f"from the one {CURRENT_FILE} recorded)"
        )
    return {
        "release": name,
        "root": release_root(root, name),
        "manifest_bytes": data,
        "manifest": manifest,
        "current": current,
    }


# ---------------------------------------------------------------- list, verify, promote, rollback, gc


def _release_names(fs, root: str) -> list[str]:
    base = posixpath.join(root, RELEASES_DIR)
    try:
        entries = fs.ls(base, detail=True)
    except FileNotFoundError:
        return []
    names = []
    for e in entries:
        name = posixpath.basename(e["name"].rstrip("/"))
        if e["type"] == "directory" and not name.startswith("."):
            names.append(name)
    return sorted(names)


def list_releases(fs, root: str, shown: str) -> dict:
    """{"current", "previous", "flat", "releases": [{release, complete, current, previous, created_at,
    experts, files, bytes}]} oldest first."""
    if not fs.exists(root):
        raise UserError(f"{shown}: not found (expected a deploy destination)")
    current = read_current(fs, root, shown)
    previous = (current or {}).get("previous") or []
    rows = []
    for name in _release_names(fs, root):
        row = {
            "release": name,
            "complete": False,
            "current": bool(current and current["release"] == name),
            "previous": bool(previous and previous[0] == name),
        }
        try:
            _, manifest = read_release_manifest(fs, root, name, shown)
        except UserError:
            rows.append(row)
            continue
        row.update(
            complete=True,
            created_at=manifest.get("created_at"),
            experts=list(manifest["experts"]),
            files=len(manifest["files"]),
            bytes=sum(e["size"] for e in manifest["files"]),
        )
        rows.append(row)
    return {
        "current": current and current["release"],
        "previous": previous,
        "flat": fs.isfile(posixpath.join(root, MANIFEST_FILE)),
        "releases": rows,
    }


def verify(dest: str, release: str | None = None) -> dict:
    """Recompute every checksum of a release (default: CURRENT's): {"ok", "release", "files",
    "mismatched", "missing"}. A missing release or manifest is a UserError."""
    fs, root = open_fs(dest)
    target = resolve(fs, root, redact(dest), release)
    return {"release": target["release"], **verify_files(fs, target["root"], target["manifest"])}


def _checked(fs, root: str, shown: str, release: str) -> str:
    """Verify a release before CURRENT names it; return its manifest's sha256."""
    data, manifest = read_release_manifest(fs, root, release, shown)
    report = verify_files(fs, release_root(root, release), manifest)
    if not report["ok"]:
        raise UserError(describe_failure(f"{shown}/{RELEASES_DIR}/{release}", report))
    return hashlib.sha256(data).hexdigest()


def promote(dest: str, release: str) -> dict:
    """Point CURRENT at `release` (verified first); the release it named becomes previous[0]."""
    fs, root = open_fs(dest)
    shown = redact(dest)
    check_release_name(release)
    digest = _checked(fs, root, shown, release)
    current = read_current(fs, root, shown)
    previous = ([current["release"]] + current.get("previous", [])) if current else []
    new = pointer(release, digest, previous, "promote")
    write_current(fs, root, new)
    return {**new, "replaced": current and current["release"]}


def rollback(dest: str) -> dict:
    """Point CURRENT back at the release it named before (previous[0], verified first)."""
    fs, root = open_fs(dest)
    shown = redact(dest)
    current = read_current(fs, root, shown)
    if current is None:
        raise UserError(f"{shown}: no {CURRENT_FILE}; nothing was deployed here as a release")
    previous = current.get("previous") or []
    if not previous:
        raise UserError(f"{shown}: release {current['release']} has no previous release to roll back to")
    target = previous[0]
    try:
        digest = _checked(fs, root, shown, target)
    except UserError as exc:
        raise UserError(f"cannot roll back to {target}: {exc}") from exc
    new = pointer(target, digest, previous[1:], "rollback")
    write_current(fs, root, new)
    return {**new, "replaced": current["release"]}


def gc(dest: str, keep: int, now: float | None = None, grace_s: float = INCOMPLETE_GRACE_S) -> dict:
    """Remove all but the newest `keep` complete releases; CURRENT and previous[0] always stay.

    Incomplete releases (no manifest) go too: locally always (a local deploy holds DEST's lock), remotely
    once older than `grace_s` seconds (a younger one may be a deploy still uploading).
    Returns {"removed", "kept", "left_incomplete"}.
    """
    if keep < 0:
        raise UserError(f"--keep {keep}: expected a number >= 0")
    if not grace_s >= 0:
        raise UserError(f"--grace {grace_s}: expected seconds >= 0")
    fs, root = open_fs(dest)
    shown = redact(dest)
    listing = list_releases(fs, root, shown)
    now = time.time() if now is None else now
    complete = [r["release"] for r in listing["releases"] if r["complete"]]
    protected = {listing["current"], *listing["previous"][:1]} - {None}
    kept = set(complete[len(complete) - keep :] if keep else []) | (protected & set(complete))
    removed, young = [], []
    for row in listing["releases"]:
        name = row["release"]
        if name in kept or name in protected:
            continue
        if not row["complete"] and not is_local(fs):
            born = release_time(name)
            if born is None or now - born < grace_s:
                young.append(name)
                continue
        _remove_release(fs, root, name)
        removed.append(name)
    if is_local(fs):
        for partial in Path(root, RELEASES_DIR).glob(PARTIAL_PREFIX + "*"):
            _remove_tree(fs, str(partial))
            removed.append(partial.name)
    return {"removed": removed, "kept": sorted(kept), "left_incomplete": young}


def _remove_release(fs, root: str, release: str) -> None:
    folder = release_root(root, release)
    manifest = posixpath.join(folder, MANIFEST_FILE)
    if fs.exists(manifest):
        fs.rm_file(manifest)  # first: a release removed half-way reads as incomplete, not as damaged
    _remove_tree(fs, folder)


def _remove_tree(fs, folder: str) -> None:
    with suppress(FileNotFoundError):
        fs.rm(folder, recursive=True)
