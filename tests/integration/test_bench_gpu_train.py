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
    assert "stacked_inference" not in report and "serve_load" not in report  # CUDA only
    lines = proc.stdout.strip().splitlines()
    assert lines[-4].split()[:2] == ["tiny", "ours"] and lines[-1].split()[:3] == [
        "tiny",
        "sequential",
        "PEFT",
    ]


def test_the_serving_part_at_a_real_shape_runs_cut_to_one_layer_on_the_cpu():
    """gpu_train's 8b serving part with a 2b shape cut to 1 layer on the CPU: the random-weight base is
    saved with its processor, `mole serve` loads it from disk and answers the load, the row is tabled."""
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_inference import PARTS, run_part, table_lines

    (part,) = [p for p in PARTS if p.key == "serve_load"]
    smoke = ("--shape", "2b", "--layers", "1", "--clients", "2", "--requests", "2", "--serial-requests", "2")
    result = run_part(part, 300, "cpu", (*smoke, "--max-tokens", "2", "--image", "160x120"))
    assert "error" not in result, result["error"]
    assert result["deployment"] == "2b (random weights, 1 layers)" and result["device"] == "cpu"
    assert result["levels"][0]["requests"] == 4 and result["serial"]["requests"] == 2
    assert result["batched_over_serial"] > 0
    (line,) = table_lines({"serve_load": {"2b": result}})
    assert line.startswith("2b       serving 2 tok: ") and "clients" in line


def test_a_part_past_the_budget_is_stopped_there():
    import time

    sys.path.insert(0, str(REPO / "bench"))
    from gpu_inference import PARTS, run_part

    start = time.perf_counter()
    result = run_part(PARTS[1], 2, "cpu", ("--shape", "2b", "--layers", "1"))
    assert result["error"] == "stopped after 2 s (the budget)" and time.perf_counter() - start < 10


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
