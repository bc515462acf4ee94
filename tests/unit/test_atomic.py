"""Atomic file and folder writes: all or nothing, temporary files cleaned up, durable order of syncs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mole_trainer.atomic import publish_folder, replace_folder, replacing, write_bytes, write_text


def test_write_replaces_whole_and_leaves_no_temporary(tmp_path: Path):
    dest = tmp_path / "out.json"
    dest.write_text("old")
    write_text(dest, "new ü")
    write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert dest.read_bytes() == "new ü".encode()
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "out.json"]


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path):
    dest = tmp_path / "shard.pt"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"), replacing(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".shard.pt.")
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert dest.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["shard.pt"]


def test_durable_write_syncs_data_before_the_rename_and_the_folder_after(tmp_path: Path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))  # fmt: skip
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a))) or real_replace(a, b))
    dest = tmp_path / "CURRENT"
    write_bytes(dest, b"{}", durable=True)
    tmp = events[1][1]
    assert events == [("fsync", tmp), ("replace", tmp), ("fsync", str(tmp_path))]
    assert dest.read_bytes() == b"{}"


def test_publish_folder_never_overwrites_and_replace_folder_swaps_whole(tmp_path: Path):
    staging, final, aside = tmp_path / ".partial-a", tmp_path / "a", tmp_path / ".trash"
    staging.mkdir()
    (staging / "w.bin").write_bytes(b"new")
    final.mkdir()
    (final / "old.bin").write_bytes(b"old")
    with pytest.raises(OSError):
        publish_folder(staging, final)
    assert (final / "old.bin").exists() and (staging / "w.bin").exists()
    replace_folder(staging, final, aside)
    assert [p.name for p in final.iterdir()] == ["w.bin"]
    assert not staging.exists() and not aside.exists()
    again = tmp_path / "b"
    final.rename(staging)
    publish_folder(staging, again)
    assert (again / "w.bin").read_bytes() == b"new" and not staging.exists()


class Killed(BaseException):
    """Stands in for a SIGKILL at one point of a folder swap."""


def _folder(path: Path, data: bytes) -> Path:
    path.mkdir()
    (path / "w.bin").write_bytes(data)
    return path


def test_replace_folder_killed_at_any_point_leaves_a_complete_folder(tmp_path: Path, monkeypatch):
    from mole_trainer import atomic

    final, aside = tmp_path / "best", tmp_path / ".best.old"
    real_rmtree, real_replace = atomic.shutil.rmtree, os.replace

    def kill_deleting_the_old(path, *args, **kwargs):
        if Path(path).exists():  # the call after the swap: the first one only clears a leftover
            raise Killed
        real_rmtree(path, *args, **kwargs)

    _folder(final, b"old")
    monkeypatch.setattr(atomic.shutil, "rmtree", kill_deleting_the_old)
    with pytest.raises(Killed):
        replace_folder(_folder(tmp_path / ".best.tmp", b"new"), final, aside)
    assert (final / "w.bin").read_bytes() == b"new" and (aside / "w.bin").read_bytes() == b"old"

    # killed between the two renames: the old folder aside and the new one beside it, both whole
    monkeypatch.setattr(atomic.shutil, "rmtree", real_rmtree)
    renames = []

    def kill_at_the_second_rename(src, dst):
        renames.append(src)
        if len(renames) == 2:
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", kill_at_the_second_rename)
    staging = _folder(tmp_path / ".best.tmp2", b"newer")
    with pytest.raises(Killed):
        replace_folder(staging, final, aside)  # a leftover `aside` is cleared first
    assert not final.exists()
    assert (aside / "w.bin").read_bytes() == b"new" and (staging / "w.bin").read_bytes() == b"newer"


def test_durable_replace_folder_syncs_the_new_tree_before_the_renames_and_the_parent_after(
    tmp_path: Path, monkeypatch
):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))  # fmt: skip
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a))) or real_replace(a, b))
    staging, final = tmp_path / ".step.tmp", tmp_path / "step"
    (staging / "sub").mkdir(parents=True)
    (staging / "sub/state.pt").write_bytes(b"s")
    (staging / "meta.json").write_bytes(b"{}")
    _folder(final, b"old")
    replace_folder(staging, final, tmp_path / ".step.old", durable=True)
    synced_first = {p for kind, p in events[:4] if kind == "fsync"}
    assert synced_first == {str(staging / "sub/state.pt"), str(staging / "sub"), str(staging / "meta.json"),
                            str(staging)}  # fmt: skip
    assert events[4:] == [("replace", str(final)), ("replace", str(staging)), ("fsync", str(tmp_path))]
    assert (final / "meta.json").read_bytes() == b"{}" and not (tmp_path / ".step.old").exists()
