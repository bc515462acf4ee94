"""Deploying fake adapter folders as releases: layout, manifest, CURRENT, validation, failures, loading."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import pytest

import mole_trainer
from mole_trainer import deploy as deploy_mod
from mole_trainer import release_cache, releases
from mole_trainer.deploy import deploy, load_deployment, sha256_file, verify_deployment
from mole_trainer.errors import UserError
from mole_trainer.layout import (
    CURRENT_FILE,
    DEPLOY_METADATA_FILE,
    LABEL_MAP_FILE,
    MANIFEST_FILE,
    RELEASES_DIR,
)
from mole_trainer.locking import OutputLock


def make_adapter(folder: Path, blob: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (folder / "adapter_model.safetensors").write_bytes(blob)
    return folder


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch) -> Path:
    """Every load caches below the test's folder."""
    monkeypatch.setenv("MOLE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "deployments"


@pytest.fixture
def src(tmp_path: Path) -> dict:
    router = make_adapter(tmp_path / "src" / "router", b"router-weights")
    (router / LABEL_MAP_FILE).write_text('{"stale": 0}')  # replaced by the deployed label map
    experts = {
        "calendar": str(make_adapter(tmp_path / "src" / "cal", b"cal-weights")),
        "receipt": str(make_adapter(tmp_path / "src" / "rec", b"rec-weights" * 100)),
    }
    return {"router_dir": router, "experts": experts, "label_map": {"receipt": 1, "calendar": 0}}


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_missing_manifest(tmp_path: Path):
    with pytest.raises(UserError, match=f"no {CURRENT_FILE} and no {MANIFEST_FILE}"):
        verify_deployment(str(tmp_path))


def test_label_map_mismatch(src: dict, tmp_path: Path):
    src["label_map"] = {"calendar": 0, "weather": 1}
    with pytest.raises(UserError, match=r"\['receipt'\].*\['weather'\]"):
        deploy(**src, dest=str(tmp_path / "deploy"))
    src["label_map"] = {"calendar": 0, "receipt": 2}
    with pytest.raises(UserError, match="indices"):
        deploy(**src, dest=str(tmp_path / "deploy"))
    assert not (tmp_path / "deploy").exists()


def test_not_an_adapter_folder(src: dict, tmp_path: Path):
    (tmp_path / "empty").mkdir()
    src["experts"]["calendar"] = str(tmp_path / "empty")
    with pytest.raises(UserError, match=f"{tmp_path / 'empty'}.*adapter_config.json"):
        deploy(**src, dest=str(tmp_path / "deploy"))
    src["experts"]["calendar"] = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="does not exist"):
        deploy(**src, dest=str(tmp_path / "deploy"))


def test_missing_protocol_package_names_extra(src: dict, monkeypatch):
    def no_s3(url):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec.core, "url_to_fs", no_s3)
    with pytest.raises(UserError, match=r"mole-trainer\[s3\]"):
        deploy(**src, dest="s3://bucket/deploy")


def second_version(src: dict, tmp_path: Path) -> dict:
    """A new deployment with one expert renamed, so leftovers of the old one are easy to spot."""
    return {
        "router_dir": make_adapter(tmp_path / "src2" / "router", b"router-v2"),
        "experts": {"calendar": src["experts"]["calendar"], "invoice": src["experts"]["receipt"]},
        "label_map": {"calendar": 0, "invoice": 1},
    }


def current(dest: Path) -> dict:
    return json.loads((dest / CURRENT_FILE).read_text())


@pytest.fixture(params=["local", "memory"])
def dest(request, tmp_path: Path):
    """A destination of either kind: a local folder (renames) or an object store (memory://)."""
    if request.param == "local":
        yield str(tmp_path / "deploy")
        return
    url = f"memory://bucket/{tmp_path.name}"
    yield url
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def listing(dest: str) -> dict:
    fs, root = fsspec.core.url_to_fs(dest)
    return releases.list_releases(fs, root, dest)


def test_release_layout_manifest_and_current(src: dict, tmp_path: Path, monkeypatch, request):
    from mole_trainer.runinfo import GIT_COMMIT_ENV, git_state

    dest = tmp_path / "deploy"
    monkeypatch.setenv(GIT_COMMIT_ENV, "0123abc-dirty")  # where the source has no .git (a Modal image)
    git_state.cache_clear()
    request.addfinalizer(git_state.cache_clear)
    (src["router_dir"] / "mole_adapter.json").write_text(
        json.dumps({"base_model": "Qwen/Qwen3-VL-8B-Instruct"})
    )
    info = {"router_evaluation": {"accuracy": 0.9}, "runs": {"router": "abc", "experts": {}}}
    manifest = deploy(
        **src, dest=str(dest), metadata={"calendar": {"score": 0.9}}, extra={"run": "r1"}, info=info
    )

    release = manifest["release"]
    assert sorted(os.listdir(dest)) == [CURRENT_FILE, RELEASES_DIR]
    assert os.listdir(dest / RELEASES_DIR) == [release]
    assert current(dest)["release"] == release and current(dest)["previous"] == []
    root = dest / RELEASES_DIR / release
    files = tree(root)
    assert set(files) == {
        MANIFEST_FILE,
        LABEL_MAP_FILE,
        "routing/adapter/adapter_config.json",
        "routing/adapter/adapter_model.safetensors",
        "routing/adapter/mole_adapter.json",
        f"routing/adapter/{LABEL_MAP_FILE}",
        "loras/calendar/adapter/adapter_config.json",
        "loras/calendar/adapter/adapter_model.safetensors",
        f"loras/calendar/{DEPLOY_METADATA_FILE}",
        "loras/receipt/adapter/adapter_config.json",
        "loras/receipt/adapter/adapter_model.safetensors",
        f"loras/receipt/{DEPLOY_METADATA_FILE}",
    }
    assert json.loads(files[LABEL_MAP_FILE]) == {"calendar": 0, "receipt": 1}
    assert files[f"routing/adapter/{LABEL_MAP_FILE}"] == files[LABEL_MAP_FILE]
    meta = json.loads(files[f"loras/calendar/{DEPLOY_METADATA_FILE}"])
    assert meta["score"] == 0.9 and meta["expert"] == "calendar" and meta["deployed_at"]
    assert json.loads(files[MANIFEST_FILE]) == manifest
    assert current(dest)["manifest_sha256"] == hashlib.sha256(files[MANIFEST_FILE]).hexdigest()
    assert manifest["base_model"] == "Qwen/Qwen3-VL-8B-Instruct"
    assert manifest["router_evaluation"] == {"accuracy": 0.9} and manifest["runs"]["router"] == "abc"
    assert manifest["code_version"] == {
        "package": mole_trainer.__version__,
        "git_commit": "0123abc",
        "git_dirty": True,
    }
    assert manifest["extra"] == {"run": "r1"}
    assert list(manifest["experts"]) == ["calendar", "receipt"]
    listed = {e["path"]: e for e in manifest["files"]}
    assert set(listed) == set(files) - {MANIFEST_FILE}
    blob = root / "loras/receipt/adapter/adapter_model.safetensors"
    assert listed["loras/receipt/adapter/adapter_model.safetensors"]["sha256"] == sha256_file(blob)

    report = verify_deployment(str(dest))
    assert report == {"release": release, "ok": True, "files": len(listed), "mismatched": [], "missing": []}
    loaded = load_deployment(str(dest))
    assert loaded["release"] == release and loaded["root"] == str(root)
    assert loaded["experts"] == {
        name: str(root / "loras" / name / "adapter") for name in ("calendar", "receipt")
    }
    assert loaded["label_map"] == {"calendar": 0, "receipt": 1}


def test_second_deploy_keeps_the_first_and_rollback_promote_move_current(
    src: dict, tmp_path: Path, dest: str
):
    first = deploy(**src, dest=dest)["release"]
    second = deploy(**second_version(src, tmp_path), dest=dest)["release"]
    assert second > first  # ids sort by time
    got = listing(dest)
    assert [r["release"] for r in got["releases"]] == [first, second]
    assert got["current"] == second and got["previous"] == [first]
    assert set(load_deployment(dest)["experts"]) == {"calendar", "invoice"}

    assert releases.rollback(dest)["release"] == first
    loaded = load_deployment(dest)
    assert loaded["release"] == first and set(loaded["experts"]) == {"calendar", "receipt"}
    assert Path(loaded["router"], "adapter_model.safetensors").read_bytes() == b"router-weights"
    with pytest.raises(UserError, match="no previous release"):
        releases.rollback(dest)
    assert releases.promote(dest, second)["previous"] == [first]
    assert load_deployment(dest)["release"] == second
    assert verify_deployment(dest, first)["release"] == first
    with pytest.raises(UserError, match="no release nope"):
        releases.promote(dest, "nope")


def test_corrupted_file_fails_verify_promote_and_load_naming_it(src: dict, tmp_path: Path, dest: str):
    first = deploy(**src, dest=dest)["release"]
    second = deploy(**second_version(src, tmp_path), dest=dest)["release"]
    fs, root = fsspec.core.url_to_fs(dest)
    bad = "loras/invoice/adapter/adapter_model.safetensors"
    fs.pipe_file(f"{root}/{RELEASES_DIR}/{second}/{bad}", b"evil")
    fs.rm_file(f"{root}/{RELEASES_DIR}/{second}/routing/adapter/adapter_config.json")
    report = verify_deployment(dest)
    assert report["ok"] is False and report["mismatched"] == [bad]
    assert report["missing"] == ["routing/adapter/adapter_config.json"]
    with pytest.raises(
        UserError, match=f"{second}.*changed.*{bad}.*missing: routing/adapter/adapter_config.json"
    ):
        load_deployment(dest)
    releases.rollback(dest)
    assert load_deployment(dest)["release"] == first  # the older release is untouched
    with pytest.raises(UserError, match=bad):
        releases.promote(dest, second)
    assert listing(dest)["current"] == first


def test_a_same_size_change_is_caught_by_the_checksum(src: dict, dest: str):
    """One flipped byte keeps the size the manifest lists: only the sha256 tells the file changed."""
    release = deploy(**src, dest=dest)["release"]
    fs, root = fsspec.core.url_to_fs(dest)
    bad = "loras/calendar/adapter/adapter_model.safetensors"
    path = f"{root}/{RELEASES_DIR}/{release}/{bad}"
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(path, bytes(data))
    report = verify_deployment(dest)
    assert report["ok"] is False and report["mismatched"] == [bad] and report["missing"] == []
    with pytest.raises(UserError, match=f"{release}.*changed.*{bad}"):
        load_deployment(dest)


def test_changed_manifest_is_refused(src: dict, tmp_path: Path, dest: str):
    release = deploy(**src, dest=dest)["release"]
    fs, root = fsspec.core.url_to_fs(dest)
    path = f"{root}/{RELEASES_DIR}/{release}/{MANIFEST_FILE}"
    fs.pipe_file(path, fs.cat_file(path).replace(b'"calendar": 0', b'"calendar": 2'))
    with pytest.raises(UserError, match=f"{MANIFEST_FILE}: changed since it was deployed"):
        load_deployment(dest)


def failing_after(n: int, real):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    return wrapper


def test_failure_mid_upload_leaves_current_and_earlier_releases(
    src: dict, tmp_path: Path, dest: str, monkeypatch
):
    first = deploy(**src, dest=dest)["release"]
    fs, root = fsspec.core.url_to_fs(dest)
    before = {p: fs.cat_file(p) for p in fs.find(root) if ".mole-lock" not in p}
    monkeypatch.setattr(type(fs), "put_file", failing_after(3, type(fs).put_file))
    with pytest.raises(UserError, match="disk full.*CURRENT unchanged"):
        deploy(**second_version(src, tmp_path), dest=dest)
    monkeypatch.undo()
    assert {p: fs.cat_file(p) for p in fs.find(root)} == before  # the partial upload is gone too
    assert load_deployment(dest)["release"] == first


def test_a_release_that_reads_back_wrong_is_not_made_current(
    src: dict, tmp_path: Path, dest: str, monkeypatch
):
    first = deploy(**src, dest=dest)["release"]
    real = deploy_mod._upload

    def lossy_upload(fs, files, folder, manifest_bytes):  # storage that mangles one object it accepted
        real(fs, files, folder, manifest_bytes)
        fs.pipe_file(f"{folder}/loras/calendar/adapter/adapter_model.safetensors", b"bit rot")

    monkeypatch.setattr(deploy_mod, "_upload", lossy_upload)
    with pytest.raises(
        UserError, match="loras/calendar/adapter/adapter_model.safetensors.*CURRENT unchanged"
    ):
        deploy(**second_version(src, tmp_path), dest=dest)
    got = listing(dest)
    assert got["current"] == first and len(got["releases"]) == 2  # the bad release stays, unreferenced
    assert load_deployment(dest)["release"] == first


def test_killed_local_upload_leaves_a_partial_folder_that_readers_and_gc_handle(src: dict, tmp_path: Path):
    dest = tmp_path / "deploy"
    first = deploy(**src, dest=str(dest))["release"]
    partial = dest / RELEASES_DIR / f"{releases.PARTIAL_PREFIX}20991231T000000000Z-deadbeef-1234"
    partial.mkdir()
    (partial / "routing").mkdir()  # what a SIGKILL mid-upload leaves: never renamed to its id
    assert [r["release"] for r in listing(str(dest))["releases"]] == [first]
    assert load_deployment(str(dest))["release"] == first
    assert releases.gc(str(dest), keep=5)["removed"] == [partial.name] and not partial.exists()


def test_flat_layout_deployment_still_loads(src: dict, tmp_path: Path):
    dest = tmp_path / "deploy"
    release = deploy(**src, dest=str(dest))["release"]
    flat = tmp_path / "flat"
    os.replace(dest / RELEASES_DIR / release, flat)  # what a deploy before releases wrote
    report = verify_deployment(str(flat))
    assert report["ok"] and report["release"] is None
    loaded = load_deployment(str(flat))
    assert loaded["release"] is None and loaded["router"] == str(flat / "routing/adapter")
    (flat / "loras/calendar/adapter/adapter_model.safetensors").write_bytes(b"cal-weightz")
    with pytest.raises(UserError, match="loras/calendar/adapter/adapter_model.safetensors"):
        load_deployment(str(flat))
    assert listing(str(flat))["flat"] is True


def test_gc_keeps_newest_current_and_its_predecessor(src: dict, tmp_path: Path, dest: str):
    ids = [deploy(**src, dest=dest)["release"] for _ in range(4)]
    releases.promote(dest, ids[1])
    releases.promote(dest, ids[0])  # CURRENT: ids[0], previous: ids[1], ids[3], ids[2]
    fs, root = fsspec.core.url_to_fs(dest)
    young, old = "20991231T000000000Z-0000000a", "20000101T000000000Z-0000000b"
    if not releases.is_local(fs):  # an upload killed long ago, and one that may still be running
        for name in (young, old):
            fs.pipe_file(f"{root}/{RELEASES_DIR}/{name}/label_map.json", b"{}")
    result = releases.gc(dest, keep=1)  # the newest (ids[3]), CURRENT and its predecessor stay
    assert sorted(result["kept"]) == sorted([ids[0], ids[1], ids[3]])
    assert sorted(result["removed"]) == sorted([ids[2]] + ([] if releases.is_local(fs) else [old]))
    assert result["left_incomplete"] == ([] if releases.is_local(fs) else [young])
    assert [r["release"] for r in listing(dest)["releases"] if r["complete"]] == [ids[0], ids[1], ids[3]]
    assert releases.rollback(dest)["release"] == ids[1]
    assert sorted(releases.gc(dest, keep=0)["removed"]) == [ids[0]]  # ids[3] is the predecessor now
    assert load_deployment(dest)["release"] == ids[1]


class CountingHash:
    def __init__(self, real):
        self.real, self.calls = real, 0

    def __call__(self, fh):
        self.calls += 1
        return self.real(fh)


def test_load_verifies_once_then_trusts_the_record(src: dict, dest: str, monkeypatch, cache: Path):
    deploy(**src, dest=dest)
    counter = CountingHash(releases.sha256_stream)
    monkeypatch.setattr(releases, "sha256_stream", counter)
    first = load_deployment(dest)
    assert counter.calls == first["manifest"]["files"].__len__()
    second = load_deployment(dest)
    assert counter.calls == len(first["manifest"]["files"]) and second["root"] == first["root"]
    # a cached or in-place file that changed no longer matches the record: checked (and refetched) again
    blob = Path(first["experts"]["receipt"], "adapter_model.safetensors")
    blob.write_bytes(b"rec-weights" * 99 + b"x" * 11)
    if dest.startswith("memory://"):
        third = load_deployment(dest)
        assert (
            Path(third["experts"]["receipt"], "adapter_model.safetensors").read_bytes()
            == b"rec-weights" * 100
        )
        # no partial download, trash or lock left behind
        assert sorted(os.listdir(cache)) == [release_cache.LOCKS_DIR, Path(third["root"]).name]
        assert os.listdir(cache / release_cache.LOCKS_DIR) == []
    else:
        with pytest.raises(UserError, match="loras/receipt/adapter/adapter_model.safetensors"):
            load_deployment(dest)
    assert counter.calls > len(first["manifest"]["files"])


def test_concurrent_loaders_download_a_release_once(src: dict, tmp_path: Path, monkeypatch, cache: Path):
    url = f"memory://bucket/{tmp_path.name}-conc"
    deploy(**src, dest=url)
    fs, _ = fsspec.core.url_to_fs(url)
    fetched = []
    real = type(fs).get_file

    def slow_get(self, rpath, lpath, **kw):
        fetched.append(rpath)
        time.sleep(0.02)
        return real(self, rpath, lpath, **kw)

    monkeypatch.setattr(type(fs), "get_file", slow_get)
    with ThreadPoolExecutor(4) as pool:
        roots = list(pool.map(lambda _: load_deployment(url)["root"], range(4)))
    assert len(set(roots)) == 1
    assert sorted(fetched) == sorted(set(fetched))  # each file downloaded by one loader only
    assert sorted(os.listdir(cache)) == [release_cache.LOCKS_DIR, Path(roots[0]).name]  # nothing left
    assert os.listdir(cache / release_cache.LOCKS_DIR) == []
    fs.rm(url.removeprefix("memory://"), recursive=True)


@pytest.mark.parametrize("waiter_wrote", [False, True], ids=["folder-removed", "folder-kept"])
def test_a_loader_reaching_the_lock_as_its_holder_releases_it_loads_and_leaves_no_lock_folder(
    src: dict, tmp_path: Path, monkeypatch, cache: Path, waiter_wrote: bool
):
    """The holder removes the lock folder, if empty, on release. A waiter that has just made sure the
    folder exists and is about to write its lock there must make it again, not fail; a waiter whose lock
    file kept the folder from being removed must remove it when it leaves."""
    url = f"memory://bucket/{tmp_path.name}-gone"
    deploy(**src, dest=url)
    fs, _ = fsspec.core.url_to_fs(url)
    holder_fetching, waiter_at_lock, holder_done = threading.Event(), threading.Event(), threading.Event()
    fetched, roots, errors = [], {}, {}
    real_get, real_write = type(fs).get_file, OutputLock._write_tmp

    def gated_get(self, rpath, lpath, **kw):
        fetched.append(rpath)
        holder_fetching.set()
        assert waiter_at_lock.wait(10)
        return real_get(self, rpath, lpath, **kw)

    def gated_write(self, data):
        written = real_write(self, data) if waiter_wrote else None
        waiting = threading.current_thread().name == "waiter" and self.stage == "deploy.load"  # not its sweep
        if waiting and not waiter_at_lock.is_set():
            waiter_at_lock.set()  # the waiter's mkdir is done; now the holder finishes and releases
            assert holder_done.wait(10)
        return written or real_write(self, data)

    def load(name: str) -> None:
        try:
            roots[name] = load_deployment(url)["root"]
        except Exception as exc:
            errors[name] = exc

    monkeypatch.setattr(type(fs), "get_file", gated_get)
    monkeypatch.setattr(OutputLock, "_write_tmp", gated_write)
    holder = threading.Thread(target=load, args=("holder",), name="holder")
    waiter = threading.Thread(target=load, args=("waiter",), name="waiter")
    holder.start()
    assert holder_fetching.wait(10)
    waiter.start()
    holder.join(10)
    holder_done.set()
    waiter.join(10)
    assert errors == {} and roots["waiter"] == roots["holder"]
    assert sorted(fetched) == sorted(set(fetched))  # the waiter reused the holder's download
    assert os.listdir(cache / release_cache.LOCKS_DIR) == []
    fs.rm(url.removeprefix("memory://"), recursive=True)


KILLED_FETCH = """
import json, os, signal, sys
import fsspec
from mole_trainer.deploy import deploy, load_deployment

deploy(**json.loads(sys.argv[1]), dest="memory://bucket/killed")
fs = fsspec.filesystem("memory")
real, calls = type(fs).get_file, []

def get_file(self, rpath, lpath, **kw):
    if calls:  # killed in the middle of the download, the first file written
        os.kill(os.getpid(), signal.SIGKILL)
    calls.append(rpath)
    return real(self, rpath, lpath, **kw)

type(fs).get_file = get_file
load_deployment("memory://bucket/killed")
"""


def test_a_load_removes_what_a_killed_fetch_left_but_not_what_a_live_one_writes(
    src: dict, tmp_path: Path, cache: Path
):
    args = json.dumps({**src, "router_dir": str(src["router_dir"])})
    killed = subprocess.Popen([sys.executable, "-c", KILLED_FETCH, args], stderr=subprocess.PIPE)
    assert killed.wait(60) == -signal.SIGKILL, killed.stderr.read().decode()[-2000:]
    (dead,) = os.listdir(cache / release_cache.LOCKS_DIR)  # the killed loader's lock, still there
    # and the lock of a loader of another release killed before it wrote anything
    OutputLock(
        cache / release_cache.LOCKS_DIR / ("d" * 64), "deploy.load", pid=killed.pid, renew_every=None
    ).acquire()
    partial = [p for p in cache.iterdir() if p.name.startswith(f"{releases.PARTIAL_PREFIX}{dead}-")]
    assert len(partial) == 1 and any(p.is_file() for p in partial[0].rglob("*"))  # one file fetched
    trash = release_cache.fetch_folder(cache, dead, "trash-")  # as a kill inside replace_folder leaves it
    (trash / "sub").mkdir(parents=True)
    old_trash = cache / f"{releases.PARTIAL_PREFIX}trash-0123abcd"  # named by earlier versions
    old_trash.mkdir()
    live = "e" * 64  # a fetch in progress in another loader: its lock held, its folder being written
    held = OutputLock(cache / release_cache.LOCKS_DIR / live, "deploy.load", renew_every=None).acquire()
    writing = release_cache.fetch_folder(cache, live)
    writing.mkdir()

    url = f"memory://bucket/{tmp_path.name}-after"
    deploy(**src, dest=url)
    loaded = load_deployment(url)
    assert not partial[0].exists() and not trash.exists() and not old_trash.exists() and writing.exists()
    assert sorted(os.listdir(cache / release_cache.LOCKS_DIR)) == [live]
    held.release()
    load_deployment(url)
    assert sorted(os.listdir(cache)) == [release_cache.LOCKS_DIR, Path(loaded["root"]).name]
    assert os.listdir(cache / release_cache.LOCKS_DIR) == []
    fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)


def test_credentials_in_a_url_are_refused_and_redacted_everywhere(src: dict, tmp_path: Path):
    from mole_trainer.storage import inline_credentials, open_fs, redact

    assert redact("s3://AKIA:s3cr3t@bucket/x") == "s3://***@bucket/x"
    # how s3fs/botocore echo the path when a URL carries credentials: no scheme left
    assert redact('Invalid bucket name "AKIAXX:sekret@bucket": x') == 'Invalid bucket name "***@bucket": x'
    assert redact("AKIAXX:sekret@bucket/dep") == "***@bucket/dep"
    assert redact("https://h/p?X-Amz-Signature=abc&v=1") == "https://h/p?X-Amz-Signature=***&v=1"
    for plain in ("/plain/path", "at 10:30 mail me@example.com", "http://host:80/a@b"):
        assert redact(plain) == plain
    # names before @ that are addresses, not secrets
    assert not any(map(inline_credentials, ("abfs://container@account/p", "ssh://me@host/p", "s3://b/k@v")))
    for url in ("s3://AKIAXX:sekret@bucket/dep", "s3://TOKEN@bucket", "memory://user:sekret@b/c"):
        with pytest.raises(UserError) as err:
            open_fs(url)
        assert "sekret" not in str(err.value) and "environment or profile" in str(err.value)
    with pytest.raises(UserError, match="environment or profile"):
        deploy(**src, dest="memory://user:sekret@bucket/creds")
    assert not fsspec.filesystem("memory").exists("/user:sekret@bucket")  # nothing was uploaded


@pytest.fixture
def checkpoints(tmp_path: Path) -> dict:
    """A router checkpoint and experts folder as `mole deploy` reads them (fake weights)."""
    from mole_trainer.adapter_info import write_adapter_info
    from mole_trainer.router_prompt import ROUTER_PROMPT_VERSION

    base = {"base_model": "tiny", "min_pixels": 4096, "max_pixels": 20000}
    router = make_adapter(tmp_path / "ckpt" / "router" / "adapter", b"router")
    label_map = {"calendar": 0, "receipt": 1}
    write_adapter_info(
        router, {"role": "router", "prompt_version": ROUTER_PROMPT_VERSION, "label_map": label_map, **base}
    )
    for name in label_map:
        folder = make_adapter(tmp_path / "ckpt" / "experts" / name / "adapter", name.encode())
        write_adapter_info(folder, {"role": "expert", "expert": name, "max_new_tokens": 2, **base})
    return {"router": str(router.parent), "experts": str(tmp_path / "ckpt" / "experts")}


def test_cli_deploy_actions(checkpoints: dict, tmp_path: Path, capsys):
    from mole_trainer.cli import main

    dest = str(tmp_path / "deploy")
    flags = ["deploy", "--checkpoint", checkpoints["router"], "--experts", checkpoints["experts"]]

    def mole(*args) -> tuple[int, str]:
        capsys.readouterr()
        code = main(["--workdir", str(tmp_path), *args])
        out = capsys.readouterr()
        return code, out.out + out.err

    assert mole(*flags)[0] == 2  # no --bucket
    assert mole("deploy", "list", dest) == (2, f"error: {dest}: not found (expected a deploy destination)\n")
    code, out = mole(*flags, "--bucket", dest)
    assert code == 0 and "deployed release" in out
    first = current(Path(dest))["release"]
    assert mole(*flags, "--bucket", dest)[0] == 0
    second = current(Path(dest))["release"]
    code, out = mole("deploy", "list", dest)
    assert code == 0 and [line.split()[:2] for line in out.splitlines()] == [["-", first], ["*", second]]
    assert mole("deploy", "verify", dest) == (
        0,
        f"{dest}: release {second}: all 13 files match the manifest\n",
    )
    bad = "loras/receipt/adapter/adapter_model.safetensors"
    (Path(dest) / RELEASES_DIR / second / bad).write_bytes(b"changed")
    code, out = mole("deploy", "verify", dest)
    assert code == 1 and f"release {second}: {bad}: changed" in out
    assert mole("deploy", "verify", dest, first)[0] == 0
    code, out = mole("deploy", "rollback", dest)
    assert code == 0 and current(Path(dest))["release"] == first
    code, out = mole("deploy", "promote", dest, second)
    assert code == 2 and bad in out and current(Path(dest))["release"] == first  # refused: damaged
    code, out = mole("deploy", "gc", dest, "--keep", "0")
    assert code == 0 and os.listdir(Path(dest) / RELEASES_DIR) == [first]
    assert mole("deploy", "rollback", dest)[0] == 2  # nothing before it
    from mole_trainer.history import History

    stages = [r["stage"] for r in History(tmp_path / "history.sqlite").runs("deploy")]
    assert stages == ["deploy.rollback", "deploy.gc", "deploy.promote", "deploy.rollback", "deploy", "deploy"]


def test_cli_never_prints_or_records_credentials(checkpoints: dict, tmp_path: Path, capsys):
    from mole_trainer.cli import main
    from mole_trainer.history import History

    url = "s3://AKIAXX:sekret@bucket/dep"
    wd = ["--workdir", str(tmp_path)]
    assert main([*wd, "deploy", "--checkpoint", checkpoints["router"], "--experts", checkpoints["experts"],
                 "--bucket", url]) == 2  # fmt: skip
    for action in (["list", url], ["verify", url], ["promote", url, "r"], ["rollback", url], ["gc", url]):
        assert main([*wd, "deploy", *action] + (["--keep", "1"] if action[0] == "gc" else [])) == 2
    out = capsys.readouterr()
    assert out.err.count("error: s3://***@bucket/dep: credentials in the URL are not accepted") == 6
    assert "sekret" not in out.out + out.err and "Traceback" not in out.err
    runs = History(tmp_path / "history.sqlite").runs("deploy")
    assert len(runs) == 4 and {r["status"] for r in runs} == {"failed"}  # deploy, promote, rollback, gc
    history = b"".join(p.read_bytes() for p in tmp_path.glob("history.sqlite*"))  # WAL too
    assert b"***@bucket" in history and b"sekret" not in history


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on leaving: nothing listens there


def test_unreachable_object_store_is_a_user_error_naming_url_and_operation(
    checkpoints: dict, tmp_path: Path, monkeypatch, capsys
):
    pytest.importorskip("s3fs")
    from mole_trainer.cli import main

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # one refused connection is enough
    url = "s3://bucket/dep"
    wd = ["--workdir", str(tmp_path)]
    deploy_flags = ["--checkpoint", checkpoints["router"], "--experts", checkpoints["experts"], "--bucket"]
    cases = {
        "deploy": ["deploy", *deploy_flags, url],
        "listing releases": ["deploy", "list", url],
        "verify": ["deploy", "verify", url],
        "promote": ["deploy", "promote", url, "20260101T000000000Z-00000000"],
        "rollback": ["deploy", "rollback", url],
        "gc": ["deploy", "gc", url, "--keep", "1"],
    }
    for operation, args in cases.items():
        capsys.readouterr()
        assert main([*wd, *args]) == 2, operation
        err = capsys.readouterr().err
        assert f"error: {url}: {operation} failed: EndpointConnectionError" in err, err
        assert "Traceback" not in err
    with pytest.raises(UserError, match=f"{url}: loading the deployment .* failed: EndpointConnectionError"):
        load_deployment(url)


def test_release_commands_on_a_missing_local_folder_create_nothing(tmp_path: Path, capsys):
    from mole_trainer.cli import main

    missing = tmp_path / "deploy-typo"
    for action in (
        ["gc", str(missing), "--keep", "1"],
        ["promote", str(missing), "r"],
        ["rollback", str(missing)],
    ):
        assert main(["--workdir", str(tmp_path), "deploy", *action]) == 2
        assert f"{missing}: not found (expected a deploy destination)" in capsys.readouterr().err
        assert not missing.exists()


def test_local_deploy_fsyncs_every_file_and_folder_before_the_rename_and_current(
    src: dict, tmp_path: Path, monkeypatch
):
    events = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))  # fmt: skip
    monkeypatch.setattr(os, "rename", lambda a, b: events.append(("rename", str(b))) or real_rename(a, b))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    dest = tmp_path / "deploy"
    release = deploy(**src, dest=str(dest))["release"]
    final = dest / RELEASES_DIR / release
    renamed = events.index(("rename", str(final)))
    staged = {
        Path(path).relative_to(dest / RELEASES_DIR).parts[1:]
        for kind, path in events[:renamed]
        if kind == "fsync" and path.startswith(str(dest / RELEASES_DIR / releases.PARTIAL_PREFIX))
    }
    wanted = {p.relative_to(final).parts for p in final.rglob("*")} | {()}  # every file, folder and itself
    assert wanted <= staged
    current_at = events.index(("replace", str(dest / CURRENT_FILE)))
    assert ("fsync", str(dest / RELEASES_DIR)) in events[renamed:current_at]  # the rename is durable


def test_gc_grace_for_incomplete_remote_releases_and_the_no_lock_note(src: dict, tmp_path: Path, capsys):
    from mole_trainer.cli import main

    url = f"memory://bucket/{tmp_path.name}"
    fs, root = fsspec.core.url_to_fs(url)
    try:
        deploy(**src, dest=url)
        born = time.time() - 120  # an upload that stopped two minutes ago, or is still running
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(born))
        incomplete = f"{stamp}000Z-0000000a"
        fs.pipe_file(f"{root}/{RELEASES_DIR}/{incomplete}/label_map.json", b"{}")
        wd = ["--workdir", str(tmp_path)]
        assert main([*wd, "deploy", "gc", url, "--keep", "1"]) == 0  # default grace: an hour
        out = capsys.readouterr()
        assert f"left incomplete (may be uploading): ['{incomplete}']" in out.out
        assert out.err.count("are not serialized") == 1
        assert main([*wd, "deploy", "gc", url, "--keep", "1", "--grace", "60"]) == 0
        assert f"removed 1 release(s) ['{incomplete}']" in capsys.readouterr().out
        with pytest.raises(SystemExit) as bad:
            main([*wd, "deploy", "gc", url, "--keep", "1", "--grace", "-1"])
        assert bad.value.code == 2 and "--grace: expected a number of seconds >= 0" in capsys.readouterr().err
        assert main([*wd, "deploy", "gc", str(tmp_path / "x"), "--keep", "1"]) == 2
        assert "not serialized" not in capsys.readouterr().err  # a local folder is locked
    finally:
        fs.rm(root, recursive=True)


def test_modal_deploy_targets_a_bucket_with_credentials_from_a_named_secret(tmp_path: Path, monkeypatch):
    m = pytest.importorskip("mole_trainer.cloud.modal_app")
    from mole_trainer import stages

    monkeypatch.delenv(m.DEPLOY_SECRET_ENV, raising=False)
    assert m.deploy_secrets() == []  # no Secret attached unless one is named
    monkeypatch.setenv(m.DEPLOY_SECRET_ENV, "team-s3")
    assert len(m.deploy_secrets()) == 1
    monkeypatch.setenv(m.LOCAL_ROOT_ENV, str(tmp_path))
    calls = []
    monkeypatch.setattr(stages, "deploy", lambda *args: calls.append(args) or {"files": []})
    m.deploy.local(bucket="s3://bucket/mole")
    m.deploy.local()
    assert calls[0][2] == "s3://bucket/mole"
    assert calls[1][2] == str(tmp_path / m.CHECKPOINTS / m.DEPLOY_DIR)
    result = m.deploy.local(bucket="just-a-name")  # a user error is returned (Modal must not retry it)
    assert m.failed(result) and "expected a URL" in result["error"]
