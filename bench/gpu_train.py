"""GPU benchmark (one rented H100/H200): concurrent expert training against sequential plain PEFT
on 2B- and 8B-shaped random-weight Qwen3-VL models in bf16, plus shared/bench/peft_baseline.py
(`--shape 2b`) in the same call so the numbers compare on one machine.

Installs nothing: torch, transformers and peft must be there; run from the repository root with
    PYTHONPATH=src python bench/gpu_train.py [--shapes 2b,8b] [--out-dir $OUT]
The model shapes and the synthetic batches (one image + text per row, the image tokens masked
from the loss) are peft_baseline.py's own (found at ../shared/bench or shared/bench). Each expert
gets its own random rows; both paths train every expert `--steps` steps at the same per-expert batch
(`--batch-2b`, `--batch-8b`). The concurrent path is the package's (MultiLora + train_concurrent),
the sequential path get_peft_model + add_adapter + set_adapter in a standard loop (bench/train_concurrent.py).
Then, on CUDA, bench/route_cost.py (router scoring: one prefill vs K rows, `--route-cost-ks`) in a
subprocess, its JSON under "route_cost".
Writes OUT_DIR/gpu_train.json and OUT_DIR/peft_baseline_2b.json; prints a short table last.
On a machine without CUDA it runs the same code in fp32 on the CPU (check with --shapes tiny).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "src"))


def find_baseline() -> Path:
    """shared/bench/peft_baseline.py beside the repository (../shared) or inside it (shared/)."""
    for root in (REPO.parent / "shared", REPO / "shared"):
        path = root / "bench" / "peft_baseline.py"
        if path.is_file():
            return path
    raise SystemExit(f"peft_baseline.py not found under {REPO.parent / 'shared'} or {REPO / 'shared'}")


def load_baseline(path: Path):
    """Import peft_baseline.py as a module (for its SHAPES, build() and batch())."""
    spec = importlib.util.spec_from_file_location("peft_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expert_rows(pb, cfg, n: int, img: int, text: int, dtype, seed: int) -> list[dict]:
    """n single-row examples in the package's example format, from peft_baseline.batch() (CPU tensors)."""
    import torch

    torch.manual_seed(seed)
    inputs, labels = pb.batch(cfg, n, img, text, "cpu", dtype)
    per = (img // 16) ** 2  # patches per image
    rows = []
    for i in range(n):
        ex = {k: inputs[k][i] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inputs}
        ex["labels"] = labels[i]
        ex["pixel_values"] = inputs["pixel_values"][i * per : (i + 1) * per]
        ex["image_grid_thw"] = inputs["image_grid_thw"][i : i + 1]
        rows.append(ex)
    return rows


def run_shape(pb, shape: str, a, device: str, dtype) -> dict:
    """Build one shape, measure both paths, free the GPU; the result row."""
    import torch

    from mole_trainer.config import LoraSpec, TrainSpec
    from train_concurrent import measure

    batch = {"2b": a.batch_2b, "8b": a.batch_8b}.get(shape, a.batch_2b)
    img = {"2b": 448, "8b": 896}.get(shape, 224)
    t0 = time.time()
    model, cfg = pb.build(shape, device, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    build_s = time.time() - t0
    n_rows = batch * (a.steps + 1)  # one full epoch of distinct rows per expert, warm-up included
    train_sets = [expert_rows(pb, cfg, n_rows, img, a.text, dtype, 100 + e) for e in range(a.experts)]
    val_sets = [expert_rows(pb, cfg, batch, img, a.text, dtype, 200 + e) for e in range(a.experts)]
    lora = LoraSpec(rank=16, alpha=32, dropout=0.0)
    spec = TrainSpec(lr=1e-4, steps=a.steps, batch_size=batch, warmup_ratio=0.0, eval_every=a.steps)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    res = measure(model, lora, spec, train_sets, val_sets, 0, a.repeats, lambda m: print(f"[{shape}] {m}"))
    res.update(
        shape=shape,
        per_expert_batch=batch,
        experts=a.experts,
        steps=a.steps,
        seq_len=int(train_sets[0][0]["input_ids"].shape[0]),
        image_px=img,
        build_s=round(build_s, 1),
        peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None,
    )
    del model, train_sets, val_sets
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


def route_cost(ks: str, repeats: int) -> dict | None:
    """bench/route_cost.py in a subprocess (the K-row method at every K: a GPU has the memory)."""
    cmd = [sys.executable, str(HERE / "route_cost.py"), "--ks", ks, "--repeats", str(repeats)]
    cmd += ["--old-max-k", str(max(int(k) for k in ks.split(",")))]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 300 s"}
    if done.returncode:
        print(done.stderr[-2000:], file=sys.stderr)
        return {"error": done.stderr[-500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Measure every shape, run the PEFT reference, write the JSON files and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--shapes", default="2b,8b", help="comma-separated peft_baseline shapes (tiny for a CPU check)"
    )
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="timed optimiser steps per expert")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-2b", type=int, default=4, help="per-expert batch at 2B (and tiny)")
    ap.add_argument("--batch-8b", type=int, default=1, help="per-expert batch at 8B")
    ap.add_argument("--text", type=int, default=128, help="text tokens per row")
    ap.add_argument("--baseline-shape", default="2b", help="shape for peft_baseline.py ('' to skip)")
    ap.add_argument("--route-cost-ks", default="4,16", help="experts for bench/route_cost.py ('' to skip)")
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    baseline = find_baseline()
    pb = load_baseline(baseline)
    import peft
    import transformers

    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "shapes": [],
    }
    for shape in [s for s in a.shapes.split(",") if s]:
        try:
            report["shapes"].append(run_shape(pb, shape, a, device, dtype))
        except Exception as exc:  # keep the other shapes' numbers; the error is reported, not hidden
            report["shapes"].append({"shape": shape, "error": repr(exc)[:500]})
            print(f"[{shape}] failed: {exc!r}", file=sys.stderr)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        (out / "gpu_train.json").write_text(json.dumps(report, indent=1) + "\n")
    if a.baseline_shape:
        target = out / f"peft_baseline_{a.baseline_shape}.json"
        target.unlink(missing_ok=True)
        cmd = [sys.executable, str(baseline), "--shape", a.baseline_shape, "--out", str(target)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode:
            print(done.stderr[-2000:], file=sys.stderr)
        report["peft_baseline"] = (
            json.loads(target.read_text().splitlines()[-1]) if target.is_file() else None
        )
        (out / "gpu_train.json").write_text(json.dumps(report, indent=1) + "\n")
    if a.route_cost_ks and device == "cuda":  # on the CPU: bench/route_cost.py itself (minutes, 2 cores)
        report["route_cost"] = route_cost(a.route_cost_ks, a.repeats)
        (out / "gpu_train.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{report['device']} {report['dtype']}, {a.experts} experts, LoRA r=16 on 7 projections")
    print(
        f"{'shape':6} {'batch/expert':>12} {'seq':>5} {'concurrent s/s':>15} {'seq. PEFT s/s':>14}"
        f" {'speedup':>8} {'1 expert/pass':>14}"
    )
    for r in report["shapes"]:
        if "error" in r:
            print(f"{r['shape']:6} error: {r['error'][:80]}")
            continue
        print(
            f"{r['shape']:6} {r['per_expert_batch']:>12} {r['seq_len']:>5} {r['concurrent_samples_per_s']:>15}"
            f" {r['sequential_peft_samples_per_s']:>14} {r['speedup']:>8} {r['speedup_one_expert_per_pass']:>14}"
        )
    b = report.get("peft_baseline")
    if b:
        print(
            f"peft_baseline.py --shape {b['shape']}: {b['train_samples_per_s']} samples/s at batch {b['batch']}"
        )
    for k, r in ((report.get("route_cost") or {}).get("by_k") or {}).items():
        old_figures = f"K-row {r.get('old_route_over_prefill')} / {r.get('old_mem_over_prefill')}"
        print(
            f"route_cost K={k}: one-prefill {r['route_over_prefill']} x time / {r['mem_over_prefill']} x memory"
            f" of a plain prompt forward; {old_figures}"
        )


if __name__ == "__main__":
    main()
