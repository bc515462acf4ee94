"""Deploying the router and expert adapters as an immutable release (a local folder or any fsspec URL).

``deploy`` uploads everything to ``DEST/releases/<release-id>/`` (layout in releases.py), the manifest
last; reads back what landed and checks it against the manifest; and only then replaces ``DEST/CURRENT``
with one small object naming the new release. Readers follow CURRENT, so a deploy that dies at any
point leaves CURRENT and every earlier release as they were:

- killed while uploading: an incomplete ``releases/<id>/`` (no manifest; locally a
  ``releases/.partial-<id>-*`` folder) that nothing reads, listed as incomplete, removed by gc;
- killed while reading back: a complete release that CURRENT does not name (``mole deploy promote``
  can still publish it, after verifying it again);
- killed while writing CURRENT: the old or the new CURRENT, never a mix (an object PUT is atomic; a
  local CURRENT is replaced by a rename).

Local destinations also write the release under a ``.partial-`` name and rename it into place, so a
local release folder is complete or absent. Deploys into one DEST must not run concurrently (a local
DEST is locked by the deploy stage; object stores have no atomic exclusive create to lock with).
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import posixpath
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .atomic import publish_folder
from .errors import UserError
from .hashing import sha256_file
from .layout import (
    DEPLOY_EXPERT_ADAPTER,
    DEPLOY_EXPERTS_DIR,
    DEPLOY_METADATA_FILE,
    DEPLOY_ROUTER_DIR,
    LABEL_MAP_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    RELEASES_DIR,
)
from .release_cache import load_deployment
from .releases import (
    PARTIAL_PREFIX,
    describe_failure,
    json_bytes,
    new_release_id,
    now_iso,
    pointer,
    read_current,
    release_root,
    verify,
    verify_files,
    write_current,
)
from .storage import is_local, open_fs, redact, storage_errors

__all__ = ["deploy", "load_deployment", "sha256_file", "verify_deployment"]

MANIFEST_FORMAT = 2  # 2: a release (release id, base model, router evaluation, runs, code version)
ADAPTER_CONFIG = "adapter_config.json"
# test hook: a deploy sleeps PAUSE_S after uploading this many files, so a test can kill it mid-upload
PAUSE_ENV = "MOLE_DEPLOY_PAUSE_AFTER_FILES"
PAUSE_S = 600.0
_CURRENT_UNCHANGED = "CURRENT unchanged"


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

    label_bytes = json_bytes(label_map)
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
        add([_File(f"{base}/{DEPLOY_METADATA_FILE}", data=json_bytes(meta))])
    return list(files.values())


def _content_digest(entries: list[dict]) -> str:
    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e["path"]):
        h.update(f"{e['path']}\0{e['sha256']}\n".encode())
    return h.hexdigest()


def _base_model(router: Path) -> str | None:
    from .adapter_info import ADAPTER_INFO_FILE

    try:
        return json.loads((router / ADAPTER_INFO_FILE).read_text()).get("base_model")
    except (OSError, ValueError, AttributeError):
        return None


def _manifest(
    files: list[_File],
    router: Path,
    order: list[str],
    label_map: dict,
    deployed_at: str,
    extra: dict,
    info: dict,
) -> dict:
    from .runinfo import code_version

    entries = [f.describe() for f in files]
    return {
        "format": MANIFEST_FORMAT,
        "release": new_release_id(_content_digest(entries)),
        "created_at": deployed_at,
        "base_model": _base_model(router),
        "router": DEPLOY_ROUTER_DIR,
        "experts": {name: f"{DEPLOY_EXPERTS_DIR}/{name}/{DEPLOY_EXPERT_ADAPTER}" for name in order},
        "label_map": label_map,
        "router_evaluation": info.get("router_evaluation"),
        "runs": info.get("runs"),
        "code_version": code_version(),
        "files": entries,
        "extra": extra,
    }


# ---------------------------------------------------------------- publishing


def _pause_after() -> int | None:
    value = os.environ.get(PAUSE_ENV, "").strip()
    return int(value) if value.isdigit() else None


def _upload(fs, files: list[_File], folder: str, manifest_bytes: bytes) -> None:
    """Every file, then the manifest (the release's commit marker)."""
    local = is_local(fs)
    pause = _pause_after()
    for count, file in enumerate(files, 1):
        target = posixpath.join(folder, file.rel)
        if local:
            fs.makedirs(posixpath.dirname(target), exist_ok=True)
        if file.data is not None:
            fs.pipe_file(target, file.data)
        else:
            fs.put_file(str(file.src), target)
        if count == pause:
            print(
                f"deploy paused after {count} files ({PAUSE_ENV}, a test hook)", file=sys.stderr, flush=True
            )
            time.sleep(PAUSE_S)
    fs.pipe_file(posixpath.join(folder, MANIFEST_FILE), manifest_bytes)


def _publish(fs, root: str, shown: str, files: list[_File], manifest: dict, manifest_bytes: bytes) -> dict:
    current = read_current(fs, root, shown)  # a damaged CURRENT stops the deploy before any upload
    release = manifest["release"]
    final = release_root(root, release)
    if fs.exists(final):
        raise UserError(
            f"{shown}/{RELEASES_DIR}/{release}: exists already (an identical deploy this millisecond?)"
        )
    if is_local(fs):
        Path(root, RELEASES_DIR).mkdir(parents=True, exist_ok=True)
        staging = str(Path(root, RELEASES_DIR, f"{PARTIAL_PREFIX}{release}-{uuid.uuid4().hex[:8]}"))
        try:
            _upload(fs, files, staging, manifest_bytes)
            publish_folder(staging, final)  # durable before it is a release, and before CURRENT names it
        finally:
            if fs.exists(staging):
                fs.rm(staging, recursive=True)
    else:
        try:
            _upload(fs, files, final, manifest_bytes)
        except BaseException:
            _discard(fs, final)
            raise
    report = verify_files(fs, final, manifest)
    if fs.cat_file(posixpath.join(final, MANIFEST_FILE)) != manifest_bytes:
        report["ok"] = False
        report["mismatched"].append(MANIFEST_FILE)
    if not report["ok"]:
        raise UserError(
            describe_failure(f"{shown}/{RELEASES_DIR}/{release}", report) + f"; read back after upload, "
            f"{_CURRENT_UNCHANGED}"
        )
    previous = [current["release"], *current.get("previous", [])] if current else []
    new = pointer(release, hashlib.sha256(manifest_bytes).hexdigest(), previous, "deploy")
    write_current(fs, root, new)
    return new


def _discard(fs, folder: str) -> None:
    """Best effort: remove an upload that failed (an unreferenced folder either way)."""
    try:
        if fs.exists(folder):
            fs.rm(folder, recursive=True)
    except Exception:  # noqa: BLE001 - the original error is what the user needs to see
        pass


# ---------------------------------------------------------------- deploy


def deploy(
    router_dir: str | Path,
    experts: dict[str, str],
    label_map: dict[str, int],
    dest: str,
    metadata: dict[str, dict] | None = None,
    extra: dict | None = None,
    info: dict | None = None,
) -> dict:
    """Deploy the router and expert adapters to ``dest`` as a new release; return its manifest.

    The manifest records every file (size, sha256), the release id, the base model (from the router's
    mole_adapter.json), the code version, and from ``info`` the router's evaluation figures
    ("router_evaluation") and the runs that produced the adapters ("runs"). CURRENT names the new
    release once it is uploaded and read back intact; see the module docstring for what an
    interrupted deploy leaves behind.
    """
    router = _check_adapter_dir(router_dir, "router adapter")
    expert_dirs = {
        name: _check_adapter_dir(path, f"expert {name!r} adapter") for name, path in experts.items()
    }
    metadata = metadata or {}
    order = _check_names(experts, label_map, metadata)
    ordered_map = {name: int(label_map[name]) for name in order}
    deployed_at = now_iso()
    files = _plan(router, expert_dirs, order, ordered_map, metadata, deployed_at)
    manifest = _manifest(files, router, order, ordered_map, deployed_at, extra or {}, info or {})
    manifest_bytes = json_bytes(manifest)

    shown = redact(dest)
    fs, root = open_fs(dest)
    if is_local(fs) and Path(root).exists() and not Path(root).is_dir():
        raise UserError(f"{root}: deploy destination exists and is not a folder")
    with storage_errors(dest, "deploy", _CURRENT_UNCHANGED):
        _publish(fs, root, shown, files, manifest, manifest_bytes)
    return manifest


def verify_deployment(dest: str, release: str | None = None) -> dict:
    """Recompute every checksum of a release (default: the one CURRENT names; a flat deployment: itself).

    Returns {"ok", "release", "files" (count), "mismatched" (paths whose size or sha256 differ),
    "missing"}. A missing release, CURRENT or manifest is a UserError.
    """
    return verify(dest, release)
