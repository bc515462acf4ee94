"""bench/gpu_train.py runs on the CPU (`--shapes tiny`): every path measured, the table printed last."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_gpu_train_bench_smoke_run_on_the_cpu(tmp_path):
    args = ["--shapes", "tiny", "--steps", "1", "--warmup", "1", "--repeats", "1", "--experts", "2"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench/gpu_train.py"), *args, "--out-dir", str(tmp_path / "out")],
        cwd=tmp_path,  # nothing read relative to the working directory
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out/gpu_train.json").read_text())
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    (shape,) = report["shapes"]
    assert "error" not in shape, shape
    for path in ("ours", "peft", "concurrent", "sequential_peft"):
        assert shape[path]["samples_per_s"] > 0 and shape[path]["mfu"] > 0, path
    assert shape["loss_check"]["abs_diff"] < 1e-5  # fp32: the answer-only loss is HF's loss
    lines = proc.stdout.strip().splitlines()
    assert lines[-4].split()[:2] == ["tiny", "ours"] and lines[-1].split()[:3] == [
        "tiny",
        "sequential",
        "PEFT",
    ]


def test_the_8b_shape_is_qwen3_vl_8b_parameter_for_parameter():
    """Built on the meta device (no memory): the names and sizes of the published checkpoint's weights."""
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from peft_reference import build

    index = json.loads(
        (REPO / "tests/fixtures/qwen3-vl-8b-processor/model.safetensors.index.json").read_text()
    )
    model, _ = build("8b", "meta", torch.bfloat16)
    names = {n for n, _ in model.named_parameters()}
    assert names == set(index["weight_map"])
    assert 2 * sum(p.numel() for p in model.parameters()) == index["metadata"]["total_size"]  # bf16: 2 bytes
