"""Every stage that writes an output folder holds its lock for the whole run, and refuses a locked one.

The stages' inner work is replaced by a probe that reads the lock while "working", so no model runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mole_trainer import stages
from mole_trainer.adapter_info import write_adapter_info
from mole_trainer.history import History
from mole_trainer.layout import HISTORY_DB, LOCK_FILE
from mole_trainer.locking import LockHeld, OutputLock

from ..helpers import NAMES, write_small_configs


@pytest.fixture
def wd(tmp_path: Path) -> Path:
    write_small_configs(tmp_path / "config")
    for name in NAMES:  # expert datasets: only their presence and bytes matter before the lock
        folder = tmp_path / "data/experts" / name
        folder.mkdir(parents=True)
        (folder / "train.jsonl").write_text("{}\n")
    (tmp_path / "prep").mkdir()
    (tmp_path / "prep/meta.json").write_text("{}")
    for role, folder in [
        ("router", "ckpt/router/adapter"),
        *(("expert", f"ckpt/experts/{n}/adapter") for n in NAMES),
    ]:
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "adapter_config.json").write_text("{}")
        label_map = {n: i for i, n in enumerate(NAMES)}
        write_adapter_info(tmp_path / folder, {"role": role, "base_model": "b", "label_map": label_map})
    return tmp_path


def _holders(folders: list[Path]) -> list[int]:
    return [json.loads((f / LOCK_FILE).read_text())["pid"] for f in folders]


def _cases(wd: Path) -> dict:
    """stage -> (module attribute doing the work, its stand-in result, call, folders that must be locked)."""
    experts_out = (wd / "config/../checkpoints/experts").resolve()
    return {
        "data.routing": (
            "mole_trainer.data.routing.build_routing_dataset",
            {"records": 1, "imbalance_ratio": 1.0},
            lambda: stages.data_routing(wd / "config/dataset.yaml", wd / "routing/r.jsonl", wd),
            [wd / "routing"],
        ),
        "data.preprocess": (
            "mole_trainer.data.preprocess.preprocess_splits",
            {"counts": {"train": 1}, "records": {"rejected": 0}},
            lambda: stages.data_preprocess(wd / "data/experts/ocr", wd / "prep-ocr", "m", workdir=wd),
            [wd / "prep-ocr"],
        ),
        "train.router": (
            "mole_trainer.train.router.train_router",
            {"best": {}, "adapter": "a"},
            lambda: stages.train_router(wd / "prep", wd / "config/router.yaml", wd),
            [(wd / "config/../checkpoints/router").resolve()],
        ),
        "train.experts": (
            "mole_trainer.train.experts.train_experts",
            {},
            lambda: stages.train_experts(wd / "config/loras.yaml", wd, only=["calendar", "ocr"]),
            [experts_out / "calendar", experts_out / "ocr"],
        ),
        "deploy": (
            "mole_trainer.deploy.deploy",
            {"files": []},
            lambda: stages.deploy(wd / "ckpt/router", wd / "ckpt/experts", str(wd / "dest"), wd),
            [wd / "dest"],
        ),
    }


@pytest.mark.parametrize(
    "stage", ["data.routing", "data.preprocess", "train.router", "train.experts", "deploy"]
)
def test_stage_holds_its_output_lock_and_refuses_a_held_one(wd: Path, stage: str, monkeypatch):
    import importlib

    target, result, call, folders = _cases(wd)[stage]
    module, name = target.rsplit(".", 1)
    seen = []

    def probe(*args, **kwargs):
        seen.append(_holders(folders))
        return result

    monkeypatch.setattr(importlib.import_module(module), name, probe)
    call()
    assert seen == [[os.getpid()] * len(folders)], "the lock is held while the stage works"
    assert not any((f / LOCK_FILE).exists() for f in folders), "and released after"
    assert History(wd / HISTORY_DB).runs(stage)[0]["status"] == "ok"

    held = OutputLock(folders[-1], "someone.else", renew_every=None).acquire()
    with pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
        call()
    held.release()
    assert len(seen) == 1, "a refused stage does no work"
    assert len(History(wd / HISTORY_DB).runs(stage)) == 1, "nor records a run"
    assert not any((f / LOCK_FILE).exists() for f in folders[:-1]), "and holds no lock"


def test_deploy_refuses_to_copy_a_router_or_expert_being_written(wd: Path, monkeypatch):
    import importlib

    copied = []
    monkeypatch.setattr(
        importlib.import_module("mole_trainer.deploy"), "deploy", lambda *a: copied.append(a) or {"files": []}
    )
    for source in (wd / "ckpt/router", wd / "ckpt/experts/ocr"):
        held = OutputLock(source, "train.someone", renew_every=None).acquire()
        with pytest.raises(LockHeld, match="being written by another run"):
            stages.deploy(wd / "ckpt/router", wd / "ckpt/experts", str(wd / "dest"), wd)
        held.release()
    assert copied == [] and not (wd / "dest").exists()
    # a lock left by a dead writer is no reason to refuse
    (wd / "ckpt/router" / LOCK_FILE).write_text(json.dumps({"host": "gone", "pid": 1, "expires_at": 0}))
    stages.deploy(wd / "ckpt/router", wd / "ckpt/experts", str(wd / "dest"), wd)
    assert len(copied) == 1
