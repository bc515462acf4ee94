"""Shared fixtures: offline settings, a tiny Qwen3-VL and small synthetic datasets, built once."""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SMALL_COUNTS = {"train": 12, "val": 4, "test": 6}
SMALL_SIZE = (320, 240)


def pytest_collection_modifyitems(config, items):
    """Skip tests marked gpu when CUDA is absent."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Path of a tiny Qwen3-VL saved with save_pretrained."""
    from mole_trainer.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """Folder with the four synthetic expert datasets (small)."""
    from mole_trainer.data.synth import synthesize

    root = tmp_path_factory.mktemp("experts")
    synthesize(root, counts=SMALL_COUNTS, seed=0, image_size=SMALL_SIZE)
    return root


@pytest.fixture(scope="session")
def tiny_deployment(tiny_model, tmp_path_factory):
    """A deployment of the tiny model: a router and 4 experts with random non-zero LoRA weights
    (tests/helpers.py DEPLOY_*). {"deployment": folder, "names": experts in label order, "adapters"}."""
    from tests.helpers import build_tiny_deployment

    return build_tiny_deployment(tiny_model, tmp_path_factory.mktemp("tiny-deployment"))
