"""Benchmark: the cost of routing a request against one plain forward pass of its prompt, for the
one-prefill scorer (mole_trainer.infer.scoring.score_encoded) and the K-row scoring it replaced
(tests/reference_scoring.py), in the same script on the same model and requests.

Model: the tiny Qwen3-VL of model/tiny.py with its LM head widened to Qwen3-VL's real vocabulary
(151,936 rows; the small tokenizer uses the first ids only): the head's size is what makes
full-vocabulary logits expensive. Requests: one 1280x800 screenshot each (1,000 visual tokens after
merging, under a pixel budget that keeps it whole), instructions of different lengths (padding).

- `route_over_prefill`: seconds per routed request / seconds per request of the plain forward pass
  of the same prompts (one batched call, `logits_to_keep=1`, no cache: what any request costs at
  least). Medians over --repeats, timed in this process.
- `mem_over_prefill`: working memory of a routing call / that of the plain forward. Working memory =
  peak resident memory (VmHWM, reset through /proc/self/clear_refs) during the call minus resident
  memory just before it, with the model loaded and the prompts encoded; each figure is measured once
  in a fresh subprocess, so allocator reuse from earlier calls cannot hide anything.
The K-row method runs one request per call (batched, it needs tens of GB) and only for K up to
--old-max-k; above that it is reported as skipped with the size of the fp32 logits it would build.

Usage: python bench/route_cost.py [--requests 8] [--repeats 3] [--ks 4,16] [--old-max-k 4] [--old-requests N]
The last line printed is one JSON object: the K = 16 figures at top level, every K under "by_k".
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.reference_scoring
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))  # screens (when imported from elsewhere)

from screens import INSTRUCTIONS, screenshot  # noqa: E402

QWEN3_VL_VOCAB = 151_936
SCREEN = (1280, 800)  # 80 x 50 patches of 16 px, 40 x 25 = 1,000 tokens after the 2 x 2 merge
EXPERTS = [
    "calendar",
    "chart-screen",
    "login-window",
    "ocr",
    "receipt-reader",
    "form-filler",
    "map-navigation",
    "spreadsheet",
    "email-client",
    "settings-panel",
    "shopping-cart",
    "video-player",
    "file-manager",
    "terminal",
    "photo-editor",
    "code-review",
]
METHODS = ("prefill", "new", "old")


def build_model(out: Path) -> Path:
    """The tiny Qwen3-VL with a 151,936-row (tied) embedding and LM head, saved in `out`."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from mole_trainer.model.tiny import TinySpec, build_config, build_processor, train_tokenizer

    spec = TinySpec(max_pixels=SCREEN[0] * SCREEN[1])
    processor = build_processor(spec, train_tokenizer(spec))
    config = build_config(spec, processor, QWEN3_VL_VOCAB)
    torch.manual_seed(spec.seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def requests(root: Path, n: int):
    """n routing requests, each with its own screenshot."""
    from mole_trainer.data.records import Sample

    out = []
    for i in range(n):
        path = root / f"screen-{i}.png"
        if not path.exists():
            screenshot(SCREEN, i).save(path)
        out.append(Sample(f"r{i}", [path], INSTRUCTIONS[i % len(INSTRUCTIONS)], "", expert=EXPERTS[0]))
    return out


def setup(model_dir: Path, images: Path, n: int, k: int):
    """Model, encoded prompts (K experts listed in each), label ids and pad id."""
    import torch

    from mole_trainer.infer.scoring import encode_router_prompts, label_token_ids
    from mole_trainer.model.loading import load_base, load_processor

    torch.manual_seed(0)
    processor = load_processor(str(model_dir), None, SCREEN[0] * SCREEN[1])
    model = load_base(str(model_dir), "auto", "auto")
    names = EXPERTS[:k]
    prompts = encode_router_prompts(processor, requests(images, n), names)
    return model, prompts, label_token_ids(processor.tokenizer, names), processor.tokenizer.pad_token_id


def run_method(method: str, model, prompts, labels, pad) -> None:
    """One call of a method on all prompts (the K-row method: one request per call)."""
    import torch
    from tests.reference_scoring import score_encoded_reference

    from mole_trainer.data.preprocess import collate
    from mole_trainer.infer.scoring import score_encoded

    with torch.inference_mode():
        if method == "prefill":
            device = next(model.parameters()).device
            batch = {k: v.to(device) for k, v in collate(prompts, pad, padding_side="left").items()}
            model(**batch, use_cache=False, logits_to_keep=1)
        elif method == "new":
            score_encoded(model, prompts, labels, pad)
        else:
            for p in prompts:
                score_encoded_reference(model, [p], labels, pad)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def measure_memory(args) -> None:
    """Child process: working memory (MB) of one call of args.method; prints one JSON line."""
    import torch

    model, prompts, labels, pad = setup(Path(args.model), Path(args.images), args.requests, args.k)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        before = _status_kb("VmRSS") * 1024
    run_method(args.method, model, prompts, labels, pad)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _status_kb("VmHWM") * 1024
    print(json.dumps({"working_mb": round((peak - before) / 2**20, 1)}))


def child_memory(model_dir: Path, images: Path, n: int, k: int, method: str) -> float:
    """Working memory of `method` measured in a fresh process."""
    cmd = [sys.executable, __file__, "--child", method, "--model", str(model_dir), "--images", str(images)]
    cmd += ["--requests", str(n), "--k", str(k)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["working_mb"]


def timed(method: str, model, prompts, labels, pad, repeats: int) -> float:
    """Median seconds per request of `method` over `repeats` calls (after one warm-up call)."""
    run_method(method, model, prompts[:1], labels, pad)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run_method(method, model, prompts, labels, pad)
        times.append(time.perf_counter() - t)
    return statistics.median(times) / len(prompts)


def old_logits_gb(prompts, labels, vocab: int) -> float:
    """Size of the K-row method's fp32 logits for one request (the log-softmax doubles it)."""
    longest = max(len(p["input_ids"]) for p in prompts) + max(len(lab) for lab in labels)
    return len(labels) * longest * vocab * 4 / 1e9


def measure_k(model_dir: Path, images: Path, args, k: int) -> dict:
    """Times (in this process) and working memory (subprocesses) of every method at K = k."""
    import torch

    model, prompts, labels, pad = setup(model_dir, images, args.requests, k)
    run_old = k <= args.old_max_k
    methods = [m for m in METHODS if m != "old" or run_old]
    subset = {"old": prompts[: args.old_requests or len(prompts)]}
    secs = {m: timed(m, model, subset.get(m, prompts), labels, pad, args.repeats) for m in methods}
    vocab = model.config.text_config.vocab_size
    row = {
        "k": k,
        "prompt_tokens": [
            min(len(p["input_ids"]) for p in prompts),
            max(len(p["input_ids"]) for p in prompts),
        ],
        "label_tokens": sum(len(lab) for lab in labels),
        "prefill_s_per_request": round(secs["prefill"], 4),
        "new_s_per_request": round(secs["new"], 4),
    }
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mem = {m: child_memory(model_dir, images, args.requests, k, m) for m in methods}
    row["prefill_working_mb"], row["new_working_mb"] = mem["prefill"], mem["new"]
    row["route_over_prefill"] = round(secs["new"] / secs["prefill"], 3)
    row["mem_over_prefill"] = round(mem["new"] / mem["prefill"], 3)
    if run_old:
        row["old_s_per_request"] = round(secs["old"], 4)
        row["old_working_mb"] = mem["old"]
        row["old_route_over_prefill"] = round(secs["old"] / secs["prefill"], 3)
        row["old_mem_over_prefill"] = round(mem["old"] / mem["prefill"], 3)
    else:
        row["old"] = f"skipped: {old_logits_gb(prompts, labels, vocab):.1f} GB of fp32 logits per request"
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    """Build the model and screenshots, measure every K, print the JSON summary last."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ks", default="4,16", help="numbers of experts, comma-separated")
    ap.add_argument("--old-max-k", type=int, default=4, help="largest K the K-row method runs at")
    ap.add_argument("--old-requests", type=int, help="time the K-row method on the first N requests only")
    ap.add_argument("--child", choices=METHODS, dest="method", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--images", help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:
        measure_memory(args)
        return

    import torch

    ks = [int(k) for k in args.ks.split(",")]
    if max(ks) > len(EXPERTS):
        raise SystemExit(f"--ks: at most {len(EXPERTS)} experts")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "model")
        images = Path(tmp) / "images"
        images.mkdir()
        rows = {k: measure_k(model_dir, images, args, k) for k in ks}
    top = rows[max(ks)]
    summary = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "memory": "peak CUDA allocation" if torch.cuda.is_available() else "peak RSS increase",
        "vocab": QWEN3_VL_VOCAB,
        "requests": args.requests,
        "repeats": args.repeats,
        "k": top["k"],
        "route_over_prefill": top["route_over_prefill"],
        "mem_over_prefill": top["mem_over_prefill"],
        "by_k": {str(k): {key: v for key, v in r.items() if key != "k"} for k, r in rows.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
