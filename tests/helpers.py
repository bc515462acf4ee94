"""Small settings for end-to-end tests: the demo's configs with tiny sizes merged in."""

import base64
import io
import re

from mole_trainer.configs import write_configs

NAMES = ["calendar", "chart-screen", "login-window", "ocr"]
SMALL_TRAIN = {"lr": 0.003, "steps": 4, "batch_size": 4, "eval_every": 2, "warmup_ratio": 0.0, "patience": 0}
SMALL_LORA = {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}
SMALL_IMAGE = {"min_pixels": 4096, "max_pixels": 20000}
SMALL = {
    "dataset.yaml": {"train_per_expert": 8, "val_per_expert": 2, "test_per_expert": 3},
    "loras.yaml": {"image": SMALL_IMAGE, "lora": SMALL_LORA, "train": SMALL_TRAIN, "eval_records": 2},
    "router.yaml": {"image": SMALL_IMAGE, "lora": SMALL_LORA, "train": SMALL_TRAIN},
}


def write_small_configs(config_dir) -> None:
    """The demo's three configs with test sizes, in `config_dir` (WORKDIR/config layout)."""
    write_configs(config_dir, SMALL, every_expert={"loras.yaml": {"max_new_tokens": 4}})


# The demo's configs cut down until a `mole demo` costs about a minute more than SMALL on a 2-core CPU,
# yet still learns: the router far above chance on the test requests, every expert above its untrained
# base (test_demo.py asserts both). The demo's LoRA (rank 16 on every projection) and max_new_tokens are
# kept; the cuts are fewer records and steps, smaller images and a higher expert lr.
QUALITY_IMAGE = {"min_pixels": 4096, "max_pixels": 20000}
QUALITY_TEST_PER_EXPERT = 8
QUALITY_ROUTER_STEPS = 200
QUALITY = {
    "dataset.yaml": {"train_per_expert": 96, "val_per_expert": 4, "test_per_expert": QUALITY_TEST_PER_EXPERT},
    "loras.yaml": {
        "image": QUALITY_IMAGE,
        "train": {"lr": 0.005, "steps": 120, "batch_size": 8, "eval_every": 120, "warmup_ratio": 0.1},
        "eval_records": 8,
    },
    "router.yaml": {
        "image": QUALITY_IMAGE,
        "train": {
            "lr": 0.003,
            "steps": QUALITY_ROUTER_STEPS,
            "batch_size": 8,
            "eval_every": 50,
            "warmup_ratio": 0.1,
            "patience": 0,
        },
    },
}


def write_quality_configs(config_dir) -> None:
    """The demo's three configs at the QUALITY sizes, in `config_dir` (WORKDIR/config layout)."""
    write_configs(config_dir, QUALITY)


def report_images(page: str, names) -> dict[str, bytes]:
    """The embedded PNG of each named figure section of a history report page (b"" when it has none)."""
    out = {}
    for name in names:
        section = re.search(rf'<section id="{name}">(.*?)</section>', page, re.S)
        assert section, f"no section {name}"
        img = re.search(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', section.group(1))
        out[name] = base64.b64decode(img.group(1)) if img else b""
    return out


def png_has_drawing(png: bytes) -> bool:
    """A real PNG with something drawn on it: many distinct colours, not a blank canvas."""
    from PIL import Image

    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        return False
    image = Image.open(io.BytesIO(png)).convert("RGB")
    return image.width >= 300 and len(image.getcolors(1 << 20) or []) > 20


# A deployment of random adapters for engine and server tests: (LoRA spec, pixel budget, max_new_tokens).
# Ranks, targets and budgets differ on purpose: the stacked layer must pad ranks, skip modules an
# adapter leaves alone, and process the images again for an expert with its own pixel budget.
DEPLOY_ROUTER = ({"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}, SMALL_IMAGE)
DEPLOY_EXPERTS = {
    "calendar": ({"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}, SMALL_IMAGE, 6),
    "chart-screen": ({"rank": 8, "alpha": 8, "targets": ["q_proj", "k_proj", "o_proj"]}, SMALL_IMAGE, 6),
    "login-window": (
        {"rank": 2, "alpha": 4, "targets": ["gate_proj", "up_proj", "down_proj"]},
        SMALL_IMAGE,
        5,
    ),
    "ocr": (
        {"rank": 4, "alpha": 8, "targets": ["v_proj", "down_proj"]},
        {"min_pixels": 4096, "max_pixels": 40000},
        8,
    ),
}
DEPLOY_B_STD = 0.5  # PEFT initialises B to zero: random B makes every adapter change the outputs


def build_tiny_deployment(
    model_dir, root, experts: dict | None = None, router: tuple | None = None, base=None
) -> dict:
    """Router + expert adapters with random non-zero LoRA weights on `model_dir`, saved as training
    saves them (PEFT folder + mole_adapter.json) and deployed into root/deploy. `experts` ({name:
    (lora, image budget, max_new_tokens)}) and `router` ((lora, image budget)) default to DEPLOY_*;
    `base`: the model of `model_dir` already loaded (left as it was).

    Returns {"deployment": path, "names": expert names in label order, "adapters": {name: folder}}.
    """
    from pathlib import Path

    import torch

    from mole_trainer.adapter_info import write_adapter_info
    from mole_trainer.config import LoraSpec
    from mole_trainer.deploy import deploy
    from mole_trainer.model.loading import load_base
    from mole_trainer.model.multi_lora import expert_weights_from_spec, save_peft_adapter
    from mole_trainer.router_prompt import ROUTER_PROMPT_VERSION

    root = Path(root)
    experts_spec = experts or DEPLOY_EXPERTS
    base = load_base(str(model_dir), device="cpu") if base is None else base
    names = sorted(experts_spec)
    label_map = {n: i for i, n in enumerate(names)}

    def adapter(folder, lora, seed, info):
        spec = LoraSpec(**lora)
        weights = expert_weights_from_spec(base, spec, seed)
        gen = torch.Generator().manual_seed(seed)
        for w in weights.values():
            w.B = (torch.randn(w.B.shape, generator=gen) * DEPLOY_B_STD).to(w.B.device, w.B.dtype)
        save_peft_adapter(folder, spec, weights, str(model_dir))
        write_adapter_info(folder, {"base_model": str(model_dir), **info})
        return str(folder)

    lora, image = router or DEPLOY_ROUTER
    router_dir = adapter(
        root / "router/adapter",
        lora,
        100,
        {"role": "router", "prompt_version": ROUTER_PROMPT_VERSION, "label_map": label_map, **image},
    )
    expert_dirs = {}
    for i, name in enumerate(names):
        lora, image, max_new = experts_spec[name]
        expert_dirs[name] = adapter(
            root / f"experts/{name}/adapter",
            lora,
            i,
            {"role": "expert", "expert": name, "max_new_tokens": max_new, **image},
        )
    deploy(router_dir, expert_dirs, label_map, str(root / "deploy"))
    return {
        "deployment": str(root / "deploy"),
        "names": names,
        "adapters": {"router": router_dir, **expert_dirs},
    }


def kill_when(argv: list[str], ready, env: dict, timeout: float = 240) -> None:
    """Run `python ARGV` with `env`, SIGKILL it as soon as `ready()` holds; fail if it ends on its own first."""
    import signal
    import subprocess
    import sys
    import time

    import pytest

    proc = subprocess.Popen(
        [sys.executable, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
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
