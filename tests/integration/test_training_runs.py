"""Training as users run it, in real processes: SIGKILL and --resume, torchrun with gloo, checkpointing.

The router is trained through `python -m mole_trainer train router` on the tiny model.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mole_trainer.cli import main
from mole_trainer.train import checkpoint as ckpt

from ..helpers import write_small_configs

pytestmark = pytest.mark.slow

ROUTER_TRAIN = {"lr": 0.003, "steps": 8, "batch_size": 4, "eval_every": 4, "warmup_ratio": 0.25}


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


def kill_when(cmd: list[str], ready, extra_env: dict | None = None, timeout: float = 240) -> None:
    """Start `cmd`, SIGKILL it as soon as `ready()` holds; fail if it ends on its own first."""
    proc = subprocess.Popen(
        [sys.executable, *cmd], env=env(**(extra_env or {})), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be killed:\n" + proc.stdout.read().decode())
            if time.monotonic() > deadline:
                pytest.fail("timed out waiting for the moment to kill")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


def adapter_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "adapter/adapter_model.safetensors")


def test_sigkill_mid_step_and_mid_save_then_resume_is_bit_identical(wd):
    # LoRA dropout on: resuming must also restore the RNG, not only weights and optimizer
    train = {**ROUTER_TRAIN, "steps": 12, "save_every": 1, "keep_checkpoints": 2}
    lora = {"dropout": 0.1}
    ref_cfg, cut_cfg = router_config(wd, "ref", train, lora), router_config(wd, "cut", train, lora)
    run_ok(train_cmd(wd, ref_cfg))
    ref, cut = wd / "checkpoints/ref", wd / "checkpoints/cut"
    ckpts = cut / "checkpoints"

    # 1. killed at an arbitrary step: as soon as a randomly chosen step's checkpoint is on disk
    k = random.Random().randint(2, 5)

    def after_step_k():
        done = ckpt.list_checkpoints(ckpts)
        return bool(done) and int(done[-1].name.split("-")[1]) >= k

    kill_when(train_cmd(wd, cut_cfg), after_step_k)
    assert ckpts.is_dir() and ckpt.list_checkpoints(ckpts)

    # 2. resumed, then killed in the middle of writing a checkpoint (a fault-injection pause between files)
    before = ckpt.list_checkpoints(ckpts)[-1]

    def mid_save():
        return any((p / ckpt.STATE_FILE).is_file() for p in ckpts.glob(".step-*.tmp"))

    kill_when(train_cmd(wd, cut_cfg, "--resume"), mid_save, {ckpt.SAVE_DELAY_ENV: "30"})
    leftovers = list(ckpts.glob(".step-*.tmp"))
    assert leftovers, "the kill should have landed inside a save"
    state, meta, newest = ckpt.load_latest(ckpts)
    step_of = lambda p: int(p.name.split("-")[1].split(".")[0])  # noqa: E731
    assert step_of(newest) == step_of(leftovers[0]) - 1 and step_of(newest) >= step_of(before)
    assert meta["step"] == step_of(newest) and set(state) >= {"trainable", "optimizer", "rng", "stream"}

    # 3. resumed to the end: the same adapter, bit for bit, and the same log
    out = run_ok(train_cmd(wd, cut_cfg, "--resume"))
    assert f"resuming from {newest}" in out
    a, b = adapter_tensors(ref), adapter_tensors(cut)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), key
    assert (ref / "train_log.jsonl").read_text() == (cut / "train_log.jsonl").read_text()
    assert not list(ckpts.glob(".step-*.tmp")), "a finished save removes what a killed one left"


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
    from mole_trainer.train.loop import enable_gradient_checkpointing, token_loss_sum

    _, train = load_preprocessed(wd / "prep", "train")
    batch = collate([train["examples"][i] for i in range(4)], 0)
    labels = batch.pop("labels")

    def grads(checkpointing: bool):
        model = attach_lora(load_base(str(tiny_model), "float32", "cpu"), LoraSpec(rank=4, alpha=8), 0)
        if checkpointing:
            enable_gradient_checkpointing(model)
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        model.train()
        token_loss_sum(model(**batch).logits, labels).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, saved = grads(False), grads(True)
    for n in plain:
        torch.testing.assert_close(plain[n], saved[n], rtol=1e-5, atol=1e-7)
