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
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def build_deployment(root: Path) -> tuple[str, list]:
    """Tiny model, synthetic data, experts + router trained for a few steps, deployed (demo layout)."""
    from mole_trainer import stages
    from mole_trainer.config import LorasConfig, RouterConfig, load_config
    from mole_trainer.configs import write_configs
    from mole_trainer.data.formats import load_jsonl_samples
    from mole_trainer.layout import WorkDir

    wd = WorkDir(root)
    short = {"train": {"steps": 2, "eval_every": 2}}
    write_configs(
        wd.config_dir,
        {
            "dataset.yaml": {"train_per_expert": 8, "val_per_expert": 2, "test_per_expert": 8},
            "loras.yaml": {**short, "eval_records": 1},
            "router.yaml": short,
        },
    )
    stages.model_tiny(wd.model_dir, root)
    stages.data_synth(wd.experts_data, root, None, {"train": 8, "val": 2, "test": 8})
    stages.data_routing(wd.config_dir / "dataset.yaml", wd.routing_file, root)
    image = load_config(wd.config_dir / "router.yaml", RouterConfig).image
    stages.data_preprocess(
        wd.routing_file,
        wd.prep_dir / "router",
        str(wd.model_dir),
        "router",
        None,
        image.min_pixels,
        image.max_pixels,
        root,
    )
    quiet = lambda *_: None  # noqa: E731
    stages.train_experts(wd.config_dir / "loras.yaml", root, report=quiet)
    stages.train_router(wd.prep_dir / "router", wd.config_dir / "router.yaml", root, report=quiet)
    experts_dir = load_config(wd.config_dir / "loras.yaml", LorasConfig).output_dir
    router_dir = load_config(wd.config_dir / "router.yaml", RouterConfig).output_dir
    stages.deploy(router_dir, experts_dir, str(wd.deploy_dir), root)
    requests = [s for s in load_jsonl_samples(wd.routing_file) if s.split == "test"]
    return str(wd.deploy_dir), requests


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
