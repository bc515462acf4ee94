"""Releases on a real S3 API: moto's standalone server on 127.0.0.1 (a free port), reached through s3fs.

Two deploys, list, infer from s3://, rollback, infer again; a deploy SIGKILLed mid-upload leaves CURRENT
on the previous release; a corrupted object fails `verify` and a fresh load, naming the object.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mole_trainer.cli import main
from mole_trainer.layout import CURRENT_FILE, MANIFEST_FILE, RELEASES_DIR

BUCKET = "mole-releases"
PIXELS = {"min_pixels": 4096, "max_pixels": 20000}
SRC = Path(__file__).resolve().parents[2] / "src"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(s3fs filesystem, environment) of a moto S3 server on loopback with one bucket; stopped after."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MOLE_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
    }
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            import s3fs

            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir(BUCKET)
            yield fs, env
            s3fs.S3FileSystem.clear_instance_cache()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    """Router checkpoints and expert folders for two deployments with different expert names.

    Random LoRA weights (no training): what is checked is which release gets loaded, not routing quality.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from mole_trainer.adapter_info import write_adapter_info
    from mole_trainer.model.loading import load_base
    from mole_trainer.router_prompt import ROUTER_PROMPT_VERSION

    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    model = get_peft_model(
        load_base(str(tiny_model), "float32", "cpu"),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    out = {}
    for version, names in (("v1", ["alpha", "beta"]), ("v2", ["alpha", "gamma"])):
        label_map = {name: i for i, name in enumerate(names)}
        router = root / version / "router" / "adapter"
        model.save_pretrained(router)
        write_adapter_info(
            router,
            {
                "role": "router",
                "prompt_version": ROUTER_PROMPT_VERSION,
                "base_model": str(tiny_model),
                "label_map": label_map,
                **PIXELS,
            },
        )
        for name in names:
            folder = root / version / "experts" / name / "adapter"
            model.save_pretrained(folder)
            info = {"role": "expert", "expert": name, "base_model": str(tiny_model), "max_new_tokens": 2}
            write_adapter_info(folder, {**info, **PIXELS})
        out[version] = (str(root / version / "router"), str(root / version / "experts"))
    return out


@pytest.fixture(scope="module")
def request_image(tmp_path_factory) -> str:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "screen.png"
    Image.new("RGB", (96, 80), (200, 30, 30)).save(path)
    return str(path)


def mole(workdir: Path, *args: str) -> int:
    return main(["--workdir", str(workdir), *args])


def deploy_args(adapters: dict, version: str, url: str) -> list[str]:
    router, experts = adapters[version]
    return ["deploy", "--checkpoint", router, "--experts", experts, "--bucket", url]


def routed_experts(deployment: str, image: str, workdir: Path) -> set[str]:
    """The expert names the loaded release routes between (the keys of each routing distribution)."""
    from mole_trainer import stages
    from mole_trainer.infer.stacked import request_sample

    results = stages.infer(
        deployment,
        [request_sample(image, "Read it")],
        workdir,
        device="cpu",
        dtype="float32",
        max_new_tokens=2,
    )
    return set(results[0]["probs"])


def current_release(fs, prefix: str) -> str:
    return json.loads(fs.cat_file(f"{prefix}/{CURRENT_FILE}"))["release"]


@pytest.mark.slow
def test_two_deploys_list_infer_rollback_infer_again(s3, adapters, request_image, tmp_path, capsys):
    fs, _ = s3
    url = f"s3://{BUCKET}/stack"
    assert mole(tmp_path, *deploy_args(adapters, "v1", url)) == 0
    first = current_release(fs, f"{BUCKET}/stack")
    assert mole(tmp_path, *deploy_args(adapters, "v2", url)) == 0
    second = current_release(fs, f"{BUCKET}/stack")
    assert second > first
    assert fs.isfile(f"{BUCKET}/stack/{RELEASES_DIR}/{first}/{MANIFEST_FILE}")  # the first stays

    capsys.readouterr()
    assert mole(tmp_path, "deploy", "list", url) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [row.split()[:2] for row in rows] == [["-", first], ["*", second]]

    assert routed_experts(url, request_image, tmp_path) == {"alpha", "gamma"}
    assert mole(tmp_path, "deploy", "rollback", url) == 0
    assert current_release(fs, f"{BUCKET}/stack") == first
    assert routed_experts(url, request_image, tmp_path) == {"alpha", "beta"}
    assert mole(tmp_path, "deploy", "verify", url) == 0


def _spawn_deploy(adapters: dict, url: str, env: dict, workdir: Path, pause_after: int):
    environ = {
        **os.environ,
        **env,
        "PYTHONPATH": str(SRC),
        "MOLE_DEPLOY_PAUSE_AFTER_FILES": str(pause_after),  # deploy.PAUSE_ENV: the test hook
    }
    cmd = [sys.executable, "-m", "mole_trainer", "--workdir", str(workdir), *deploy_args(adapters, "v2", url)]
    return subprocess.Popen(cmd, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_line(proc, fragment: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 0.5)
        if ready:
            line = proc.stderr.readline()
            seen += line
            if fragment in line:
                return seen
            if not line and proc.poll() is not None:
                break
    raise AssertionError(f"the deploy never printed {fragment!r}; stderr: {seen}")


@pytest.mark.slow
def test_deploy_killed_mid_upload_leaves_current_and_corruption_is_named(
    s3, adapters, request_image, tmp_path, capsys
):
    fs, env = s3
    url = f"s3://{BUCKET}/killed"
    assert mole(tmp_path, *deploy_args(adapters, "v1", url)) == 0
    first = current_release(fs, f"{BUCKET}/killed")

    proc = _spawn_deploy(adapters, url, env, tmp_path, pause_after=3)
    try:
        _wait_for_line(proc, "deploy paused after 3 files")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    fs.invalidate_cache()
    assert current_release(fs, f"{BUCKET}/killed") == first
    partial = [p for p in fs.ls(f"{BUCKET}/killed/{RELEASES_DIR}") if not p.endswith(first)]
    assert len(partial) == 1 and not fs.exists(f"{partial[0]}/{MANIFEST_FILE}")  # 3 objects, no manifest
    assert len(fs.find(partial[0])) == 3
    capsys.readouterr()
    assert mole(tmp_path, "deploy", "list", url) == 0
    assert "incomplete" in capsys.readouterr().out
    assert routed_experts(url, request_image, tmp_path) == {"alpha", "beta"}

    # a corrupted object: verify and a load that has not cached this release yet both name it
    bad = "loras/beta/adapter/adapter_model.safetensors"
    fs.pipe_file(f"{BUCKET}/killed/{RELEASES_DIR}/{first}/{bad}", b"not the weights")
    capsys.readouterr()
    assert mole(tmp_path, "deploy", "verify", url) == 1
    assert f"{bad}: changed" in capsys.readouterr().out
    from mole_trainer.deploy import load_deployment
    from mole_trainer.errors import UserError

    with pytest.raises(UserError, match=f"{first}.*{bad}"):
        load_deployment(url, cache_dir=tmp_path / "fresh-cache")
