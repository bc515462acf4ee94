"""Deploying the router and expert adapters to a storage destination (a local folder or any fsspec URL).

Layout at DEST (names from layout.py)::

    manifest.json                        every file below with size and sha256, written last
    label_map.json                       expert name -> router class index
    routing/adapter/                     the router adapter folder, plus label_map.json
    loras/<expert>/adapter/              each expert adapter folder
    loras/<expert>/deploy_metadata.json  caller metadata + expert name + deployed_at

The manifest is the commit marker: a folder without manifest.json is not (yet) a deployment, and a
deployment is valid when every file matches its manifest entry (verify_deployment).
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import posixpath
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import UserError
from .hashing import sha256_file, sha256_stream
from .layout import (
    DEPLOY_EXPERT_ADAPTER,
    DEPLOY_EXPERTS_DIR,
    DEPLOY_METADATA_FILE,
    DEPLOY_ROUTER_DIR,
    LABEL_MAP_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
)

MANIFEST_FORMAT = 1
ADAPTER_CONFIG = "adapter_config.json"
_STAGING_PREFIX = ".staging-"
_PREVIOUS = ".previous"
# marker inside .previous: every old entry has been moved out and new ones are being moved in
_MOVED_OUT = ".moved-out"
# the top-level names a deployment owns at DEST, manifest first (moved out first, moved in last)
_ENTRIES = (MANIFEST_FILE, LABEL_MAP_FILE, DEPLOY_ROUTER_DIR.split("/")[0], DEPLOY_EXPERTS_DIR.split("/")[0])
# protocol -> fsspec extra that installs its implementation
_FSSPEC_EXTRAS = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gcs",
    "gcs": "gcs",
    "az": "abfs",
    "abfs": "abfs",
    "abfss": "abfs",
}


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, default=str) + "\n").encode("utf-8")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class _File:
    """One file of a deployment: copied from ``src`` or written from ``data``."""

    rel: str
    src: Path | None = None
    data: bytes | None = None

    def describe(self) -> dict:
        if self.data is not None:
            return {"path": self.rel, "size": len(self.data), "sha256": hashlib.sha256(self.data).hexdigest()}
        return {"path": self.rel, "size": self.src.stat().st_size, "sha256": sha256_file(self.src)}


# ---------------------------------------------------------------- validation


def _check_adapter_dir(path: str | Path, what: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{folder}: {what} folder does not exist")
    if not (folder / ADAPTER_CONFIG).is_file():
        raise UserError(f"{folder}: {what} folder has no {ADAPTER_CONFIG}; expected a PEFT adapter folder")
    return folder


def _check_names(experts: dict[str, str], label_map: dict[str, int], metadata: dict[str, dict]) -> list[str]:
    """Validate experts against the label map; return the expert names in label-index order."""
    if not experts:
        raise UserError("deploy: no experts given; a deployment needs at least one expert adapter")
    only_experts = sorted(set(experts) - set(label_map))
    only_map = sorted(set(label_map) - set(experts))
    if only_experts or only_map:
        raise UserError(
            "deploy: experts and label map disagree: "
            f"experts missing from the label map: {only_experts}; label-map entries with no expert: {only_map}"
        )
    indices = list(label_map.values())
    integral = all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in indices)
    if not integral or sorted(indices) != list(range(len(indices))):
        raise UserError(
            f"deploy: label map indices must be the integers 0..{len(indices) - 1}, each once; got {indices}"
        )
    for name in experts:
        if not name or name.startswith(".") or "/" in name or "\\" in name:
            raise UserError(
                f"deploy: expert name {name!r} cannot be a folder name (no slashes, no leading dot)"
            )
    unknown = sorted(set(metadata) - set(experts))
    if unknown:
        raise UserError(f"deploy: metadata given for unknown experts: {unknown}")
    return sorted(experts, key=label_map.__getitem__)


# ---------------------------------------------------------------- plan and manifest


def _folder_files(folder: Path, rel_prefix: str) -> list[_File]:
    return [
        _File(f"{rel_prefix}/{path.relative_to(folder).as_posix()}", src=path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.startswith(LOCK_FILE)  # a training run's lock is not deployed
    ]


def _plan(
    router: Path,
    expert_dirs: dict[str, Path],
    order: list[str],
    label_map: dict,
    metadata: dict,
    deployed_at: str,
) -> list[_File]:
    files: dict[str, _File] = {}

    def add(entries: list[_File]) -> None:
        # later entries win: a label_map.json already inside the router folder is replaced by ours
        files.update((f.rel, f) for f in entries)

    label_bytes = _json_bytes(label_map)
    add(_folder_files(router, DEPLOY_ROUTER_DIR))
    add(
        [
            _File(f"{DEPLOY_ROUTER_DIR}/{LABEL_MAP_FILE}", data=label_bytes),
            _File(LABEL_MAP_FILE, data=label_bytes),
        ]
    )
    for name in order:
        base = f"{DEPLOY_EXPERTS_DIR}/{name}"
        meta = {**metadata.get(name, {}), "expert": name, "deployed_at": deployed_at}
        add(_folder_files(expert_dirs[name], f"{base}/{DEPLOY_EXPERT_ADAPTER}"))
        add([_File(f"{base}/{DEPLOY_METADATA_FILE}", data=_json_bytes(meta))])
    return list(files.values())


def _manifest(files: list[_File], order: list[str], label_map: dict, deployed_at: str, extra: dict) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "created_at": deployed_at,
        "router": DEPLOY_ROUTER_DIR,
        "experts": {name: f"{DEPLOY_EXPERTS_DIR}/{name}/{DEPLOY_EXPERT_ADAPTER}" for name in order},
        "label_map": label_map,
        "files": [f.describe() for f in files],
        "extra": extra,
    }


# ---------------------------------------------------------------- filesystems


def _open_fs(url: str):
    """(fsspec filesystem, path) for a URL or local path; a missing protocol package is a UserError."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(str(url))
    except ImportError as exc:
        protocol = str(url).split("://", 1)[0]
        extra = _FSSPEC_EXTRAS.get(protocol)
        if extra == "s3":
            hint = "pip install 'mole-trainer[s3]'"
        elif extra:
            hint = f"pip install 'fsspec[{extra}]'"
        else:
            hint = f"install the fsspec implementation of {protocol}://"
        raise UserError(
            f"{url}: {protocol}:// needs a package that is not installed ({exc}); {hint}"
        ) from exc
    except ValueError as exc:
        raise UserError(f"{url}: {exc}") from exc


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _put_one(fs, file: _File, target: str) -> None:
    fs.makedirs(posixpath.dirname(target), exist_ok=True)
    if file.data is not None:
        fs.pipe_file(target, file.data)
    else:
        fs.put_file(str(file.src), target)


def _remove_stale_staging(fs, root: str) -> None:
    # left behind by a deploy that was killed; deploys into one DEST must not run concurrently
    for path in fs.glob(posixpath.join(root, _STAGING_PREFIX + "*")):
        fs.rm(path, recursive=True)


# ---------------------------------------------------------------- local swap


def _remove_local(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _recover_local(root: Path) -> None:
    """Finish or roll back a swap that was interrupted, by an exception now or a crash earlier."""
    previous = root / _PREVIOUS
    if not previous.exists():
        return
    if not (root / MANIFEST_FILE).exists():
        if (previous / _MOVED_OUT).exists():
            # new entries were being moved in: drop them; the marker goes only once they are gone
            for name in _ENTRIES:
                _remove_local(root / name)
            (previous / _MOVED_OUT).unlink()
        for name in _ENTRIES:
            if (previous / name).exists():
                os.replace(previous / name, root / name)
    # with a manifest in place the swap completed (the manifest goes in last): .previous is the old one
    shutil.rmtree(previous)


def _prepare_local(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: deploy destination exists and is not a folder")
    root.mkdir(parents=True, exist_ok=True)
    _recover_local(root)
    foreign = [name for name in _ENTRIES if (root / name).exists()]
    if foreign and not (root / MANIFEST_FILE).exists():
        raise UserError(
            f"{root}: holds {foreign} but no {MANIFEST_FILE}; it is not a mole-trainer deployment, "
            "refusing to replace it (choose an empty or new destination)"
        )


def _swap_local(root: Path, staging: Path) -> None:
    previous = root / _PREVIOUS
    previous.mkdir()
    try:
        for name in _ENTRIES:
            if (root / name).exists():
                os.replace(root / name, previous / name)
        (previous / _MOVED_OUT).touch()
        for name in reversed(_ENTRIES):
            os.replace(staging / name, root / name)
    except BaseException:
        _recover_local(root)
        raise
    shutil.rmtree(previous)


# ---------------------------------------------------------------- remote publish


def _publish_remote(fs, root: str, staging: str, manifest: dict, manifest_bytes: bytes) -> None:
    old = _read_manifest(fs, root, root, required=False)
    old_files = {entry["path"] for entry in old["files"]} if old else set()
    manifest_path = posixpath.join(root, MANIFEST_FILE)
    if fs.exists(manifest_path):
        fs.rm_file(manifest_path)  # DEST is uncommitted from here until the new manifest lands
    new_files = [entry["path"] for entry in manifest["files"]]
    for rel in new_files:
        target = posixpath.join(root, rel)
        fs.makedirs(posixpath.dirname(target), exist_ok=True)
        fs.copy(posixpath.join(staging, rel), target)
    for rel in sorted(old_files - set(new_files)):
        if fs.exists(posixpath.join(root, rel)):
            fs.rm_file(posixpath.join(root, rel))
    fs.pipe_file(manifest_path, manifest_bytes)


# ---------------------------------------------------------------- deploy


def deploy(
    router_dir: str | Path,
    experts: dict[str, str],
    label_map: dict[str, int],
    dest: str,
    metadata: dict[str, dict] | None = None,
    extra: dict | None = None,
) -> dict:
    """Deploy the router and expert adapters to ``dest`` (local path or fsspec URL); return the manifest.

    Everything is first written to ``DEST/.staging-<id>/`` with the manifest last; nothing already
    at DEST changes until staging is complete, and a failure while staging leaves DEST as it was.

    Local destinations: the staged entries (manifest.json, label_map.json, routing/, loras/) replace
    the old ones by renames on one filesystem. The old entries are moved to ``DEST/.previous/``
    (manifest.json first), the new ones moved in (manifest.json last), then ``.previous`` is
    deleted. So DEST either has no manifest.json, for the few renames of the swap, or a manifest
    that matches every file: readers that go through the manifest (load_deployment) never get a
    mix of two deployments or a half-written one; one racing the swap gets a UserError (retry). An error during the swap rolls back to the old
    deployment; a swap interrupted by a crash is finished or rolled back by the next deploy.
    Other files in DEST are left alone.

    Remote destinations (s3://, gs://, ... with the fsspec implementation installed): the old
    manifest is deleted, the staged files are copied into place, files only the old deployment had
    are removed, and the new manifest is written last. A failure part-way leaves DEST without a
    manifest (no valid deployment) until the next deploy succeeds.

    Deploys into one DEST must not run concurrently.
    """
    router = _check_adapter_dir(router_dir, "router adapter")
    expert_dirs = {
        name: _check_adapter_dir(path, f"expert {name!r} adapter") for name, path in experts.items()
    }
    metadata = metadata or {}
    order = _check_names(experts, label_map, metadata)
    ordered_map = {name: int(label_map[name]) for name in order}
    deployed_at = _now()
    files = _plan(router, expert_dirs, order, ordered_map, metadata, deployed_at)
    manifest = _manifest(files, order, ordered_map, deployed_at, extra or {})
    manifest_bytes = _json_bytes(manifest)

    fs, root = _open_fs(dest)
    try:
        _publish(fs, root, files, manifest, manifest_bytes)
    except OSError as exc:
        raise UserError(f"{dest}: deploy failed: {exc}") from exc
    return manifest


def _publish(fs, root: str, files: list[_File], manifest: dict, manifest_bytes: bytes) -> None:
    local = _is_local(fs)
    if local:
        _prepare_local(Path(root))
    _remove_stale_staging(fs, root)
    staging = posixpath.join(root, f"{_STAGING_PREFIX}{uuid.uuid4().hex[:12]}")
    try:
        for file in files:
            _put_one(fs, file, posixpath.join(staging, file.rel))
        fs.pipe_file(posixpath.join(staging, MANIFEST_FILE), manifest_bytes)
        if local:
            _swap_local(Path(root), Path(staging))
        else:
            _publish_remote(fs, root, staging, manifest, manifest_bytes)
    finally:
        if fs.exists(staging):
            fs.rm(staging, recursive=True)


# ---------------------------------------------------------------- reading a deployment


def _check_rel(rel: Any, where: str) -> str:
    path = PurePosixPath(rel) if isinstance(rel, str) else None
    if path is None or path.is_absolute() or ".." in path.parts or not path.parts:
        raise UserError(f"{where}: bad path {rel!r} in {MANIFEST_FILE}; expected a relative path inside DEST")
    return rel


def _check_manifest(manifest: dict, where: str) -> None:
    for entry in manifest["files"]:
        _check_rel(entry["path"], where)
        if not isinstance(entry["size"], int) or not isinstance(entry["sha256"], str):
            raise TypeError(f"file entry {entry['path']!r} needs an integer size and a sha256 string")
    _check_rel(manifest["router"], where)
    for rel in manifest["experts"].values():
        _check_rel(rel, where)
    if not isinstance(manifest["label_map"], dict):
        raise TypeError("label_map is not an object")


def _read_manifest(fs, root: str, dest: str, required: bool = True) -> dict | None:
    path = posixpath.join(root, MANIFEST_FILE)
    if not fs.exists(path):
        if not required:
            return None
        raise UserError(f"{dest}: no {MANIFEST_FILE}; not a deployment (or a deploy into it is in progress)")
    where = f"{dest}/{MANIFEST_FILE}"
    try:
        manifest = json.loads(fs.cat_file(path))
        _check_manifest(manifest, where)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{where}: not a valid deployment manifest ({exc!r})") from exc
    return manifest


def _verify(fs, root: str, manifest: dict) -> dict:
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
    return {
        "ok": not mismatched and not missing,
        "files": len(manifest["files"]),
        "mismatched": mismatched,
        "missing": missing,
    }


def verify_deployment(dest: str) -> dict:
    """Recompute every checksum listed in DEST/manifest.json.

    Returns {"ok", "files" (count), "mismatched" (paths whose size or sha256 differ), "missing"}.
    A missing or malformed manifest is a UserError.
    """
    fs, root = _open_fs(dest)
    return _verify(fs, root, _read_manifest(fs, root, dest))


def _default_cache_dir(dest: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mole-trainer" / "deployments" / hashlib.sha256(dest.encode()).hexdigest()[:16]


def _download(fs, root: str, dest: str, local_root: Path) -> None:
    """Fetch the files of the remote manifest that the cache lacks or holds in another version."""
    manifest_path = posixpath.join(root, MANIFEST_FILE)
    manifest = _read_manifest(fs, root, dest)
    for entry in manifest["files"]:
        local = local_root / entry["path"]
        if (
            local.is_file()
            and local.stat().st_size == entry["size"]
            and sha256_file(local) == entry["sha256"]
        ):
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(posixpath.join(root, entry["path"]), str(local))
    (local_root / MANIFEST_FILE).write_bytes(fs.cat_file(manifest_path))


def load_deployment(dest: str, cache_dir: str | Path | None = None) -> dict:
    """Verified local paths of a deployment: {"root", "router", "experts", "label_map", "manifest"}.

    Local destinations are used in place. Remote ones are downloaded first into ``cache_dir``
    (default: ~/.cache/mole-trainer/deployments/<hash of dest>), fetching only changed files. Any
    file that does not match the manifest is a UserError.
    """
    fs, root = _open_fs(dest)
    if _is_local(fs):
        local_root = Path(root)
    else:
        local_root = Path(cache_dir) if cache_dir is not None else _default_cache_dir(dest)
        try:
            _download(fs, root, dest, local_root)
        except OSError as exc:
            raise UserError(f"{dest}: download to {local_root} failed: {exc}") from exc
    local_fs, local_path = _open_fs(str(local_root))
    manifest = _read_manifest(local_fs, local_path, dest)
    report = _verify(local_fs, local_path, manifest)
    if not report["ok"]:
        raise UserError(
            f"{local_root}: deployment does not match its {MANIFEST_FILE}: "
            f"missing {report['missing']}, changed {report['mismatched']}"
        )
    return {
        "root": str(local_root),
        "router": str(local_root / manifest["router"]),
        "experts": {name: str(local_root / rel) for name, rel in manifest["experts"].items()},
        "label_map": manifest["label_map"],
        "manifest": manifest,
    }
