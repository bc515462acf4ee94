"""GPU training benchmark (issue 11): the package's loop against plain PEFT on 2B- and 8B-shaped Qwen3-VL.

One call measures, per shape, in bf16 on one CUDA GPU (fp32 on the CPU for `--shapes tiny`):
  ours        the package's train_loop on one LoRA: answer-only loss, fused AdamW, batch loader
  peft        plain PEFT on the same rows: get_peft_model, Hugging Face's loss, default AdamW
  concurrent  `--experts` experts trained together (train/concurrent.py), per-expert batch
  seq. PEFT   the same experts one after another with plain PEFT (set_adapter)
samples/s (median of `--repeats` after a warm-up), MFU and peak GPU memory; the table is printed last
and everything goes to OUT_DIR/gpu_train.json. Self-contained: the models are random-weight
Qwen3-VL shapes built here (bench/peft_reference.py), nothing is downloaded or read outside the
repository. Rows: one image (448 px at 2B, 896 px at 8B), a prompt, an answer; only the answer is
supervised, as in SFT data.

MFU = 4 x N x tokens / seconds / peak, N = language-model parameters outside the embedding (frozen
base: 2 N forward + 2 N backward through the activations; vision tower, output head and attention's
quadratic term not counted), peak = --peak-tflops (default 790, the convention of the figures in
issue 11; an H100/H200 SXM's dense bf16 datasheet peak is 989).

After the training shapes, on CUDA (`--inference`, on by default there; `--no-inference` skips it),
the inference figures of issue 9 at real shapes (bench/gpu_inference.py): stacked inference at 8b
and 2b, serving at 8b, each a subprocess, under "stacked_inference" / "serve_load" in the JSON and
as the table's last rows. A part starts only if its estimate fits in what is left of `--budget-s`
(default 570 s: the training shapes ~8 min, the whole script within ~9.5 min).

    PYTHONPATH=src python bench/gpu_train.py [--shapes 2b,8b] [--out-dir $OUT]
    PYTHONPATH=src python bench/gpu_train.py --shapes tiny --steps 2 --repeats 1   # CPU smoke run
    PYTHONPATH=src python bench/gpu_train.py --shapes ''   # the inference parts alone (CUDA)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BATCH = {"tiny": 4, "tiny151k": 4, "2b": 8, "8b": 4}  # rows per step of the single-adapter paths
EXPERT_BATCH = {
    "tiny": 2,
    "tiny151k": 2,
    "2b": 4,
    "8b": 1,
}  # rows per expert per step of the multi-expert paths
LORA = {"rank": 16, "alpha": 32.0, "dropout": 0.0}  # on the 7 language-model projections


def silent(*_) -> None:
    """A report callback that prints nothing."""


def peak_gib(device: str) -> float | None:
    """Peak GPU memory allocated since the last reset, in GiB (None on the CPU)."""
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def reset_peak(device: str) -> None:
    """Start a new peak-memory measurement."""
    import gc as _gc

    import torch

    _gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def ours_seconds(model, lora, train_rows, batch: int, steps: int, compile_layers: bool) -> float:
    """Seconds of `steps` steps of the package's train_loop on a fresh LoRA (the model is left bare)."""
    from mole_trainer.config import TrainSpec
    from mole_trainer.model.kernels import compile_language_model
    from mole_trainer.model.lora import attach_lora, detach_lora
    from mole_trainer.train.loop import train_loop

    pm = attach_lora(model, lora, seed=0)
    try:
        if compile_layers:
            compile_language_model(pm)
        spec = TrainSpec(lr=1e-4, steps=steps, batch_size=batch, warmup_ratio=0.0, eval_every=steps)
        result = train_loop(
            pm, train_rows, spec, 0, lambda: {"val_loss": 0.0}, lambda new, best: False, report=silent
        )
        return result.seconds  # the steps only; ends with the logged loss read back (a device sync)
    finally:
        detach_lora(pm)


def timed(run, warmup, repeats: int) -> list[float]:
    """`warmup()` once, then `run()` `repeats` times; each run returns (seconds, samples): samples/s."""
    warmup()
    out = []
    for _ in range(repeats):
        seconds, samples = run()
        out.append(samples / seconds)
    return out


def summary(rates: list[float], tokens_per_sample: int, n_params: int, peak_tflops: float, mem) -> dict:
    """Median samples/s of the runs, tokens/s, MFU and peak memory."""
    med = statistics.median(rates)
    return {
        "samples_per_s": round(med, 3),
        "tokens_per_s": round(med * tokens_per_sample, 1),
        "mfu": float(f"{4 * n_params * tokens_per_sample * med / (peak_tflops * 1e12):.4g}"),
        "peak_mem_gib": mem,
        "runs": [round(r, 3) for r in rates],
    }


def loss_check(model, train_rows, batch: int) -> dict:
    """The answer-only loss against HF's full-logits loss on one batch of the bare base (no training)."""
    import torch

    from mole_trainer.data.preprocess import collate
    from mole_trainer.train.loss import answer_loss_sum, supervised_count

    device = next(model.parameters()).device
    inputs = collate(train_rows[:batch], 0)
    labels = inputs.pop("labels")
    on_device = {k: v.to(device) for k, v in inputs.items()}
    with torch.no_grad():
        ours = float(answer_loss_sum(model, on_device, labels)) / supervised_count(labels)
        hf = float(model(**on_device, labels=labels.to(device)).loss)
    return {"answer_loss": round(ours, 6), "hf_loss": round(hf, 6), "abs_diff": abs(ours - hf)}


def run_shape(shape: str, a, device: str, dtype) -> dict:
    """Build one shape, measure the four paths, free the GPU; the shape's result."""
    from mole_trainer.config import LoraSpec, TrainSpec
    from mole_trainer.model.kernels import apply_liger
    from mole_trainer.model.lora import peft_config
    from peft_reference import SHAPES, build, lm_params, plain_peft_seconds, rows
    from train_concurrent import run_concurrent, run_sequential_peft

    def say(msg: str) -> None:
        print(f"[{shape}] {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    model, cfg = build(shape, device, dtype, a.attn)
    build_s = time.perf_counter() - t0
    batch, expert_batch, px = BATCH[shape], EXPERT_BATCH[shape], SHAPES[shape]["image_px"]
    train_rows = rows(cfg, max(3 * batch, 8), px, a.prompt, a.answer, dtype, seed=1)
    seq_len = len(train_rows[0]["input_ids"])
    n_params = lm_params(model)
    lora = LoraSpec(**LORA)
    res = {
        "shape": shape,
        "seq_len": seq_len,
        "image_px": px,
        "supervised_per_row": a.answer,
        "lm_params": n_params,
        "batch": batch,
        "build_s": round(build_s, 1),
        "loss_check": loss_check(model, train_rows, batch),
    }
    say(f"built in {build_s:.0f} s, {seq_len} tokens per row, loss check {res['loss_check']}")

    def single(name, seconds_of):
        reset_peak(device)
        rates = timed(
            lambda: (seconds_of(a.steps), a.steps * batch),
            lambda: seconds_of(a.warmup),
            a.repeats,
        )
        res[name] = summary(rates, seq_len, n_params, a.peak_tflops, peak_gib(device))
        say(f"{name}: {res[name]['samples_per_s']} samples/s, MFU {res[name]['mfu']}")

    single("peft", lambda steps: plain_peft_seconds(model, peft_config(lora), train_rows, batch, steps))
    if a.experts:
        sets = [
            rows(cfg, max(3 * expert_batch, 4), px, a.prompt, a.answer, dtype, 100 + e)
            for e in range(a.experts)
        ]
        vals = [rows(cfg, expert_batch, px, a.prompt, a.answer, dtype, 200 + e) for e in range(a.experts)]

        def spec(steps):
            return TrainSpec(
                lr=1e-4, steps=steps, batch_size=expert_batch, warmup_ratio=0.0, eval_every=steps
            )

        def multi(name, go):
            reset_peak(device)
            rates = timed(lambda: go(spec(a.steps)), lambda: go(spec(a.warmup)), a.repeats)
            res[name] = summary(rates, seq_len, n_params, a.peak_tflops, peak_gib(device))
            say(f"{name}: {res[name]['samples_per_s']} samples/s, MFU {res[name]['mfu']}")

        multi("sequential_peft", lambda s: run_sequential_peft(model, lora, s, sets, 0))
        if a.liger:
            apply_liger(model)
        multi("concurrent", lambda s: run_concurrent(model, lora, s, sets, vals, 0))
        res["expert_batch"] = expert_batch
        res["concurrent_over_sequential_peft"] = round(
            res["concurrent"]["samples_per_s"] / res["sequential_peft"]["samples_per_s"], 3
        )
    elif a.liger:
        apply_liger(model)
    single("ours", lambda steps: ours_seconds(model, lora, train_rows, batch, steps, a.compile))
    res["ours_over_peft"] = round(res["ours"]["samples_per_s"] / res["peft"]["samples_per_s"], 3)
    return res


def table(report: dict) -> str:
    """The summary table (printed last)."""
    lines = [
        f"{report['device']} {report['dtype']}, LoRA r={LORA['rank']} on 7 projections, "
        f"MFU vs {report['peak_tflops']} TFLOPS, attention {report['attn']}"
        + (", liger" if report["liger"] else "")
        + (", compiled layers (ours)" if report["compile"] else ""),
        f"{'shape':8} {'path':24} {'batch':>6} {'seq':>5} {'samples/s':>10} {'MFU':>6} {'peak GiB':>9} {'vs PEFT':>8}",
    ]
    for r in report["shapes"]:
        if "error" in r:
            lines.append(f"{r['shape']:8} error: {r['error'][:90]}")
            continue
        paths = [("ours", "ours (answer-only loss)", r["batch"], r.get("ours_over_peft"))]
        paths.append(("peft", "plain PEFT (HF loss)", r["batch"], None))
        if "concurrent" in r:
            n = report["experts"]
            paths.append(("concurrent", f"concurrent {n} experts", f"{n}x{r['expert_batch']}",
                          r["concurrent_over_sequential_peft"]))  # fmt: skip
            paths.append(("sequential_peft", f"sequential PEFT x{n}", r["expert_batch"], None))
        for key, label, batch, ratio in paths:
            m = r[key]
            mem = "-" if m["peak_mem_gib"] is None else m["peak_mem_gib"]
            lines.append(
                f"{r['shape']:8} {label:24} {batch!s:>6} {r['seq_len']:>5} {m['samples_per_s']:>10}"
                f" {m['mfu']:>6.1%} {mem!s:>9} {'' if ratio is None else f'{ratio}x':>8}"
            )
    from gpu_inference import table_lines

    return "\n".join(lines + table_lines(report))


def main() -> None:
    """Measure every shape, write OUT_DIR/gpu_train.json after each, print the table last."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="2b,8b", help="comma-separated: 2b, 8b; tiny, tiny151k on a CPU")
    ap.add_argument("--steps", type=int, default=10, help="timed optimiser steps per run (per expert)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before each path")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per path (median)")
    ap.add_argument(
        "--experts", type=int, default=4, help="experts of the concurrent comparison (0: skip it)"
    )
    ap.add_argument("--prompt", type=int, default=96, help="prompt text tokens per row (after the image)")
    ap.add_argument("--answer", type=int, default=32, help="supervised answer tokens per row")
    ap.add_argument("--peak-tflops", type=float, default=790.0)
    ap.add_argument("--attn", default="sdpa", help="attention implementation of every path")
    ap.add_argument("--liger", action="store_true", help="liger-kernel on the package's paths (CUDA)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decoder layers (ours)")
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    ap.add_argument(
        "--inference",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after training: stacked inference (8b, 2b) and serving (8b) on CUDA (default: on with CUDA)",
    )
    ap.add_argument(
        "--budget-s", type=float, default=570.0, help="an inference part starts only if it fits in this"
    )
    a = ap.parse_args()
    import peft
    import torch
    import transformers

    from mole_trainer.config import KernelSpec
    from mole_trainer.errors import UserError
    from mole_trainer.model.kernels import check_kernels

    unknown = [s for s in a.shapes.split(",") if s and s not in BATCH]
    if unknown:
        raise SystemExit(f"--shapes: unknown {unknown}; choose from {list(BATCH)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        check_kernels(KernelSpec(attn_implementation=a.attn, liger=a.liger), device)
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None
    inference = device == "cuda" if a.inference is None else a.inference
    if inference and device != "cuda":
        raise SystemExit("--inference: the 2b/8b inference parts need a CUDA GPU")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "peak_tflops": a.peak_tflops,
        "attn": a.attn,
        "liger": a.liger,
        "compile": a.compile,
        "experts": a.experts,
        "steps": a.steps,
        "repeats": a.repeats,
        "shapes": [],
    }
    started = time.perf_counter()
    for shape in [s for s in a.shapes.split(",") if s]:
        try:
            report["shapes"].append(run_shape(shape, a, device, dtype))
        except Exception as exc:  # keep the other shapes' figures; the error is reported, not hidden
            report["shapes"].append({"shape": shape, "error": repr(exc)[:500]})
            print(f"[{shape}] failed: {exc!r}", file=sys.stderr)
        reset_peak(device)  # the shape's model is gone: free its memory before the next one
        report["seconds"] = round(time.perf_counter() - started, 1)
        (out / "gpu_train.json").write_text(json.dumps(report, indent=1) + "\n")
    if inference:
        from gpu_inference import run_inference

        def on_part(key: str, shape: str, result: dict) -> None:
            report.setdefault(key, {})[shape] = result
            report["seconds"] = round(time.perf_counter() - started, 1)
            (out / "gpu_train.json").write_text(json.dumps(report, indent=1) + "\n")

        run_inference(started + a.budget_s, on_part)
    print(table(report))


if __name__ == "__main__":
    main()
