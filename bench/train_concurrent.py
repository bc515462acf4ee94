"""Benchmark: experts trained together (`mole train experts --concurrent`) against plain PEFT
training them one after another (get_peft_model + add_adapter + set_adapter, a standard loop),
same process, same data, same steps, same per-expert batch.

Both paths train every expert for `--steps` optimiser steps on its own seeded batch stream; only the
optimisation steps are timed (the concurrent run's evaluations are excluded). Samples/s counts every
expert's samples: experts x steps x batch / seconds. Default: the tiny offline Qwen3-VL
(`mole model tiny`) and the synthetic GUI datasets, fp32 on the CPU.

Usage: python bench/train_concurrent.py [--experts 4] [--steps 6] [--batch 4] [--repeats 3]
The last line printed is one JSON object (medians over the repeats, and the speedup).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def sync(device) -> None:
    """Wait for queued GPU work (timings must cover it)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_concurrent(
    base, lora, spec, train_sets: list, val_sets: list, pad_id: int, pad_slack: float | None = None
) -> tuple[float, int]:
    """Train the experts together with the package's own code; (seconds of the steps, samples).

    `pad_slack` as in train_concurrent: None = the package default, inf = every expert in one
    forward pass, 0 = one pass per expert (the package's loop without the concurrency).
    """
    from mole_trainer.model.multi_lora import MultiLora, expert_weights_from_spec
    from mole_trainer.train.concurrent import ExpertRun, train_concurrent

    init = [expert_weights_from_spec(base, lora, spec.seed + e) for e in range(len(train_sets))]
    multi = MultiLora(base, init)
    try:
        runs = [
            ExpertRun(
                f"e{e}", train_sets[e], val_sets[e], spec.__class__(**{**vars(spec), "seed": spec.seed + e})
            )
            for e in range(len(train_sets))
        ]
        result = train_concurrent(base, multi, runs, pad_id, lambda *_: None, pad_slack)
    finally:
        multi.remove()
    return result.step_seconds, sum(o.samples_seen for o in result.experts)


def run_sequential_peft(base, lora, spec, train_sets: list, pad_id: int) -> tuple[float, int]:
    """Plain PEFT: one adapter per expert on one wrapper, trained one after another with set_adapter."""
    import torch
    from peft import get_peft_model

    from mole_trainer.data.preprocess import collate
    from mole_trainer.model.lora import peft_config
    from mole_trainer.train.loop import batches, lr_lambda

    device = next(base.parameters()).device
    names = [f"e{e}" for e in range(len(train_sets))]
    pm = get_peft_model(base, peft_config(lora), adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, peft_config(lora))
    seconds, samples = 0.0, 0
    try:
        for e, name in enumerate(names):
            pm.base_model.set_adapter(name)  # only this adapter is active and trainable
            params = [p for p in pm.parameters() if p.requires_grad]
            optim = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(spec, spec.steps))
            stream = batches(len(train_sets[e]), spec.batch_size, spec.seed + e)
            pm.train()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(spec.steps):
                idx = next(stream)
                batch = {k: v.to(device) for k, v in collate([train_sets[e][i] for i in idx], pad_id).items()}
                optim.zero_grad(set_to_none=True)
                pm(**batch).loss.backward()
                if spec.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
                optim.step()
                sched.step()
                samples += len(idx)
            sync(device)
            seconds += time.perf_counter() - t0
    finally:
        pm.unload()
    return seconds, samples


VARIANTS = {
    "concurrent": None,  # the package default (what `mole train experts --concurrent` does)
    "concurrent_one_pass": float("inf"),  # every expert in one forward pass, whatever the padding
    "package_one_expert_per_pass": 0.0,  # the package's loop, one pass per expert: no concurrency
}


def measure(base, lora, spec, train_sets, val_sets, pad_id, repeats: int, report=print) -> dict:
    """Every variant and plain PEFT `repeats` times, interleaved after one warm-up each; medians.

    `speedup` is the package default against plain PEFT; the two ablations split it into what
    sharing forward passes gives (concurrent vs one expert per pass) and what the package's loop
    itself gives (one expert per pass vs plain PEFT: the output head only at supervised positions).
    """
    runs: dict[str, list[float]] = {name: [] for name in [*VARIANTS, "sequential_peft"]}
    one = spec.__class__(**{**vars(spec), "steps": 1})
    for slack in VARIANTS.values():
        run_concurrent(base, lora, one, train_sets, val_sets, pad_id, slack)
    run_sequential_peft(base, lora, one, train_sets, pad_id)
    for r in range(repeats):
        for name, slack in VARIANTS.items():
            s, n = run_concurrent(base, lora, spec, train_sets, val_sets, pad_id, slack)
            runs[name].append(n / s)
        s, n = run_sequential_peft(base, lora, spec, train_sets, pad_id)
        runs["sequential_peft"].append(n / s)
        report(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in runs.items()) + " samples/s")
    med = {k: statistics.median(v) for k, v in runs.items()}
    q = med["sequential_peft"]
    out = {f"{k}_samples_per_s": round(v, 2) for k, v in med.items()}
    out["speedup"] = round(med["concurrent"] / q, 3)
    out["speedup_one_pass"] = round(med["concurrent_one_pass"] / q, 3)
    out["speedup_one_expert_per_pass"] = round(med["package_one_expert_per_pass"] / q, 3)
    out["runs"] = {k: [round(x, 2) for x in v] for k, v in runs.items()}
    return out


def tiny_setup(root: Path, n_experts: int, per_expert: int):
    """Tiny model + synthetic expert datasets preprocessed for it: (model dir, train sets, val sets, pad id)."""
    from mole_trainer.data.formats import load_expert_dataset
    from mole_trainer.data.preprocess import load_preprocessed, preprocess_splits
    from mole_trainer.data.synth import SYNTH_EXPERTS, synthesize
    from mole_trainer.model.loading import load_processor
    from mole_trainer.model.tiny import build_tiny_model

    model_dir = build_tiny_model(root / "tiny")
    names = list(SYNTH_EXPERTS)[:n_experts]
    if len(names) < n_experts:
        raise SystemExit(f"only {len(SYNTH_EXPERTS)} synthetic experts exist")
    synthesize(
        root / "data", names, {"train": per_expert, "val": 4, "test": 0}, seed=0, image_size=(320, 240)
    )
    train_sets, val_sets = [], []
    for n in names:
        splits = load_expert_dataset(root / "data" / n)
        preprocess_splits(splits, root / "prep" / n, str(model_dir), "sft", None, 4096, 76800)
        train_sets.append(load_preprocessed(root / "prep" / n, "train")[1]["examples"])
        val_sets.append(load_preprocessed(root / "prep" / n, "val")[1]["examples"])
    pad_id = load_processor(str(model_dir)).tokenizer.pad_token_id
    return model_dir, train_sets, val_sets, pad_id


def main() -> None:
    """Build the tiny set-up, measure both paths, print the JSON summary last."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6, help="optimiser steps per expert")
    ap.add_argument("--batch", type=int, default=4, help="per-expert batch size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = ap.parse_args()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)

    from mole_trainer.config import LoraSpec, TrainSpec
    from mole_trainer.model.loading import load_base

    lora = LoraSpec(rank=a.rank, alpha=2 * a.rank, dropout=0.0)
    spec = TrainSpec(lr=1e-3, steps=a.steps, batch_size=a.batch, warmup_ratio=0.0, eval_every=a.steps)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, train_sets, val_sets, pad_id = tiny_setup(Path(tmp), a.experts, max(16, 2 * a.batch))
        base = load_base(str(model_dir), "float32", "cpu")
        tokens = statistics.mean(len(x["input_ids"]) for x in train_sets[0])
        res = measure(
            base, lora, spec, train_sets, val_sets, pad_id, a.repeats, lambda m: print(m, file=sys.stderr)
        )
    res.update(
        model="tiny (mole model tiny)",
        device="cpu",
        dtype="float32",
        torch_threads=torch.get_num_threads(),
        experts=a.experts,
        steps=a.steps,
        per_expert_batch=a.batch,
        lora_rank=a.rank,
        mean_tokens_per_sample=round(tokens, 1),
        repeats=a.repeats,
    )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
