"""Training as users run it, in real processes: SIGKILL and --resume, torchrun with gloo, checkpointing,
one writer per output folder and the history of killed and resumed runs.

The router is trained through `python -m mole_trainer train router` on the tiny model.
"""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mole_trainer.cli import main
from mole_trainer.layout import LOCK_FILE
from mole_trainer.train import checkpoint as ckpt

from ..helpers import kill_when, write_small_configs

pytestmark = pytest.mark.slow

ROUTER_TRAIN = {"lr": 0.003, "steps": 8, "batch_size": 4, "eval_every": 4, "warmup_ratio": 0.25}
# LoRA dropout on: resuming must also restore the RNG, not only weights and optimizer
KILL_TRAIN = {**ROUTER_TRAIN, "steps": 12, "save_every": 1, "keep_checkpoints": 2}
KILL_LORA = {"dropout": 0.1}


@pytest.fixture(scope="module")
def wd(tmp_path_factory, tiny_model, synth_data):
    w = tmp_path_factory.mktemp("training")
    write_small_configs(w / "config")
    (w / "model").mkdir()
    (w / "model/tiny-qwen3-vl").symlink_to(tiny_model)
    (w / "data").mkdir()
    (w / "data/experts").symlink_to(synth_data)
    routing = w / "data/routing/routing_data.jsonl"
    args = ["--workdir", str(w), "data"]
    assert main([*args, "routing", "--config", str(w / "config/dataset.yaml"), "--output", str(routing)]) == 0
    prep = ["--input", str(routing), "--output", str(w / "prep"), "--config", str(w / "config/router.yaml")]
    assert main([*args, "preprocess", *prep]) == 0
    return w


def router_config(wd: Path, name: str, train: dict, lora: dict | None = None) -> Path:
    """A router.yaml beside the test configs, writing to checkpoints/<name>."""
    cfg = yaml.safe_load((wd / "config/router.yaml").read_text())
    cfg["output_dir"] = f"../checkpoints/{name}"
    cfg["train"] = {**cfg["train"], **train}
    cfg["lora"] = {**cfg["lora"], **(lora or {})}
    path = wd / "config" / f"router-{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_cmd(wd: Path, config: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "mole_trainer",
        "--workdir",
        str(wd),
        "train",
        "router",
        "--dataset-path",
        str(wd / "prep"),
        "--config",
        str(config),
        "--device",
        "cpu",
        *extra,
    ]


def env(**extra: str) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", **extra}


def run_ok(cmd: list[str], **extra: str) -> str:
    proc = subprocess.run(
        [sys.executable, *cmd], env=env(**extra), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def adapter_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "adapter/adapter_model.safetensors")


def assert_same_training(ref: Path, out: Path) -> None:
    """The same adapter, bit for bit, and the same training log."""
    a, b = adapter_tensors(ref), adapter_tensors(out)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), key
    assert (ref / "train_log.jsonl").read_text() == (out / "train_log.jsonl").read_text()


def history_rows(wd: Path, output: Path) -> list[dict]:
    """The runs `mole history show --json` lists for one output folder, oldest first."""
    out = run_ok(["-m", "mole_trainer", "--workdir", str(wd), "history", "show", "--json"])
    rows = json.loads(out[out.index("[") :])
    return [r for r in reversed(rows) if r["output"] == str(output.resolve())]


def lock_holder(folder: Path) -> int | None:
    """pid in the folder's lock (None while there is none)."""
    try:
        return json.loads((folder / LOCK_FILE).read_text())["pid"]
    except (FileNotFoundError, ValueError, KeyError):
        return None


@pytest.fixture(scope="module")
def ref_router(wd) -> Path:
    """A lone, uninterrupted router run with the KILL_* settings: what every other run must equal."""
    run_ok(train_cmd(wd, router_config(wd, "ref", KILL_TRAIN, KILL_LORA)))
    return wd / "checkpoints/ref"


def test_sigkill_mid_step_and_mid_save_then_resume_is_bit_identical(wd, ref_router):
    cut_cfg = router_config(wd, "cut", KILL_TRAIN, KILL_LORA)
    ref, cut = ref_router, wd / "checkpoints/cut"
    ckpts = cut / "checkpoints"

    # 1. killed at an arbitrary step: as soon as a randomly chosen step's checkpoint is on disk
    k = random.Random().randint(2, 5)

    def after_step_k():
        done = ckpt.list_checkpoints(ckpts)
        return bool(done) and int(done[-1].name.split("-")[1]) >= k

    kill_when(train_cmd(wd, cut_cfg), after_step_k, env())
    assert ckpts.is_dir() and ckpt.list_checkpoints(ckpts)
    stale = json.loads((cut / LOCK_FILE).read_text())  # a killed run cannot remove its lock
    (killed,) = history_rows(wd, cut)
    assert killed["status"] == "interrupted" and killed["pid"] == stale["pid"]

    # 2. resumed, then killed in the middle of writing a checkpoint (a fault-injection pause between files)
    before = ckpt.list_checkpoints(ckpts)[-1]

    def mid_save():
        return any((p / ckpt.STATE_FILE).is_file() for p in ckpts.glob(".step-*.tmp"))

    kill_when(train_cmd(wd, cut_cfg, "--resume"), mid_save, env(**{ckpt.SAVE_DELAY_ENV: "30"}))
    run1, run2 = history_rows(wd, cut)
    assert run2["status"] == "interrupted" and run2["resumed_from"] == run1["run_id"]
    leftovers = list(ckpts.glob(".step-*.tmp"))
    assert leftovers, "the kill should have landed inside a save"
    state, meta, newest = ckpt.load_latest(ckpts)
    step_of = lambda p: int(p.name.split("-")[1].split(".")[0])  # noqa: E731
    assert step_of(newest) == step_of(leftovers[0]) - 1 and step_of(newest) >= step_of(before)
    assert meta["step"] == step_of(newest) and set(state) >= {"trainable", "optimizer", "rng", "stream"}

    # 3. resumed to the end, taking over the killed run's lock, while a second writer on the same
    #    folder is refused: the same adapter as the lone reference run, bit for bit, and the same log
    stale = json.loads((cut / LOCK_FILE).read_text())
    first = subprocess.Popen(
        [sys.executable, *train_cmd(wd, cut_cfg, "--resume")],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        while lock_holder(cut) != first.pid:
            assert first.poll() is None, first.stdout.read().decode()
            time.sleep(0.01)
        second = subprocess.run(
            [sys.executable, *train_cmd(wd, cut_cfg)], env=env(), capture_output=True, text=True, timeout=60
        )
        assert first.poll() is None, "the resumed run should still hold the folder"
    finally:
        out = first.communicate(timeout=300)[0].decode()
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"locked by another run: pid {first.pid} on " in second.stderr and "Traceback" not in second.stderr
    assert first.returncode == 0, out
    assert f"resuming from {newest}" in out
    assert f"taking over the lock of pid {stale['pid']}" in out and "is gone" in out
    assert_same_training(ref, cut)
    assert not list(ckpts.glob(".step-*.tmp")), "a finished save removes what a killed one left"
    assert not (cut / LOCK_FILE).exists()
    rows = history_rows(wd, cut)
    assert [r["run_id"] for r in rows[:2]] == [run1["run_id"], run2["run_id"]]
    (last,) = rows[2:]  # the refused writer recorded no run
    assert last["status"] == "ok" and last["resumed_from"] == run2["run_id"]


def test_torchrun_two_gloo_processes_match_one_process(wd):
    train = {**ROUTER_TRAIN, "steps": 4, "eval_every": 4}
    one_cfg, two_cfg = router_config(wd, "one", train), router_config(wd, "two", train)
    run_ok(train_cmd(wd, one_cfg))
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = run_ok([*launcher, *train_cmd(wd, two_cfg)])
    assert "2 processes" in out
    a, b = adapter_tensors(wd / "checkpoints/one"), adapter_tensors(wd / "checkpoints/two")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, worst
    assert max(float(a[k].abs().max()) for k in a) > 1e-3  # the adapters did move
    info = json.loads((wd / "checkpoints/two/router_info.json").read_text())
    assert info["processes"] == 2 and info["steps"] == 4
    rows = [json.loads(x) for x in (wd / "checkpoints/two/train_log.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (wd / "checkpoints/one/train_log.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] == pytest.approx(ref[-1]["train_loss"], rel=1e-4)


def test_torchrun_expert_training_matches_one_process(wd):
    cfg = yaml.safe_load((wd / "config/loras.yaml").read_text())
    cfg["train"] = {**cfg["train"], **ROUTER_TRAIN, "steps": 4, "eval_every": 4}
    cfg["eval_records"] = 1
    paths = {}
    for name in ("one", "two"):
        paths[name] = wd / "config" / f"loras-{name}.yaml"
        paths[name].write_text(yaml.safe_dump({**cfg, "output_dir": f"../checkpoints/experts-{name}"}))
    cmd = [
        "-m",
        "mole_trainer",
        "--workdir",
        str(wd),
        "train",
        "experts",
        "--only",
        "calendar",
        "--device",
        "cpu",
    ]
    run_ok([*cmd, "--config", str(paths["one"])])
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run_ok([*launcher, *cmd, "--config", str(paths["two"])])
    a = adapter_tensors(wd / "checkpoints/experts-one/calendar")
    b = adapter_tensors(wd / "checkpoints/experts-two/calendar")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    info = json.loads((wd / "checkpoints/experts-two/calendar/expert_info.json").read_text())
    assert info["processes"] == 2 and info["value"] is not None


def test_gradient_checkpointing_gives_the_same_gradients(wd, tiny_model):
    import torch

    from mole_trainer.config import LoraSpec
    from mole_trainer.data.preprocess import collate, load_preprocessed
    from mole_trainer.model.loading import load_base
    from mole_trainer.model.lora import attach_lora
    from mole_trainer.train.loop import enable_gradient_checkpointing
    from mole_trainer.train.loss import answer_loss_sum

    _, train = load_preprocessed(wd / "prep", "train")
    batch = collate([train["examples"][i] for i in range(4)], 0)
    labels = batch.pop("labels")

    def grads(checkpointing: bool):
        model = attach_lora(load_base(str(tiny_model), "float32", "cpu"), LoraSpec(rank=4, alpha=8), 0)
        if checkpointing:
            enable_gradient_checkpointing(model)
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        model.train()
        answer_loss_sum(model, batch, labels).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, saved = grads(False), grads(True)
    for n in plain:
        torch.testing.assert_close(plain[n], saved[n], rtol=1e-5, atol=1e-7)
