"""Deploying fake adapter folders: layout, manifest checks, validation and atomic re-deploys."""

from __future__ import annotations

import json
import os
from pathlib import Path

import fsspec
import pytest

from mole_trainer import deploy as deploy_mod
from mole_trainer.deploy import deploy, load_deployment, sha256_file, verify_deployment
from mole_trainer.errors import UserError
from mole_trainer.layout import DEPLOY_METADATA_FILE, LABEL_MAP_FILE, MANIFEST_FILE


def make_adapter(folder: Path, blob: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (folder / "adapter_model.safetensors").write_bytes(blob)
    return folder


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


def test_round_trip(src: dict, tmp_path: Path):
    dest = tmp_path / "deploy"
    manifest = deploy(**src, dest=str(dest), metadata={"calendar": {"score": 0.9}}, extra={"run": "r1"})

    files = tree(dest)
    assert set(files) == {
        MANIFEST_FILE,
        LABEL_MAP_FILE,
        "routing/adapter/adapter_config.json",
        "routing/adapter/adapter_model.safetensors",
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
    assert manifest["extra"] == {"run": "r1"}
    assert list(manifest["experts"]) == ["calendar", "receipt"]
    listed = {e["path"]: e for e in manifest["files"]}
    assert set(listed) == set(files) - {MANIFEST_FILE}
    blob = dest / "loras/receipt/adapter/adapter_model.safetensors"
    assert listed["loras/receipt/adapter/adapter_model.safetensors"]["sha256"] == sha256_file(blob)

    assert verify_deployment(str(dest)) == {"ok": True, "files": len(listed), "mismatched": [], "missing": []}
    loaded = load_deployment(str(dest))
    assert loaded["router"] == str(dest / "routing/adapter")
    assert loaded["experts"] == {
        name: str(dest / "loras" / name / "adapter") for name in ("calendar", "receipt")
    }
    assert loaded["label_map"] == {"calendar": 0, "receipt": 1}


def test_tampering_detected(src: dict, tmp_path: Path):
    dest = tmp_path / "deploy"
    deploy(**src, dest=str(dest))
    (dest / "loras/calendar/adapter/adapter_model.safetensors").write_bytes(b"cal-weightz")
    (dest / "routing/adapter/adapter_config.json").unlink()
    report = verify_deployment(str(dest))
    assert report["ok"] is False
    assert report["mismatched"] == ["loras/calendar/adapter/adapter_model.safetensors"]
    assert report["missing"] == ["routing/adapter/adapter_config.json"]
    with pytest.raises(UserError, match="does not match"):
        load_deployment(str(dest))


def test_missing_manifest(tmp_path: Path):
    with pytest.raises(UserError, match=MANIFEST_FILE):
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


def test_redeploy_replaces_old(src: dict, tmp_path: Path):
    dest = tmp_path / "deploy"
    deploy(**src, dest=str(dest))
    (dest / "README.txt").write_text("kept")
    deploy(**second_version(src, tmp_path), dest=str(dest))
    assert sorted(p.name for p in (dest / "loras").iterdir()) == ["calendar", "invoice"]
    assert (dest / "routing/adapter/adapter_model.safetensors").read_bytes() == b"router-v2"
    assert sorted(os.listdir(dest)) == sorted(
        [MANIFEST_FILE, LABEL_MAP_FILE, "routing", "loras", "README.txt"]
    )
    assert verify_deployment(str(dest))["ok"]


def failing_after(n: int, real):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    return wrapper


def test_failure_mid_copy_keeps_old_deployment(src: dict, tmp_path: Path, monkeypatch):
    dest = tmp_path / "deploy"
    deploy(**src, dest=str(dest))
    before = tree(dest)
    monkeypatch.setattr(deploy_mod, "_put_one", failing_after(4, deploy_mod._put_one))
    with pytest.raises(UserError, match="disk full"):
        deploy(**second_version(src, tmp_path), dest=str(dest))
    assert tree(dest) == before
    assert sorted(os.listdir(dest)) == sorted([MANIFEST_FILE, LABEL_MAP_FILE, "routing", "loras"])


@pytest.mark.parametrize("fail_at", [2, 5, 7, 8])  # phase 1 (moving old out) and phase 2 (moving new in)
def test_failure_mid_swap_rolls_back(src: dict, tmp_path: Path, monkeypatch, fail_at: int):
    dest = tmp_path / "deploy"
    deploy(**src, dest=str(dest))
    before = tree(dest)
    monkeypatch.setattr(deploy_mod.os, "replace", failing_after(fail_at, os.replace))
    with pytest.raises(UserError, match="simulated"):
        deploy(**second_version(src, tmp_path), dest=str(dest))
    monkeypatch.undo()
    assert tree(dest) == before
    assert sorted(os.listdir(dest)) == sorted([MANIFEST_FILE, LABEL_MAP_FILE, "routing", "loras"])


def test_crashed_swap_recovered_by_next_deploy(src: dict, tmp_path: Path):
    dest = tmp_path / "deploy"
    deploy(**src, dest=str(dest))
    # state left by a process killed in phase 1: manifest and routing moved out, the rest not yet
    previous = dest / ".previous"
    previous.mkdir()
    os.replace(dest / MANIFEST_FILE, previous / MANIFEST_FILE)
    os.replace(dest / "routing", previous / "routing")
    (dest / ".staging-dead").mkdir()
    with pytest.raises(UserError, match=MANIFEST_FILE):
        load_deployment(str(dest))  # readers never take a deployment without its manifest
    deploy(**second_version(src, tmp_path), dest=str(dest))
    assert sorted(os.listdir(dest)) == sorted([MANIFEST_FILE, LABEL_MAP_FILE, "routing", "loras"])
    assert set(load_deployment(str(dest))["experts"]) == {"calendar", "invoice"}


def test_refuses_foreign_folder(src: dict, tmp_path: Path):
    dest = tmp_path / "deploy"
    (dest / "routing").mkdir(parents=True)
    with pytest.raises(UserError, match="not a mole-trainer deployment"):
        deploy(**src, dest=str(dest))
    assert (dest / "routing").is_dir()


def test_remote_round_trip_with_memory_fs(src: dict, tmp_path: Path):
    url = "memory://bucket/deploy-test"
    fs, root = fsspec.core.url_to_fs(url)
    try:
        deploy(**src, dest=url)
        deploy(**second_version(src, tmp_path), dest=url)
        names = {p[len(root) + 1 :].split("/")[1] for p in fs.find(f"{root}/loras")}
        assert names == {"calendar", "invoice"}
        assert not fs.glob(f"{root}/.staging-*")
        assert verify_deployment(url)["ok"]

        loaded = load_deployment(url, cache_dir=tmp_path / "cache")
        assert Path(loaded["router"], "adapter_model.safetensors").read_bytes() == b"router-v2"
        assert set(loaded["experts"]) == {"calendar", "invoice"}
        # cached files are reused; a tampered remote file is caught
        fs.pipe_file(f"{root}/loras/invoice/adapter/adapter_model.safetensors", b"evil")
        assert verify_deployment(url)["mismatched"] == ["loras/invoice/adapter/adapter_model.safetensors"]
    finally:
        fs.rm(root, recursive=True)
