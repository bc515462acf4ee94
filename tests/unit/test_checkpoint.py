"""Checkpoint files: the data identity a checkpoint records, and saves that a kill cannot leave half-done."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mole_trainer.layout import LOCK_FILE
from mole_trainer.train import checkpoint as ckpt
from mole_trainer.train.loop import save_best


class Killed(BaseException):
    """Stands in for a SIGKILL at one point of a save."""


def _kill_at_rename(monkeypatch, n: int) -> None:
    """os.replace raises Killed at its n-th call (the earlier ones run)."""
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == n:
            raise Killed
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_data_identity_keeps_its_recorded_value_and_ignores_times_and_the_lock(tmp_path: Path):
    data = tmp_path / "prep"
    data.mkdir()
    (data / "meta.json").write_text('{"task": "router", "digest": "abc"}\n')
    (data / "train.pt").write_bytes(b"\x00" * 1000)
    (data / "val.pt").write_bytes(b"\x01" * 10)
    (data / "sub").mkdir()
    (data / "sub/x").write_text("nested is not counted")
    # recorded in checkpoints: a changed value would refuse to resume every existing run
    recorded = "cd37ed76a6eec779b7e1c14eb3af267b6117f2b6ce0c40fb62f3d1f2a8c0b716"
    assert ckpt.data_identity(data) == recorded
    (data / LOCK_FILE).write_text('{"pid": 1}')
    os.utime(data / "train.pt", (0, 0))  # a copy or a Volume may not keep times
    assert ckpt.data_identity(data) == recorded
    (data / "val.pt").write_bytes(b"\x01" * 11)
    assert ckpt.data_identity(data) != recorded
    (data / "val.pt").write_bytes(b"\x01" * 10)
    (data / "meta.json").write_text('{"task": "router", "digest": "abd"}\n')  # same size, other data
    assert ckpt.data_identity(data) != recorded


def _save(root: Path, step: int, value: float) -> Path:
    state = {"trainable": {"w": torch.full((2,), value)}}
    return ckpt.save_checkpoint(root, step, state, {"step": step, "value": value}, keep=3)


def test_a_step_saved_again_is_replaced_whole_and_a_kill_in_the_swap_falls_back(tmp_path: Path, monkeypatch):
    root = tmp_path / "ckpt"
    _save(root, 1, 1.0)
    _save(root, 2, 2.0)
    _kill_at_rename(monkeypatch, 2)  # step 2 moved aside, the new step 2 not yet renamed in
    with pytest.raises(Killed):
        _save(root, 2, 2.5)
    monkeypatch.undo()
    state, meta, folder = ckpt.load_latest(root)
    assert folder.name == "step-00000001" and meta["value"] == 1.0
    ckpt.remove_partial(root)  # what a resume does before it saves again
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]
    _save(root, 2, 2.0)
    _save(root, 2, 3.0)
    state, meta, folder = ckpt.load_latest(root)
    assert folder.name == "step-00000002" and meta["value"] == 3.0
    assert torch.equal(state["trainable"]["w"], torch.full((2,), 3.0))
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001", "step-00000002"]


def test_a_checkpoint_is_on_disk_before_it_gets_its_step_name(tmp_path: Path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: events.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd)
    )
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", str(a))) or real_replace(a, b))
    final = _save(tmp_path, 4, 1.0)
    tmp = str(tmp_path / f".{final.name}.tmp")
    synced, after = events[: events.index(("rename", tmp))], events[events.index(("rename", tmp)) + 1 :]
    assert {f"{tmp}/{ckpt.STATE_FILE}", f"{tmp}/{ckpt.TRAINER_STATE_FILE}", tmp} <= set(synced)
    assert after == [str(tmp_path)]  # the rename itself is synced


def test_a_new_best_adapter_replaces_the_old_whole_wherever_a_kill_lands(tmp_path: Path, monkeypatch):
    def adapter(value: str):
        def write(folder: Path) -> None:
            folder.mkdir()
            (folder / "adapter.bin").write_text(value)

        return write

    def best() -> tuple[str, int]:
        folder = tmp_path / ckpt.BEST_DIR
        return (folder / "adapter.bin").read_text(), json.loads((folder / "state.json").read_text())["step"]

    save_best(adapter("a"), tmp_path, 3, {"val_loss": 1.0})
    _kill_at_rename(monkeypatch, 2)  # the old best moved aside, the new one not yet in place
    with pytest.raises(Killed):
        save_best(adapter("b"), tmp_path, 6, {"val_loss": 0.5})
    monkeypatch.undo()
    ckpt.remove_partial(tmp_path)
    assert best() == ("a", 3)
    save_best(adapter("b"), tmp_path, 6, {"val_loss": 0.5})
    assert best() == ("b", 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.BEST_DIR]
