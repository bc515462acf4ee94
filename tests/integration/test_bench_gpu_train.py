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
