"""Benchmark: stacked inference (route a batch, then generate grouped by expert) against the naive
per-request loop (route one request, switch adapter, generate one request), same process, same
deployment, same requests, on the tiny offline Qwen3-VL.

Usage: python bench/stacked_inference.py [--requests N] [--repeats R] [--max-new-tokens T]
The last line printed is one JSON object (medians over the repeats, and the ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_deployment(root: Path) -> tuple[str, list]:
    """Tiny model, synthetic data, experts + router trained for a few steps, deployed."""
    from mole_trainer import stages
    from mole_trainer.data.formats import load_jsonl_samples
    from mole_trainer.data.synth import SYNTH_EXPERTS

    names = list(SYNTH_EXPERTS)
    stages.model_tiny(root / "model", root)
    stages.data_synth(root / "experts", root, None, {"train": 8, "val": 2, "test": 8}, 0, (448, 336))
    cfg = root / "config"
    cfg.mkdir()
    small = "train: {steps: 2, batch_size: 4, eval_every: 2}\nimage: {min_pixels: 4096, max_pixels: 76800}\n"
    (cfg / "dataset.yaml").write_text(
        "experts:\n"
        + "".join(f"  {n}: {{path: ../experts/{n}}}\n" for n in names)
        + "train_per_expert: 8\nval_per_expert: 2\ntest_per_expert: 8\n"
    )
    (cfg / "loras.yaml").write_text(
        f"base_model: ../model\noutput_dir: ../ckpt/experts\n{small}eval_records: 1\n"
        "experts:\n" + "".join(f"  {n}: {{data: ../experts/{n}}}\n" for n in names)
    )
    (cfg / "router.yaml").write_text(f"base_model: ../model\noutput_dir: ../ckpt/router\n{small}")
    routing = root / "routing" / "routing.jsonl"
    stages.data_routing(cfg / "dataset.yaml", routing, root)
    stages.data_preprocess(routing, root / "prep", str(root / "model"), "router", None, 4096, 76800, root)
    quiet = lambda *_: None  # noqa: E731
    stages.train_experts(cfg / "loras.yaml", root, report=quiet)
    stages.train_router(root / "prep", cfg / "router.yaml", root, report=quiet)
    stages.deploy(root / "ckpt/router", root / "ckpt/experts", str(root / "deploy"), root)
    requests = [s for s in load_jsonl_samples(routing) if s.split == "test"]
    return str(root / "deploy"), requests


def naive(model, requests, max_new_tokens):
    """One request at a time: route it, activate its expert, generate."""
    from mole_trainer.infer.generate import generate
    from mole_trainer.infer.stacked import expert_adapter

    out = []
    for s in requests:
        probs = model.route([s], batch_size=1)
        name = model.names[int(probs[0].argmax())]
        model.model.set_adapter(expert_adapter(name))
        out.append((name, generate(model.model, model.expert_processor[name], [s], max_new_tokens, 1)[0]))
    return out


def main() -> None:
    """Run both paths `repeats` times and print per-run times and the JSON summary."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    import torch

    from mole_trainer.infer.stacked import StackedModel

    with tempfile.TemporaryDirectory() as tmp:
        deployment, requests = build_deployment(Path(tmp))
        requests = (requests * (args.requests // len(requests) + 1))[: args.requests]
        model = StackedModel(deployment, device="auto")
        stacked_s, naive_s = [], []
        with torch.inference_mode():
            for _ in range(args.repeats):
                t = time.perf_counter()
                grouped = model(requests, args.batch_size, args.max_new_tokens)
                stacked_s.append(time.perf_counter() - t)
                t = time.perf_counter()
                one_by_one = naive(model, requests, args.max_new_tokens)
                naive_s.append(time.perf_counter() - t)
                print(f"stacked {stacked_s[-1]:.2f} s   naive {naive_s[-1]:.2f} s", flush=True)
        same_routes = sum(g["expert"] == n for g, (n, _) in zip(grouped, one_by_one, strict=True))
    stacked, slow = statistics.median(stacked_s), statistics.median(naive_s)
    print(
        json.dumps(
            {
                "device": "cuda" if torch.cuda.is_available() else "cpu",
                "threads": torch.get_num_threads(),
                "requests": args.requests,
                "max_new_tokens": args.max_new_tokens,
                "repeats": args.repeats,
                "stacked_requests_per_s": round(args.requests / stacked, 2),
                "naive_requests_per_s": round(args.requests / slow, 2),
                "speedup": round(slow / stacked, 2),
                "same_routes": f"{same_routes}/{args.requests}",
            }
        )
    )


if __name__ == "__main__":
    main()
