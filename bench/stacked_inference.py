"""Benchmark: one mixed-expert batch through the engine against the ways a batch for several LoRA
experts is otherwise served, in the same process, on the same requests and the same adapters.

Paths (every one generates greedily, the same max_new_tokens, for the same N requests):
- `mixed`: the engine (infer/engine.py), requests forced round-robin onto 4 experts, ONE generate
  call with each row on its own expert (stacked LoRA layer, per-row gather).
- `single`: the engine, the same batch all on one expert (the cost of a batch with no mixing).
- `routed`: the engine with routing: one routing pass, then the mixed generate (the full request).
- `peft_mixed`: PEFT with the 4 experts loaded, one generate with `adapter_names=[...]` per row.
- `peft_grouped`: PEFT, the batch split by expert, `set_adapter` + generate per group (the old
  `mole infer`).
- `peft_swap`: PEFT, one request at a time: `set_adapter` to its expert, generate it alone.

Model (--shape): `tiny` (default, CPU): the tiny Qwen3-VL (model/tiny.py sizes) built around the
real Qwen3-VL-8B processor of tests/fixtures (its tokenizer, chat template, 151,936-token
vocabulary and image processor), so the LM head, prompt lengths and image tokens are real; `2b` /
`8b` (a GPU): random weights at Qwen3-VL-2B / -8B shapes (the 8B config.json of the fixture),
bf16 on CUDA, with the same real processor. Adapters: rank --rank on every projection of the
language model, random non-zero weights. The PEFT paths run on a copy of the same base. Requests: one GUI-like screenshot each (--image
WxH), instructions of different lengths. Timings are medians: every path runs --repeats times,
interleaved; mixed and single (the bar) --pair-repeats times, alternating which goes first. On a
shared CPU the wall-clock figures swing with other load: `mixed_over_single_cpu` is the same
ratio in process CPU seconds, and --threads defaults to 1.

Figures (last line, one JSON object): seconds per path and requests/s; `mixed_over_single` =
single_s / mixed_s (target >= 0.9: mixing experts costs at most 10 % of a single-adapter batch);
`mixed_over_peft_mixed`, `mixed_over_peft_grouped`, `mixed_over_peft_swap` = that path's seconds
/ mixed_s (speed-ups); `same_outputs`: requests whose greedy output is identical on the mixed path
and on each PEFT path (it must be N/N).

Usage: python bench/stacked_inference.py [--requests 16] [--max-new-tokens 8] [--repeats 3] [--pair-repeats 9]
       [--rank 16] [--image 448x280] [--device auto] [--dtype auto] [--shape tiny|2b|8b] [--layers N] [--threads 1]
GPU (the next session with a device), e.g.:
       python bench/stacked_inference.py --shape 8b --device cuda --requests 32 --max-new-tokens 32
           --image 1280x800
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.helpers (the deployment builder the tests use)
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))  # screens (when imported from elsewhere)

from screens import INSTRUCTIONS, screenshot  # noqa: E402

PROCESSOR = REPO / "tests/fixtures/qwen3-vl-8b-processor"
EXPERTS = ["calendar", "chart-screen", "login-window", "ocr"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PATHS = ("mixed", "single", "routed", "peft_mixed", "peft_grouped", "peft_swap")
# Qwen3-VL-2B's sizes (the 8B shape is the fixture's real config.json)
SHAPE_2B = {
    "text": {
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": True,
    },
    "vision": {
        "depth": 24,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_heads": 16,
        "out_hidden_size": 2048,
        "deepstack_visual_indexes": [5, 11, 17],
    },
}


def shaped_model(shape: str, device: str, dtype: str, layers: int | None):
    """A random-weight Qwen3-VL at a real shape, on `device`: "8b" is the fixture's real Qwen3-VL-8B
    config.json; "2b" the same with Qwen3-VL-2B's sizes. `layers` cuts the text and vision depth
    (a smoke run of the code path on a small machine)."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from mole_trainer.model.loading import resolve_device, resolve_dtype

    config = Qwen3VLConfig.from_pretrained(PROCESSOR)
    if shape == "2b":
        config.text_config.update(SHAPE_2B["text"])
        config.vision_config.update(SHAPE_2B["vision"])
        config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    if layers is not None:
        config.text_config.num_hidden_layers = layers
        config.vision_config.depth = layers
        config.vision_config.deepstack_visual_indexes = list(range(layers))
    config._attn_implementation = "sdpa"
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    torch.manual_seed(0)
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):
            model = Qwen3VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(torch.float32)
    return model.eval()


def random_deployment(folder, root: Path, model, rank: int, size: tuple[int, int], max_new_tokens: int):
    """A deployment in root/deploy of EXPERTS + a router with random LoRA weights of rank `rank` on
    every language-model projection of `model` (the base of `folder`), pixel budgets up to `size`."""
    from tests.helpers import build_tiny_deployment

    budget = {"min_pixels": 64 * 64, "max_pixels": size[0] * size[1]}
    lora = {"rank": rank, "alpha": 2 * rank, "targets": TARGETS}
    experts = {name: (lora, budget, max_new_tokens) for name in EXPERTS}
    return build_tiny_deployment(folder, root, experts=experts, router=(lora, budget), base=model)


def build(root: Path, args, size: tuple[int, int]):
    """The base model (loaded), its folder (processor) and a deployment of 4 random experts + a router."""
    from mole_trainer.model.loading import load_base
    from mole_trainer.model.tiny import TinySpec, build_tiny_model

    if args.shape == "tiny":
        folder = build_tiny_model(root / "model", TinySpec(), processor_dir=PROCESSOR)
        model = load_base(str(folder), args.dtype, args.device)
    else:
        folder, model = PROCESSOR, shaped_model(args.shape, args.device, args.dtype, args.layers)
    return model, random_deployment(folder, root, model, args.rank, size, args.max_new_tokens)


def peft_model(base, adapters: dict):
    """The base (a copy) with the router and the experts as named PEFT adapters."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, adapters["router"], adapter_name="router")
    for name in EXPERTS:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


def peft_generate(model, processor, samples, max_new: int, **kwargs) -> list[str]:
    """Greedy answers of one left-padded batch with PEFT (kwargs: adapter_names=...)."""
    import torch

    from mole_trainer.data.preprocess import collate, encode_prompt, load_images

    rows = []
    for s in samples:
        enc = encode_prompt(processor, s.messages(with_answer=False), load_images(s))
        rows.append({k: (v if k in ("pixel_values", "image_grid_thw") else v[0]) for k, v in enc.items()})
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate(rows, processor.tokenizer.pad_token_id, "left").items()}
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new, do_sample=False, **kwargs)
    new = out[:, batch["input_ids"].shape[1] :]
    return [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def run_paths(engine, model, samples, max_new: int, paths=PATHS) -> tuple[dict, dict, dict]:
    """Wall seconds, process CPU seconds and outputs of each of `paths`, once, in that order."""
    import torch

    from mole_trainer.infer.engine import Request

    experts = [EXPERTS[i % len(EXPERTS)] for i in range(len(samples))]
    processor = engine._processors[engine.router_budget]
    n = len(samples)

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    tokens = {}

    def answers(path, requests):
        results = engine.run(requests, n)
        tokens[path] = statistics.mean(r.completion_tokens for r in results)
        return [r.output for r in results]

    def mixed():
        return answers("mixed", [Request(s, e, max_new) for s, e in zip(samples, experts, strict=True)])

    def single():
        return answers("single", [Request(s, EXPERTS[0], max_new) for s in samples])

    def routed():
        return answers("routed", [Request(s, None, max_new) for s in samples])

    def peft_mixed():
        return peft_generate(model, processor, samples, max_new, adapter_names=experts)

    def peft_grouped():
        out = [""] * n
        for name in EXPERTS:
            idx = [i for i, e in enumerate(experts) if e == name]
            if not idx:  # fewer requests than experts
                continue
            model.set_adapter(name)
            for i, text in zip(
                idx, peft_generate(model, processor, [samples[i] for i in idx], max_new), strict=True
            ):
                out[i] = text
        return out

    def peft_swap():
        out = []
        for s, e in zip(samples, experts, strict=True):
            model.set_adapter(e)
            out.extend(peft_generate(model, processor, [s], max_new))
        return out

    fns = dict(zip(PATHS, (mixed, single, routed, peft_mixed, peft_grouped, peft_swap), strict=True))
    seconds, cpu, outputs = {}, {}, {}
    for name in paths:
        sync()
        t, c = time.perf_counter(), time.process_time()
        outputs[name] = fns[name]()
        sync()
        seconds[name], cpu[name] = time.perf_counter() - t, time.process_time() - c
    outputs["tokens"] = tokens
    return seconds, cpu, outputs


def main() -> None:
    """Build, run every path --repeats times, print per-repeat times and the JSON summary."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="runs of every path")
    ap.add_argument("--pair-repeats", type=int, default=9, help="runs of mixed and single (the bar)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--image", default="448x280", help="screenshot size WxH")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: bf16 on CUDA, else fp32")
    ap.add_argument("--shape", choices=("tiny", "2b", "8b"), default="tiny", help="2b/8b: random weights")
    ap.add_argument("--layers", type=int, default=None, help="cut a 2b/8b shape to N layers (smoke runs)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared CPU, 2 threads spin-wait on each other and one "
        "16-request run swung 1.5-6.3 s against a steady 0.75-1.0 s on 1 thread)",
    )
    args = ap.parse_args()
    size = tuple(int(x) for x in args.image.lower().split("x"))

    import torch

    torch.set_num_threads(args.threads)
    from mole_trainer.data.records import Sample
    from mole_trainer.infer.engine import Engine

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        base, dep = build(Path(tmp), args, size)
        model = peft_model(copy.deepcopy(base), dep["adapters"])
        engine = Engine(dep["deployment"], model=base)
        samples = [
            Sample(
                id=f"r{i}",
                images=[screenshot(size, i)],
                instruction=INSTRUCTIONS[i % len(INSTRUCTIONS)],
                answer="",
            )
            for i in range(args.requests)
        ]
        print(f"built in {time.perf_counter() - t:.1f} s", flush=True)
        from mole_trainer.infer.engine import Request

        probe = engine.run([Request(samples[0], EXPERTS[0], 1)])[0]
        prompt_tokens = probe.prompt_tokens
        run_paths(engine, model, samples[:4], 2)  # warm-up (lazy init, allocator)
        times: dict[str, list[float]] = {p: [] for p in PATHS}
        cpu: dict[str, list[float]] = {p: [] for p in PATHS}
        for rep in range(max(args.repeats, args.pair_repeats)):
            # every path --repeats times; mixed and single (the bar) --pair-repeats times, order alternating
            paths = PATHS if rep < args.repeats else ("mixed", "single")[:: 1 if rep % 2 else -1]
            seconds, used, run_outputs = run_paths(engine, model, samples, args.max_new_tokens, paths)
            if rep == 0:
                outputs = run_outputs
            for p in paths:
                times[p].append(seconds[p])
                cpu[p].append(used[p])
            print(f"repeat {rep}: " + "  ".join(f"{p} {seconds[p]:.2f}s" for p in paths), flush=True)
    med = {p: statistics.median(v) for p, v in times.items()}
    med_cpu = {p: statistics.median(v) for p, v in cpu.items()}
    same = {
        p: f"{sum(a == b for a, b in zip(outputs['mixed'], outputs[p], strict=True))}/{args.requests}"
        for p in ("peft_mixed", "peft_grouped", "peft_swap")
    }
    summary = {
        "device": str(engine.device),
        "threads": torch.get_num_threads(),
        "requests": args.requests,
        "max_new_tokens": args.max_new_tokens,
        "rank": args.rank,
        "image": args.image,
        "shape": args.shape if args.layers is None else f"{args.shape} cut to {args.layers} layers",
        "dtype": str(engine.model.dtype).removeprefix("torch."),
        "vocab": engine.model.config.text_config.vocab_size,
        "repeats": args.repeats,
        **{f"{p}_s": round(med[p], 4) for p in PATHS},
        **{f"{p}_requests_per_s": round(args.requests / med[p], 2) for p in PATHS},
        "mixed_over_single": round(med["single"] / med["mixed"], 3),
        "mixed_over_single_cpu": round(med_cpu["single"] / med_cpu["mixed"], 3),
        "pair_repeats": max(args.repeats, args.pair_repeats),
        "mixed_over_peft_mixed": round(med["peft_mixed"] / med["mixed"], 3),
        "mixed_over_peft_grouped": round(med["peft_grouped"] / med["mixed"], 3),
        "mixed_over_peft_swap": round(med["peft_swap"] / med["mixed"], 3),
        "routing_share": round((med["routed"] - med["mixed"]) / med["routed"], 3),
        "same_outputs": same,
        "mean_completion_tokens": {p: round(v, 2) for p, v in outputs["tokens"].items()},
        "prompt_tokens": prompt_tokens,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
