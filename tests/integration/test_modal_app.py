"""The Modal app without credentials: every stage function through `.local()` on the tiny model, with
MOLE_MODAL_ROOT standing in for the Volumes; the path helper; the image's package list; `.remote()`."""

from __future__ import annotations

import json
import os
import shlex
import time
import tomllib
from pathlib import Path

import pytest
import yaml

pytest.importorskip("modal")
# .local() warns that Volumes are not mounted: MOLE_MODAL_ROOT stands in for them on purpose
pytestmark = pytest.mark.filterwarnings("ignore:The .* function is executing locally:UserWarning")

from mole_trainer.cloud import modal_app as m  # noqa: E402
from mole_trainer.errors import UserError  # noqa: E402
from mole_trainer.layout import HISTORY_DB, MANIFEST_FILE  # noqa: E402

COUNTS = {"train": 12, "val": 4, "test": 4}
IMAGE_SIZE = (320, 240)
PIXELS = {"min_pixels": 4096, "max_pixels": 20000}
TRAIN = {"lr": 0.002, "steps": 3, "batch_size": 2, "eval_every": 3, "seed": 0}


def _write_configs(config_dir: Path, experts: list[str]) -> None:
    """Tiny dataset/loras/router configs in the data Volume, in the layout of the module docstring."""
    config_dir.mkdir(parents=True, exist_ok=True)
    dataset = {
        "experts": {e: {"path": f"../{m.EXPERTS_DATA}/{e}"} for e in experts},
        "train_per_expert": COUNTS["train"],
        "val_per_expert": COUNTS["val"],
        "test_per_expert": COUNTS["test"],
        "seed": 0,
    }
    model = f"../../{m.MODELS}/{m.TINY_MODEL}"
    loras = {
        "base_model": model,
        "output_dir": f"../../{m.CHECKPOINTS}/{m.EXPERTS_CKPT}",
        "image": PIXELS,
        "lora": {"rank": 4, "alpha": 8},
        "train": TRAIN,
        "eval_records": 2,
        "experts": {e: {"data": f"../{m.EXPERTS_DATA}/{e}", "max_new_tokens": 4} for e in experts},
    }
    router = {
        "base_model": model,
        "output_dir": f"../../{m.CHECKPOINTS}/{m.ROUTER_CKPT}",
        "image": PIXELS,
        "lora": {"rank": 4, "alpha": 8},
        "train": TRAIN,
        "eval_max_records": 8,
    }
    for name, cfg in (("dataset.yaml", dataset), ("loras.yaml", loras), ("router.yaml", router)):
        (config_dir / name).write_text(yaml.safe_dump(cfg))


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """A fresh folder as MOLE_MODAL_ROOT, with torch on one thread, for the module's stage runs."""
    import torch

    threads = torch.get_num_threads()
    # one thread: on a shared 2-core machine two OpenMP threads wait on each other (a 30x slowdown seen)
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(m.LOCAL_ROOT_ENV, str(tmp_path_factory.mktemp("volumes")))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield Path(os.environ[m.LOCAL_ROOT_ENV])
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipeline(volumes):
    """{stage: result} of one run of every stage function in pipeline order."""
    out = {"model": m.model_tiny.local()}
    out["synth"] = m.data_synth.local(**COUNTS, width=IMAGE_SIZE[0], height=IMAGE_SIZE[1])
    _write_configs(volumes / m.DATA / m.CONFIG_DIR, list(out["synth"]))
    out["routing"] = m.data_routing.local()
    out["check"] = m.data_check.local()
    out["prep"] = m.data_preprocess.local(**PIXELS, workers=2)
    out["experts"] = m.train_experts.local()
    out["router"] = m.train_router.local()
    out["eval"] = m.eval_router.local(batch_size=4)
    out["test_router"] = m.test_router.local(per_expert=2, min_accuracy=0.0)
    out["deploy"] = m.deploy.local(min_accuracy=out["eval"]["accuracy"])
    return out


@pytest.mark.slow
def test_every_stage_runs_locally_on_the_volume_layout(volumes, pipeline):
    root, out = volumes, pipeline
    assert out["model"]["model"] == str(root / m.MODELS / m.TINY_MODEL)
    experts = sorted(out["synth"])
    assert (root / m.DATA / m.ROUTING_FILE).is_file()
    assert out["routing"]["records"] == len(experts) * sum(COUNTS.values())
    assert out["check"]["records"] == out["routing"]["records"] and not out["check"]["violations"]
    for name in experts:
        adapter = root / m.CHECKPOINTS / m.EXPERTS_CKPT / name / "adapter"
        assert out["experts"][name]["adapter"] == str(adapter)
        assert (adapter / "adapter_config.json").is_file()
    assert (Path(out["router"]["adapter"]) / "adapter_config.json").is_file()
    report = json.loads((root / m.CHECKPOINTS / m.EVAL_REPORT).read_text())
    assert 0.0 <= report["accuracy"] <= 1.0 and report["n"] == len(experts) * COUNTS["test"]
    assert out["test_router"]["passed"] and out["test_router"]["n"] == 2 * len(experts)
    assert out["deploy"]["router_gate"]["source"] == str(root / m.CHECKPOINTS / m.EVAL_REPORT)
    deployed = root / m.CHECKPOINTS / m.DEPLOY_DIR
    release = json.loads((deployed / "CURRENT").read_text())["release"]
    assert out["deploy"]["release"] == release
    manifest = json.loads((deployed / "releases" / release / MANIFEST_FILE).read_text())
    assert sorted(manifest["experts"]) == experts
    assert (root / m.CHECKPOINTS / HISTORY_DB).is_file()


@pytest.mark.slow
def test_fanout_trains_every_expert_with_a_history_of_its_own(volumes, pipeline, monkeypatch):
    # .starmap needs Modal: run each call in-process, as its container would
    monkeypatch.setattr(m.train_experts, "starmap", lambda calls: [m.train_experts.local(*c) for c in calls])
    results = m.train_expert_fanout.local()
    assert sorted(results) == sorted(pipeline["synth"])
    for name in results:
        assert (volumes / m.CHECKPOINTS / m.FANOUT_WORKDIR / name / HISTORY_DB).is_file()


@pytest.mark.slow
def test_a_retried_training_resumes_from_its_checkpoint_on_the_volume(pipeline):
    # Modal retries call the function again: it continues from the Volume instead of starting over
    first = pipeline["router"]
    again = m.train_router.local()
    assert first["resumed_from"] == 0
    assert again["resumed_from"] == again["steps"] == first["steps"] and again["best"] == first["best"]


def test_volume_paths_stay_inside_their_volume(monkeypatch, tmp_path):
    monkeypatch.delenv(m.LOCAL_ROOT_ENV, raising=False)
    assert m.volume_path(m.DATA, "config/loras.yaml") == Path("/vol/data/config/loras.yaml")
    monkeypatch.setenv(m.LOCAL_ROOT_ENV, str(tmp_path))
    assert m.volume_path(m.CHECKPOINTS, ".") == tmp_path / m.CHECKPOINTS
    for bad in ("../models/x", "a/../../b", "/etc/passwd", "/vol/data/x"):
        with pytest.raises(UserError, match="relative"):
            m.volume_path(m.DATA, bad)


def test_remote_without_credentials_fails_at_once():
    start = time.perf_counter()
    with pytest.raises(Exception):  # noqa: B017 - Modal's error type for an unhydrated function is not public
        m.model_tiny.remote()
    assert time.perf_counter() - start < 10


def _dockerfile_commands(image) -> list[str]:
    """The Dockerfile lines of an image and its bases (walks modal 1.6's private closures)."""
    from modal._image import _Image
    from modal._utils.async_utils import synchronizer

    def walk(img) -> list[str]:
        closure = img._load.__closure__ or ()
        cells = dict(zip(img._load.__code__.co_freevars, (c.cell_contents for c in closure), strict=True))
        bases = [v for v in cells.values() if isinstance(v, _Image)]
        bases += [v for v in (cells.get("base_images") or {}).values() if isinstance(v, _Image)]
        own = cells["dockerfile_function"]("2025.06").commands if cells.get("dockerfile_function") else []
        return [line for b in bases for line in walk(b)] + own

    return walk(synchronizer._translate_in(image))


def test_image_installs_exactly_the_pyproject_dependencies():
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    commands = _dockerfile_commands(m.image)
    prefix = "RUN python -m pip install "
    pip = [shlex.split(c.removeprefix(prefix)) for c in commands if c.startswith(prefix)]
    assert len(pip) == 1
    assert sorted(pip[0]) == sorted(pyproject["project"]["dependencies"])
    assert f"ENV HF_HOME={m.HF_HOME}" in commands
