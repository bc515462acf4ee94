"""The inference part of bench/gpu_train.py: stacked-inference and serving figures at real shapes.

Each part runs a benchmark script as a subprocess on CUDA (random weights at Qwen3-VL-2B / -8B
shapes) and keeps the JSON object it prints last: bench/stacked_inference.py at 8b and 2b (the
mixed-expert batch against a single-expert batch and the PEFT ways), bench/serve_load.py at 8b (a
live `mole serve` under closed-loop load against a serial engine loop). The parts are small (16
requests of 16 new tokens, one timed run of each path) and a part starts only when its estimated
seconds fit in what is left of the whole script's budget; it is stopped (with the server it
started) at the budget's end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Part:
    """One benchmark run: its report key, shape, script, arguments and estimated seconds on an H200."""

    key: str
    shape: str
    script: str
    args: tuple[str, ...]
    estimate_s: float


_STACKED = ("--requests", "16", "--max-new-tokens", "16", "--repeats", "1", "--pair-repeats", "3")
_STACKED += ("--image", "448x280", "--threads", "8")
_SERVE = ("--clients", "4,16", "--requests", "16", "--serial-requests", "8", "--max-tokens", "16")
_SERVE += ("--max-batch", "16", "--image", "448x280")
# estimates: start-up and imports ~10 s, a random 8B model built on the GPU ~5 s, the 6 paths of 16
# requests (PEFT one request at a time is most of it) ~15 s at 8B; serving saves and reloads 16 GB
PARTS = (
    Part("stacked_inference", "8b", "stacked_inference.py", _STACKED, 75.0),
    Part("serve_load", "8b", "serve_load.py", _SERVE, 120.0),
    Part("stacked_inference", "2b", "stacked_inference.py", _STACKED, 45.0),
)


def run_part(part: Part, timeout_s: float, device: str = "cuda", extra: tuple[str, ...] = ()) -> dict:
    """Run one part (`extra` arguments last: they override) and return its JSON summary, or
    {"error": ...} with the end of its output when it fails or runs past `timeout_s`."""
    cmd = [sys.executable, str(HERE / part.script), "--shape", part.shape, "--device", device]
    cmd += [*part.args, *extra]
    start = time.perf_counter()
    # a session of its own: on a timeout the whole group (serve_load's server too) is stopped
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return {"error": f"stopped after {timeout_s:.0f} s (the budget)", "seconds": round(timeout_s, 1)}
    seconds = round(time.perf_counter() - start, 1)
    lines = out.strip().splitlines()
    try:
        if proc.returncode != 0:
            raise ValueError(f"exit status {proc.returncode}")
        return {**json.loads(lines[-1]), "seconds": seconds}
    except (ValueError, IndexError) as exc:
        return {"error": f"{exc}: {(err or out)[-600:]}", "seconds": seconds}


def run_inference(deadline: float, on_part, device: str = "cuda") -> None:
    """Run every part whose estimate fits before `deadline` (time.perf_counter() seconds); after
    each, on_part(key, shape, result) (a skipped part's result says why)."""
    for part in PARTS:
        left = deadline - time.perf_counter()
        if left < part.estimate_s:
            result = {"skipped": f"{left:.0f} s left of the budget, the part needs ~{part.estimate_s:.0f} s"}
        else:
            result = run_part(part, left, device)
        print(f"[inference] {part.key} {part.shape}: " + json.dumps(result)[:300], flush=True)
        on_part(part.key, part.shape, result)


def table_lines(report: dict) -> list[str]:
    """The inference rows of gpu_train's table ([] when no inference part ran)."""
    lines = []
    for shape, r in report.get("stacked_inference", {}).items():
        if "mixed_s" not in r:
            lines.append(f"{shape:8} stacked inference: {r.get('skipped') or r.get('error', '')[:90]}")
            continue
        lines.append(
            f"{shape:8} stacked inference {r['requests']} req x {r['max_new_tokens']} tok: mixed "
            f"{r['mixed_requests_per_s']} req/s, mixed vs single {r['mixed_over_single']}, speed-up vs PEFT "
            f"mixed {r['mixed_over_peft_mixed']}x grouped {r['mixed_over_peft_grouped']}x swap "
            f"{r['mixed_over_peft_swap']}x, same outputs {r['same_outputs']['peft_mixed']}"
        )
    for shape, r in report.get("serve_load", {}).items():
        if "levels" not in r:
            lines.append(f"{shape:8} serving: {r.get('skipped') or r.get('error', '')[:90]}")
            continue
        top = r["levels"][-1]
        lines.append(
            f"{shape:8} serving {r['max_tokens']} tok: {top['requests_per_s']} req/s at {top['clients']} "
            f"clients (p50 {top['p50_s']} s, p95 {top['p95_s']} s, mean batch {top['mean_batch']}) vs serial "
            f"{r['serial']['requests_per_s']} req/s: {r['batched_over_serial']}x"
        )
    return lines
